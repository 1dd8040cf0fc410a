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
from typing import TYPE_CHECKING

from dispatcher.lua import Lua

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis.asyncio import Redis

    from dispatcher.history.record import AttemptRecord
    from dispatcher.keys import Keys

__all__ = ["ID_BLOCK", "ID_GAP", "RecordIds"]

# record ids reserved per round trip
ID_BLOCK = 1000
ID_GAP = 100_000_000

# KEYS: the counter, the server that handed out the last block. ARGV: block size, gap, the
# first id of the shard's range (see `dispatcher/shard.py`). Returns the block's last id. A
# counter that was never used needs no gap (a fresh Redis).
_BLOCK = Lua("""
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[3])
end
local server = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local last = redis.call('GET', KEYS[2])
if last ~= server then
  redis.call('SET', KEYS[2], server)
  if last or redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('INCRBY', KEYS[1], ARGV[2])
  end
end
return redis.call('INCRBY', KEYS[1], ARGV[1])
""")


class RecordIds:
    """Gives records their ids from `dispatcher:history:seq`."""

    def __init__(self, redis: Redis, keys: Keys, id_floor: int = 0) -> None:
        self.redis = redis
        self.id_floor = id_floor
        self.keys = (keys.HISTORY_SEQ, keys.HISTORY_SEQ_SERVER)
        self._ids: collections.deque[int] = collections.deque()
        self._lock = asyncio.Lock()

    async def assign(self, records: Iterable[AttemptRecord]) -> None:
        """Give each record without an `id` a new one. Ids come from Redis in blocks of
        `ID_BLOCK`, so most calls cost no round trip; an id is never handed out twice."""
        missing = [record for record in records if "id" not in record]
        async with self._lock:
            while len(self._ids) < len(missing):
                block = max(ID_BLOCK, len(missing) - len(self._ids))
                last = int(await _BLOCK(self.redis, self.keys, [block, ID_GAP, self.id_floor]))
                self._ids.extend(range(last - block + 1, last + 1))
            for record in missing:
                record["id"] = self._ids.popleft()
