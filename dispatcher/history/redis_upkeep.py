"""The Redis store's upkeep: the retention sweep (`sweep`, and `Sweep`, which the shard
moves' `forget_project` runs too)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = ["Sweep", "sweep"]


@dataclass
class Sweep(Script):
    """Removes the records of `index` up to `cutoff_ms` (at most `batch`), from it and
    from the URL's two indexes (`url_ok`, `url_failed`), and the index from `indexes` once
    only its mark (`~`, scored +inf: see `Record`) is left, or nothing (an index written
    before the mark); and whatever the project's `failures` hold up to `cutoff_ms` (a
    sweep of a version before this one left them there). Record keys are made from the
    ids found (`record_prefix`). Returns how many records it removed."""

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

    @classmethod
    def of(cls, keys: Keys, index: str, cutoff_ms: int | str, batch: int) -> Sweep:
        """The sweep of `index` (a project, event and URL's) up to `cutoff_ms`."""
        url_ok, url_failed, failures = keys.history_indexes_of(index)
        prefix = keys.HISTORY_RECORD_PREFIX
        return cls(
            index, keys.HISTORY_INDEXES, url_ok, url_failed, failures, cutoff_ms, batch, prefix
        )


async def sweep(
    redis: Redis,
    keys: Keys,
    cutoff_ms: int,
    batch: int,
    *,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Remove the records written before `cutoff_ms`, their index entries and emptied
    indexes, `batch` records per Redis call, until done or a bound is reached (the next
    sweep goes on); then the dead letters before it. Returns how many were removed."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def bounded() -> bool:
        return (max_batches is not None and batches >= max_batches) or (
            deadline is not None and time.monotonic() >= deadline
        )

    removed = batches = 0
    async for index in redis.sscan_iter(keys.HISTORY_INDEXES, count=100):
        script = Sweep.of(keys, index.decode(), cutoff_ms, batch)
        while True:
            n = int(await script.run(redis))
            removed += n
            batches += 1
            if on_batch is not None:
                on_batch(n)
            if n < batch or bounded():
                break
        if bounded():
            break
    dead_keys = [key async for key in redis.sscan_iter(keys.HISTORY_DEAD_KEYS, count=100)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in [keys.HISTORY_DEAD.encode(), *dead_keys]:
            pipe.zremrangebyscore(key, "-inf", cutoff_ms)
        await pipe.execute()
    return removed
