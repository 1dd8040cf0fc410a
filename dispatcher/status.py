"""What an operator asks at 2 a.m.: is the queue moving, are workers alive, which callbacks
fail, how did the last hour go. Read-only, a handful of Redis calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import keys
from dispatcher.queue import Queue

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Failing", "Status", "failing_callbacks", "live_workers", "read_status"]


@dataclass(frozen=True, slots=True)
class Failing:
    """A callback with consecutive final failures (not yet disabled, or disabled)."""

    callback_id: int
    failures: int
    since_ms: int
    last_error: str


@dataclass(slots=True)
class Status:
    queue_due: int
    oldest_due_s: float
    workers: list[dict[str, Any]]
    failing: list[Failing]
    disabled: int
    last_hour: dict[str, int] = field(default_factory=dict)


async def live_workers(redis: Redis, host: str | None = None) -> list[dict[str, Any]]:
    """Heartbeats of live workers (all, or those of one host)."""
    pattern = f"{keys.WORKERS_PREFIX}{host + ':' if host else ''}*"
    found = [key async for key in redis.scan_iter(match=pattern, count=500)]
    values = await redis.mget(found) if found else []
    return sorted((orjson.loads(v) for v in values if v), key=lambda w: (w["host"], w["pid"]))


async def failing_callbacks(redis: Redis) -> list[Failing]:
    """Callbacks whose last deliveries failed, most failures first."""
    out: list[Failing] = []
    async for key in redis.scan_iter(match=f"{keys.HEALTH_PREFIX}*", count=500):
        raw: dict[bytes, bytes] = await redis.hgetall(key)  # type: ignore[misc]  # sync|async
        if not raw:
            continue
        out.append(
            Failing(
                callback_id=int(key.rsplit(b":", 1)[-1]),
                failures=int(raw.get(b"failures", 0)),
                since_ms=int(raw.get(b"since", 0)),
                last_error=raw.get(b"lastError", b"").decode(),
            )
        )
    return sorted(out, key=lambda f: (-f.failures, f.callback_id))


async def read_status(redis: Redis, queue_name: str, *, now_ms: int | None = None) -> Status:
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    due, oldest = await Queue(redis, queue_name).depth()
    minute = now // 60_000
    async with redis.pipeline(transaction=False) as pipe:
        for m in range(minute - 59, minute + 1):
            pipe.hgetall(keys.stats(m))
        pipe.zcard(keys.CALLBACKS_DISABLED)
        *minutes, disabled = await pipe.execute()
    last_hour: dict[str, int] = {}
    for counts in minutes:
        for outcome, n in counts.items():
            last_hour[outcome.decode()] = last_hour.get(outcome.decode(), 0) + int(n)
    return Status(
        queue_due=due,
        oldest_due_s=oldest,
        workers=await live_workers(redis),
        failing=await failing_callbacks(redis),
        disabled=int(disabled),
        last_hour=last_hour,
    )
