"""Endpoint health: consecutive final failures per callback (past the threshold the
callback is disabled, with its reason), and a short circuit breaker per host."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import RedisError

from dispatcher import clock, metrics
from dispatcher.failing import FAILING, FailingView, failing_names, index_start, merged
from dispatcher.failing import read as read_failing
from dispatcher.keys import SEP
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.recency import OwnedLRU
from dispatcher.registry.scripts import DISABLE

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.registry import Registry
    from dispatcher.settings import Settings

__all__ = ["CircuitBreaker", "FilterError", "Health"]

log = structlog.get_logger("dispatcher.health")


# A Lua function: the callback's `failing` mark set to `value` (unless its hash is gone);
# when that changes it, its project's registry version is bumped (a cached match holds the
# mark). Not a platform-wide callback's: the platform's version is in every project's
# cached matches, and one project's refused events taking turns with the others' accepted
# ones flipped the mark each time, every worker then reading every project's matches
# again (review). Its mark shows within a cached match's age (`Matches.max_age_s`).
# Arguments: the hash's key, '1' or '0', the registry version prefix.
MARK = f"""
local function mark(callback, value, version_prefix)
  local row = redis.call('HMGET', callback, 'projectId', 'failing')
  if row[1] and row[2] ~= value then
    redis.call('HSET', callback, 'failing', value)
    if row[1] ~= '{PLATFORM_PROJECT}' then redis.call('INCR', version_prefix .. row[1]) end
  end
end
"""


@dataclass
class Failed(Script):
    """Counts one final failure of callback `callback_id` at `now_ms` (`last_error`: its
    error; `record_id`: the failed attempt's record, '' when none: counting the same
    record twice counts it once), marks its hash `failing` (`MARK`) and lists it among its
    project's failing callbacks (`failing.FAILING`); a callback deleted meanwhile (its
    attempt was in flight) counts nothing: no health comes back for a callback that is
    gone. Past `disable_after` failures *and* `disable_after_ms` since the first, the
    callback is disabled (`registry.scripts.DISABLE`, which finds its match set inside
    Redis, from its hash: hence the match prefix and separator), unless `disables` is 0 (a
    platform-wide callback's: counted and shown, never disabled by one project's failures)
    or it is disabled already (its owner's reason, or the first disable's, is kept: a late
    failure overwrote it, and was logged and counted as a disable again; review).
    Returns {failures, since ms, the reason when this call disabled the callback}."""

    LUA = (
        DISABLE
        + MARK
        + FAILING
        + """
if redis.call('EXISTS', callback) == 0 then return {0, tonumber(now_ms)} end  -- deleted
if record_id ~= '' and redis.call('HGET', health, 'lastRecord') == record_id then
  local row = redis.call('HMGET', health, 'failures', 'since')
  return {tonumber(row[1]), tonumber(row[2])}
end
local n = redis.call('HINCRBY', health, 'failures', 1)
mark(callback, '1', version_prefix)
redis.call('HSETNX', health, 'since', now_ms)
redis.call('HSET', health, 'lastError', last_error, 'lastRecord', record_id)
local since = tonumber(redis.call('HGET', health, 'since'))
failing_on(redis.call('HGET', callback, 'projectId'), callback_id, n, since)
local span = tonumber(now_ms) - since
if tonumber(disables) == 0 then return {n, since} end
if n < tonumber(disable_after) or span < tonumber(disable_after_ms) then return {n, since} end
if redis.call('HGET', callback, 'enabled') == '0' then return {n, since} end  -- its reason kept
local reason = string.format(
  'disabled after %d consecutive failed deliveries over %.1f h; last error: %s',
  n, span / 3600000, last_error)
if disable(callback, disabled, reason, now_ms, match_prefix, sep, version_prefix) == 0 then
  return {n, since}
end
return {n, since, reason}
"""
    )
    health: Key
    failing: Key
    failing_projects: Key
    callback: Key
    disabled: Key
    failing_prefix: str
    now_ms: int
    last_error: str
    callback_id: int
    record_id: int | str
    disable_after: int
    disable_after_ms: int
    disables: int
    match_prefix: str
    sep: str
    version_prefix: str


@dataclass
class Succeeded(Script):
    """The reset after a success: no failures on record for `callback_id` (listed among
    the failing callbacks no more), and its hash says so (unless it is gone)."""

    LUA = (
        MARK
        + FAILING
        + """
