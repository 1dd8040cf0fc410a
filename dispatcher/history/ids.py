"""Record ids, from one Redis counter whatever the backend, handed out in blocks."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from dispatcher import keys

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis.asyncio import Redis

__all__ = ["ID_BLOCK", "RecordIds"]

# record ids reserved per round trip
ID_BLOCK = 1000


class RecordIds:
    """Gives records their ids from `dispatcher:history:seq`."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._ids: collections.deque[int] = collections.deque()
        self._lock = asyncio.Lock()

    async def assign(self, records: Iterable[dict[str, Any]]) -> None:
        """Give each record without an `id` a new one. Ids come from Redis in blocks of
        `ID_BLOCK`, so most calls cost no round trip; an id is never handed out twice."""
        missing = [record for record in records if "id" not in record]
        async with self._lock:
            while len(self._ids) < len(missing):
                block = max(ID_BLOCK, len(missing) - len(self._ids))
                last = int(await self.redis.incrby(keys.HISTORY_SEQ, block))
                self._ids.extend(range(last - block + 1, last + 1))
            for record in missing:
                record["id"] = self._ids.popleft()
