"""The history backlog in bytes (PostgreSQL history): what the stream of records waiting
for PostgreSQL takes of a shard's Redis, and the bound past which workers stop claiming.

The records' count alone did not bound Redis: a record takes ~1.3 KB, or ~150 KB (a body of
backslashes, each escaped twice, and a 20 KB answer of quotes), so `DISPATCHER_HISTORY_
BACKLOG_LIMIT`'s 1,000,000 were ~150 GB of one tenant's, Redis full long before (review).

The bytes are `MEMORY USAGE` of the stream with every node read (`SAMPLES 0`: a sample
reads the oldest nodes only, and missed big records behind small ones: 150 MB read for
447 MB). That costs Redis ~0.1 ms for 2,000 records of 150 KB, but 43 ms for 1,000,000 of
1.3 KB (measured), so a worker reads them again only once `WALK_DUTY` times its last
read's time has passed (at most 1 % of Redis' time a worker, `BACKLOG_EVERY_S` apart at
best); in between they are the last read's bytes per record times the records now.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["MAXMEMORY_SHARE", "NO_MAXMEMORY_BYTES", "StreamBytes", "bound"]

# The share of a Redis' maxmemory the stream may take: the queue and the rest keep the others
MAXMEMORY_SHARE = 0.25
# The stream's bound in a Redis with no maxmemory (1 GiB: ~800,000 records of 1.3 KB)
NO_MAXMEMORY_BYTES = 1 << 30
WALK_DUTY = 100

log = structlog.get_logger("dispatcher.worker")


@dataclass
class StreamBytes:
    """One shard's stream, as this worker last read it."""

    at: float = -math.inf  # when (monotonic)
    took: float = 0.0  # how long the read took
    bytes: int = 0
    count: int = 0  # how many records it held then
    refused: bool = False  # MEMORY USAGE or INFO refused (an ACL): no byte bound

    async def over(self, redis: Redis, stream: str, count: int) -> tuple[int, bool]:
        """The bytes of `stream`, which holds `count` records now, and whether they are past
        the bound; (0, False) when Redis refuses to tell (logged once)."""
        try:
            size = await self.read(redis, stream, count)
            return size, size >= await bound(redis)
        except ResponseError as exc:
            if not self.refused:
                log.warning("history.backlog_bytes_unread", error=str(exc))
            self.refused = True
            return 0, False

    async def read(self, redis: Redis, stream: str, count: int) -> int:
        """The bytes of `stream`, which holds `count` records now."""
        start = time.monotonic()
        if start - self.at < WALK_DUTY * self.took and self.count:
            return self.bytes * count // self.count
        self.bytes = int(await redis.memory_usage(stream, samples=0) or 0)
        self.at, self.took, self.count = start, time.monotonic() - start, count
        return self.bytes


async def bound(redis: Redis) -> int:
    """The stream's bytes past which workers stop claiming: `MAXMEMORY_SHARE` of the Redis'
    maxmemory (of a cluster's nodes, the smallest), else `NO_MAXMEMORY_BYTES`."""
    info: dict[str, Any] = await redis.info("memory")
    nodes = [info] if "maxmemory" in info else [n for n in info.values() if isinstance(n, dict)]
    limits = [int(node.get("maxmemory", 0)) for node in nodes]
    return (
        int(min(limit for limit in limits if limit) * MAXMEMORY_SHARE)
        if any(limits)
        else NO_MAXMEMORY_BYTES
    )