redis.call('DEL', health)
failing_off(redis.call('HGET', callback, 'projectId'), callback_id)
mark(callback, '0', version_prefix)
return 1
"""
    )
    health: Key
    failing: Key
    failing_projects: Key
    callback: Key
    failing_prefix: str
    callback_id: int
    version_prefix: str


@dataclass
class FilterError(Script):
    """One more failure of callback `callback`'s filter (`error` its message, at `now_ms`),
    counted on `errors` while the callback exists: a delete that lands between the match
    and this write leaves nothing behind."""

    LUA = """
    if redis.call('EXISTS', callback) == 0 then return 0 end
    redis.call('HINCRBY', errors, 'n', 1)
    redis.call('HSET', errors, 'lastError', error, 'lastAt', now_ms)
    return 1
    """
    errors: Key
    callback: Key
    error: str
    now_ms: int


class Health:
    """Counts each callback's consecutive final failures; any success resets the count."""

    def __init__(self, redis: Redis, registry: Registry, settings: Settings) -> None:
        self.redis = redis
        self.registry = registry
        self.settings = settings
        self.keys = registry.keys

    def succeeded(self, pipe: Pipeline, callback_id: int) -> None:
        """Queue the reset on the caller's pipeline (no extra round trip)."""
        k = self.keys
        Succeeded(
            health=k.health(callback_id),
            callback=k.callback(callback_id),
            callback_id=callback_id,
            version_prefix=k.REGISTRY_VERSION_PREFIX,
            **failing_names(k),
        ).queue_on(pipe)

    async def failing(self) -> FailingView:
        """Callbacks whose last deliveries failed, by project (`dispatcher.failing`): the
        projects with the most failures first, the worst few of each (one round trip)."""
        return merged([await read_failing(self.redis, self.keys)])

    async def upgrade(self) -> None:
        """The failing callbacks indexed by project (`failing.index_start`), as far as
        Redis lets: refused (full, a replica, any error) or unreachable, the work is left to
        the sweep (`Duties`), which does it anyway. It raised out of a worker's start (which
        exited 1 on a full Redis) and the API's (review)."""
        try:
            removed = await index_start(self.redis, self.keys)
        except (RedisError, OSError) as exc:  # any reply refused, or `REDIS_ERRORS`
            log.warning("health.failing_index_postponed", error=str(exc))
            return
        if removed:
            log.info("health.failing_indexed", removed=removed)

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
        *,
        emitter: str = "",
    ) -> None:
        """Queue the count of one final failure, and the callback's disabling when it
        passes the threshold (a count *and* a time span): one script, so the verdict and
        the disabling are one write. Its answer goes to `judged`. `emitter`: the project
        whose event failed at a platform-wide callback, which every project's events
        reach: its failure is counted and named (`project evil: HTTP 400`), and never
        disables the callback (no one project may turn it off for the others)."""
        k, settings = self.keys, self.settings
        Failed(
            health=k.health(callback_id),
            callback=k.callback(callback_id),
            disabled=k.CALLBACKS_DISABLED,
            **failing_names(k),
            now_ms=now_ms,
            last_error=f"project {emitter}: {error}" if emitter else error,
            callback_id=callback_id,
            record_id="" if record_id is None else record_id,
            disable_after=settings.disable_after_failures,
            disable_after_ms=int(settings.disable_after_seconds * 1000),
            disables=0 if emitter else 1,
            match_prefix=k.MATCH_PREFIX,
            sep=SEP,
            version_prefix=k.REGISTRY_VERSION_PREFIX,
        ).queue_on(pipe)

    @staticmethod
    def judged(callback_id: int, answer: Sequence[Any]) -> str | None:
        """The reason the callback was disabled by the count whose answer (`queue_failed`'s
        one reply) this is, logged; None when it was not."""
        if len(answer) < 3:
            return None
        reason = answer[2].decode() if isinstance(answer[2], bytes) else str(answer[2])
        metrics.CALLBACKS_DISABLED.labels(reason="failing").inc()
        log.warning("callback.disabled", callback_id=callback_id, reason=reason)
        return reason

    async def failed(self, callback_id: int, error: str, *, now_ms: int | None = None) -> bool:
        """Count one final failure now; disable the callback past the threshold. Returns
        True when this call disabled it."""
        now = clock.now_ms() if now_ms is None else now_ms
        (answer,) = await run_pipeline(
            self.redis, lambda pipe: self.queue_failed(pipe, callback_id, error, now)
        )
        return self.judged(callback_id, answer) is not None


@dataclass(slots=True)
class _HostState:
    failures: int = 0
    open_until: float = 0.0  # when the open circuit may be probed first (0: closed)
    probes: dict[int, float] = field(default_factory=dict)  # per callback: its next probe
    failed: set[int] = field(default_factory=set)  # callbacks that failed while it was open


