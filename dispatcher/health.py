"""Endpoint health: consecutive final failures per callback (past the threshold the
callback is disabled, with its reason), and a short circuit breaker per host."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from dispatcher import clock
from dispatcher.errors import NotFound
from dispatcher.lua import Lua, run_pipeline

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.registry import Registry
    from dispatcher.settings import Settings

__all__ = ["CircuitBreaker", "Failing", "Health"]

log = structlog.get_logger("dispatcher.health")

# KEYS: health hash, failing zset. ARGV: now ms, last error, callback id, the failed
# attempt's record id ('' when none). Counting the same record twice counts it once.
# Returns {failures, since ms}.
_FAILED = Lua("""
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'lastRecord') == ARGV[4] then
  local row = redis.call('HMGET', KEYS[1], 'failures', 'since')
  return {tonumber(row[1]), tonumber(row[2])}
end
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSETNX', KEYS[1], 'since', ARGV[1])
redis.call('HSET', KEYS[1], 'lastError', ARGV[2], 'lastRecord', ARGV[4])
local since = redis.call('HGET', KEYS[1], 'since')
redis.call('ZADD', KEYS[2], since, ARGV[3])
return {n, tonumber(since)}
""")

# KEYS: failing zset. ARGV: health prefix, limit. Returns {id, failures, since, last error}
# rows, oldest failure first.
_FAILING = Lua("""
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local row = redis.call('HMGET', ARGV[1] .. id, 'failures', 'since', 'lastError')
  if row[1] then out[#out + 1] = {id, row[1], row[2], row[3]} end
end
return out
""")


@dataclass(frozen=True, slots=True)
class Failing:
    """A callback with consecutive final failures (not yet disabled, or disabled)."""

    callback_id: int
    failures: int
    since_ms: int
    last_error: str


class Health:
    """Counts each callback's consecutive final failures; any success resets the count."""

    def __init__(self, redis: Redis, registry: Registry, settings: Settings) -> None:
        self.redis = redis
        self.registry = registry
        self.settings = settings
        self.keys = registry.keys

    def succeeded(self, pipe: Pipeline, callback_id: int) -> None:
        """Queue the reset on the caller's pipeline (no extra round trip)."""
        pipe.delete(self.keys.health(callback_id))
        pipe.zrem(self.keys.HEALTH_FAILING, callback_id)

    async def failing(self, limit: int = 1000) -> list[Failing]:
        """Callbacks whose last deliveries failed, most failures first (one round trip)."""
        rows = await _FAILING(
            self.redis, [self.keys.HEALTH_FAILING], [self.keys.HEALTH_PREFIX, limit]
        )
        found = [
            Failing(int(cid), int(n), int(since or 0), (error or b"").decode())
            for cid, n, since, error in rows
        ]
        return sorted(found, key=lambda f: (-f.failures, f.callback_id))

    async def failures(self, callback_ids: Sequence[int]) -> dict[int, int]:
        """Consecutive final failures of those callbacks that have some (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for callback_id in callback_ids:
                pipe.hget(self.keys.health(callback_id), "failures")
            counts = await pipe.execute()
        return {cid: int(n) for cid, n in zip(callback_ids, counts, strict=True) if n}

    def queue_failed(
        self,
        pipe: Pipeline,
        callback_id: int,
        error: str,
        now_ms: int,
        record_id: int | None = None,
    ) -> None:
        """Queue the count of one final failure; its answer goes to `verdict`."""
        _FAILED.queue(
            pipe,
            [self.keys.health(callback_id), self.keys.HEALTH_FAILING],
            [now_ms, error, callback_id, "" if record_id is None else record_id],
        )

    def verdict(self, answer: list[int], error: str, now_ms: int) -> str | None:
        """The reason to disable the callback, when the failures counted in `answer`
        (`_FAILED`'s reply) pass the threshold: a count *and* a time span."""
        failures, since = int(answer[0]), int(answer[1])
        threshold_ms = self.settings.disable_after_seconds * 1000
        if failures < self.settings.disable_after_failures or now_ms - since < threshold_ms:
            return None
        hours = (now_ms - since) / 3_600_000
        return (
            f"disabled after {failures} consecutive failed deliveries over {hours:.1f} h; "
            f"last error: {error}"
        )

    async def failed(self, callback_id: int, error: str, *, now_ms: int | None = None) -> bool:
        """Count one final failure now; disable the callback past the threshold. Returns
        True when this call disabled it."""
        now = clock.now_ms() if now_ms is None else now_ms
        (answer,) = await run_pipeline(
            self.redis, lambda pipe: self.queue_failed(pipe, callback_id, error, now)
        )
        reason = self.verdict(answer, error, now)
        if reason is None:
            return False
        await self.disable(callback_id, reason)
        return True

    async def disable(self, callback_id: int, reason: str) -> None:
        try:
            await self.registry.set_enabled(callback_id, False, reason)
        except NotFound:
            return
        log.warning("callback.disabled", callback_id=callback_id, reason=reason)


@dataclass(slots=True)
class _HostState:
    failures: int = 0
    open_until: float = 0.0


@dataclass
class CircuitBreaker:
    """Per-host breaker, per worker process: after `threshold` retryable failures in a row
    a host is left alone for `cooldown` seconds; then one attempt probes it."""

    threshold: int = 10
    cooldown: float = 30.0
    _hosts: dict[str, _HostState] = field(default_factory=dict)

    def wait(self, host: str, now: float | None = None) -> float:
        """Seconds until `host` may be tried again (0 when it may be tried now)."""
        state = self._hosts.get(host)
        if state is None or state.open_until == 0.0:
            return 0.0
        remaining = state.open_until - (time.monotonic() if now is None else now)
        if remaining <= 0:
            state.open_until = 0.0  # half-open: let one attempt through
            state.failures = self.threshold - 1
            return 0.0
        return remaining

    def record(self, host: str, ok: bool, now: float | None = None) -> bool:
        """Note an attempt's result; True when this failure opened the breaker."""
        if ok:
            self._hosts.pop(host, None)
            return False
        state = self._hosts.setdefault(host, _HostState())
        state.failures += 1
        if state.failures >= self.threshold and state.open_until == 0.0:
            state.open_until = (time.monotonic() if now is None else now) + self.cooldown
            return True
        return False
