"""The Redis store's upkeep: the retention sweep (`sweep`, and `Sweep`, which the shard
moves' `forget_project` runs too)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dispatcher import metrics
from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = ["Sweep", "sweep"]

log = structlog.get_logger("dispatcher.history")


@dataclass
class Sweep(Script):
    """Removes the records of `index` up to `cutoff_ms` (at most `batch`), from it and
    from the URL's two indexes (`url_ok`, `url_failed`), and the index from `indexes` once
    only its mark (`~`, scored +inf: see `Record`) is left, or nothing (an index written
    before the mark); and whatever the project's `failures` hold up to `cutoff_ms` (a
    sweep of a version before this one left them there). An index kept, and its URL's, is
    given `keep_s` seconds to live (0: not), the records' own: one no sweep reaches any
    more goes with them (each sweep's pass sets it again; the write of a record does
    not, so costs no command). Record keys are made from the ids found (`record_prefix`).
    Returns how many records it removed."""

    LUA = """
    local ids = {}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', cutoff_ms, 'LIMIT', 0, batch)) do
      local id = string.match(m, '^0*(%d+)$')
      if id then
        redis.call('DEL', record_prefix .. id)
        ids[#ids + 1] = m
      end
    end
    if #ids > 0 then
      redis.call('ZREM', index, unpack(ids))
      redis.call('ZREM', url_ok, unpack(ids))
      redis.call('ZREM', url_failed, unpack(ids))
    end
    redis.call('ZREMRANGEBYSCORE', failures, '-inf', cutoff_ms)  -- whoever wrote them
    local left = redis.call('ZCARD', index)
    if left == 0 or (left == 1 and redis.call('ZSCORE', index, '~')) then
      redis.call('DEL', index)
      redis.call('SREM', indexes, index)
    elseif tonumber(keep_s) > 0 then
      redis.call('EXPIRE', index, keep_s)
      redis.call('EXPIRE', url_ok, keep_s)
      redis.call('EXPIRE', url_failed, keep_s)
    end
    return #ids
    """
    index: Key
    indexes: Key
    url_ok: Key
    url_failed: Key
    failures: Key
    cutoff_ms: int | str
    batch: int
    record_prefix: str
    keep_s: int = 0

    @classmethod
    def of(cls, keys: Keys, index: str, cutoff_ms: int | str, batch: int, keep_s: int = 0) -> Sweep:
        """The sweep of `index` (a project, event and URL's) up to `cutoff_ms`."""
        url_ok, url_failed, failures = keys.history_indexes_of(index)
        prefix = keys.HISTORY_RECORD_PREFIX
        return cls(
            index, keys.HISTORY_INDEXES, url_ok, url_failed, failures, cutoff_ms, batch, prefix,
            keep_s,
        )  # fmt: skip


async def sweep(
    redis: Redis,
    keys: Keys,
    cutoff_ms: int,
    batch: int,
    *,
    keep_s: int = 0,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Remove the records written before `cutoff_ms`, their index entries and emptied
    indexes, `batch` records per Redis call, until done or a bound is reached; then the
    dead letters before it. An index kept is given `keep_s` (not 0) seconds to live. A
    bounded run goes on where the last one stopped (`_Place`) and says when it stops
    before the end of its pass. Returns how many were removed."""
    run = _Run(redis, keys, cutoff_ms, batch, keep_s, max_batches, max_seconds, on_batch)
    bounded = max_batches is not None or max_seconds is not None
    place = keys.sweep_cursor("history")
    cursor, done = _Place.read(await redis.get(place)) if bounded else (0, 0)
    while True:
        after, page = await redis.sscan(keys.HISTORY_INDEXES, cursor, count=100)
        stopped = await run.page([index.decode() for index in page[done:]])
        if stopped is not None:  # by the bound: the next run goes on from there
            await redis.set(place, _Place.of(cursor, done + stopped), ex=_PLACE_TTL_S)
            metrics.HISTORY_SWEEP_UNFINISHED.inc()
            log.warning("history.sweep_unfinished", removed=run.removed, key=keys.HISTORY_INDEXES)
            break
        cursor, done = int(after), 0
        if not cursor:
            if bounded:
                await redis.delete(place)  # the pass is done: the next starts over
            break
    dead_keys = [key async for key in redis.sscan_iter(keys.HISTORY_DEAD_KEYS, count=100)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in [keys.HISTORY_DEAD.encode(), *dead_keys]:
            pipe.zremrangebyscore(key, "-inf", cutoff_ms)
        await pipe.execute()
    return run.removed


# How long a bounded sweep's place is kept: a day without a sweep starts over
_PLACE_TTL_S = 86_400


class _Place:
    """Where a bounded sweep stopped: the SSCAN cursor of its page of indexes and how many
    of the page it had swept ("cursor:done"). The page read again from that cursor is the
    same while no index came or went; else an index skipped is swept at the next pass."""

    @staticmethod
    def read(value: bytes | None) -> tuple[int, int]:
        cursor, _, done = (value or b"0:0").decode().partition(":")
        return int(cursor), int(done or 0)

    @staticmethod
    def of(cursor: int, done: int) -> str:
        return f"{cursor}:{done}"


@dataclass
class _Run:
    """One sweep's indexes, counted against its bounds."""

    redis: Redis
    keys: Keys
    cutoff_ms: int
    batch: int
    keep_s: int
    max_batches: int | None
    max_seconds: float | None
    on_batch: Callable[[int], None] | None
    removed: int = 0
    batches: int = 0

    def __post_init__(self) -> None:
        seconds = self.max_seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def bounded(self) -> bool:
        return (self.max_batches is not None and self.batches >= self.max_batches) or (
            self.deadline is not None and time.monotonic() >= self.deadline
        )

    async def page(self, indexes: list[str]) -> int | None:
        """Sweep `indexes` in turn until done (None) or a bound is reached: then how many
        of them are done (the last one swept not, while it still holds some to remove)."""
        for at, index in enumerate(indexes):
            script = Sweep.of(self.keys, index, self.cutoff_ms, self.batch, self.keep_s)
            while True:
                n = int(await script.run(self.redis))
                self.removed += n
                self.batches += 1
                if self.on_batch is not None:
                    self.on_batch(n)
                if n < self.batch or self.bounded():
                    break
            if self.bounded():
                return at + int(n < self.batch)
        return None