Circuit = tuple[str, str]  # (project, host): a project's own, none trips another's
PROBING = 16  # callbacks of a circuit that probe it each on its own; the others share one
FAILED_MOST = 1_000  # callbacks of a circuit remembered as failed there (the rest: as not)
SHARED = -1  # (the callback id the others probe under)


@dataclass
class CircuitBreaker:
    """A breaker per circuit (a project's host), per worker process: after `threshold`
    retryable failures in a row a circuit is left alone for `cooldown` seconds; then each
    callback of the project there may probe it, once a cool-down (one probe at a time; at
    most `PROBING` callbacks each on its own, the others sharing one). A probe that
    succeeds closes the circuit; one that fails leaves its callback another cool-down,
    not the others: a project's callback that fails there (its path answering 500) does
    not stop another's probes on the same host, whose success closes the circuit (review:
    `/good`'s deliveries waited behind `/bad`'s failed probes until they were spent); a
    callback that failed there takes the shared probe no more, and its failure is its own,
    not its group's (`failed`). One
    turned away before it is sent, by its project's share, records nothing: its callback
    waits another cool-down. What an attempt does while its circuit is open:
    `worker.circuit`. A project keeps at most `most` circuits, its own used least recently
    going first, and all of them together at most `total`, the one used least recently of
    all going first: one project failing on many hosts forgets its own, and it takes
    `total` / `most` of them to push out another's."""

    threshold: int = 10
    cooldown: float = 30.0
    most: int = 1_000
    total: int = 100_000
    _circuits: OwnedLRU[str, _HostState] = field(init=False)  # per project, by host

    def __post_init__(self) -> None:
        self._circuits = OwnedLRU(most=self.most, total=self.total)

    def wait(self, circuit: Circuit, callback: int = SHARED, now: float | None = None) -> float:
        """Seconds until `callback`'s attempt may be tried on `circuit` (0 when it may be
        tried now). Once the cool-down is over, one caller of each callback gets 0 and
        probes; its callback's others wait for its answer (a success closes the breaker) or
        another cool-down."""
        state = self._circuits.find(*circuit)
        if state is None or state.open_until == 0.0:
            return 0.0
        self._circuits.touch(*circuit)
        now = time.monotonic() if now is None else now
        probes, key = state.probes, _probing(state, callback)
        if (remaining := max(state.open_until, probes.get(key, 0.0)) - now) > 0:
            return remaining
        if key == SHARED != callback and callback in state.failed:
            # the shared probe is for those that did not fail there first: a failed one
            # takes it once no other did for a cool-down past its due (none may be left)
            due = max(state.open_until, probes.get(key, 0.0))
            if (later := due + self.cooldown - now) > 0:
                return later
        probes[key] = now + self.cooldown  # this caller is its callback's probe
        return 0.0

    def record(
        self, circuit: Circuit, ok: bool, callback: int = SHARED, now: float | None = None
    ) -> bool:
        """Note an attempt's result; True when this failure opened the breaker or came while
        it was open (a probe's: its `callback` waits another cool-down)."""
        if ok:
            self._circuits.pop(*circuit)
            return False
        state = self._circuits.find(*circuit)
        if state is None:
            state = _HostState()
            self._circuits.put(*circuit, state)
        else:
            self._circuits.touch(*circuit)
        now = time.monotonic() if now is None else now
        key = _probing(state, callback)
        if state.open_until:  # open: a probe's failure, or an attempt sent before it opened
            state.probes[key] = max(state.probes.get(key, 0.0), now + self.cooldown)
            _failed(state, callback)
            return True
        state.failures += 1
        if state.failures == self.threshold:
            state.open_until = now + self.cooldown
            _failed(state, callback)
            return True
        return False

    def failed(self, circuit: Circuit, callback: int = SHARED) -> bool:
        """Whether `callback`'s attempts failed on `circuit` while it was open (its probe,
        or the failure that opened it): its host failing it, not only another callback."""
        state = self._circuits.find(*circuit)
        return state is not None and callback in state.failed


def _failed(state: _HostState, callback: int) -> None:
    """`callback` failed on the open circuit: its own failure, never its probe group's (a
    callback sharing the probe of the others took the blame for theirs, its deliveries
    then ended unsent while its own path answered 200; review)."""
    if len(state.failed) < FAILED_MOST:
        state.failed.add(callback)


def _probing(state: _HostState, callback: int) -> int:
    """The callback `callback` probes its circuit as: its own, or, past `PROBING` callbacks
    with probes of their own, the one they share."""
    return callback if callback in state.probes or len(state.probes) < PROBING else SHARED
