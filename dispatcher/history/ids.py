"""Record ids, from one Redis counter whatever the backend, handed out in blocks.

A block is handed out by one script that also notes which Redis server (its run id) did
it. A server that did not hand out the last block may lack the newest ones: a replica that
a failover promoted never received the master's last writes, a restarted server lost what
its append-only file had not synced. Its first block then starts `ID_GAP` further on, so
that an id a worker still holds from a lost block (and writes to the new master) is never
handed out a second time: two records with one id would overwrite one another. The gap is
far more ids than a fleet hands out in the moments a replica lags behind.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis.asyncio import Redis

    from dispatcher.history.record import AttemptRecord
    from dispatcher.keys import Keys

__all__ = ["ID_BLOCK", "ID_GAP", "RecordIds", "SeedIds"]

# record ids reserved per round trip
ID_BLOCK = 1000
ID_GAP = 100_000_000


@dataclass
class TakeBlock(Script):
    """Reserves `block` record ids on the `counter` and returns the block's last id. The
    counter starts at `floor` (the first id of the shard's range, see `dispatcher/shard.py`)
    and jumps by `gap` when `server` (the Redis that handed out the last block) changed; a
    counter that was never used needs no gap (a fresh Redis)."""

    LUA = """
    if tonumber(redis.call('GET', counter) or '0') < tonumber(floor) then
      redis.call('SET', counter, floor)
    end
    local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
    local last = redis.call('GET', server)
    if last ~= run_id then
      redis.call('SET', server, run_id)
      if last or redis.call('EXISTS', counter) == 1 then
        redis.call('INCRBY', counter, gap)
      end
    end
    return redis.call('INCRBY', counter, block)
    """
    counter: Key
    server: Key
    block: int
    gap: int
    floor: int


class RecordIds:
    """Gives records their ids from `dispatcher:history:seq`."""

    def __init__(self, redis: Redis, keys: Keys, id_floor: int = 0) -> None:
        self.redis = redis
        self.id_floor = id_floor
        self.keys = keys
        self._ids: collections.deque[int] = collections.deque()
        self._lock = asyncio.Lock()

    async def assign(self, records: Iterable[AttemptRecord]) -> None:
        """Give each record without an `id` a new one. Ids come from Redis in blocks of
        `ID_BLOCK`, so most calls cost no round trip; an id is never handed out twice."""
        missing = [record for record in records if "id" not in record]
        async with self._lock:
            while len(self._ids) < len(missing):
                block = max(ID_BLOCK, len(missing) - len(self._ids))
                take = TakeBlock(
                    self.keys.HISTORY_SEQ,
                    self.keys.HISTORY_SEQ_SERVER,
                    block,
                    ID_GAP,
                    self.id_floor,
                )
                last = int(await take.run(self.redis))
                self._ids.extend(range(last - block + 1, last + 1))
            for record in missing:
                record["id"] = self._ids.popleft()


@dataclass
class SeedIds(Script):
    """Raises the record id `counter` to `top`, the largest id PostgreSQL holds: after a
    Redis that lost its data, ids must not start again below those already stored."""

    LUA = """
    local current = tonumber(redis.call('GET', counter) or '0')
    if current < tonumber(top) then redis.call('SET', counter, top) end
    return 1
    """
    counter: Key
    top: int
