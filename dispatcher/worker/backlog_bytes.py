"""The history backlog in bytes (PostgreSQL history): what the stream of records waiting
for PostgreSQL takes of a shard's Redis, and the bound past which workers stop claiming.

The records' count alone did not bound Redis: a record takes ~1.3 KB, or ~150 KB (a body of
backslashes, each escaped twice, and a 20 KB answer of quotes), so `DISPATCHER_HISTORY_
BACKLOG_LIMIT`'s 1,000,000 were ~150 GB of one tenant's, Redis full long before (review).

The bytes are `MEMORY USAGE` of the stream with every node read (`SAMPLES 0`: a sample
reads the oldest nodes only, and missed big records behind small ones: 150 MB read for
447 MB). That costs Redis ~0.1 ms for 2,000 records of 150 KB, but 43 ms for 1,000,000 of
1.3 KB (measured), so the fleet reads them once a while: the worker that finds no read
kept (`{stream}:bytes`, "bytes records") and wins the walk (`{stream}:bytes:walk`, SET NX)
reads them and keeps the answer in Redis for `WALK_DUTY` times the read's time (1 s at
least): at most 1 % of Redis' time, however many workers check. In between every worker
takes the kept read's bytes per record times the records now (one GET a check); one that
lost the walk takes its own last answer meanwhile.

An empty stream takes no read at all (0 bytes: the GET, the walk and `INFO` were sent every
second for nothing by every idle worker). The bound (`INFO memory`) is read at every check
that finds records, in the round trip of the check's XLEN when the check before found some
too (`ask_bound`), so a lowered `maxmemory` is the bound at the next check; on a Redis
Cluster (whose INFO goes to every node) on its own, once in `BOUND_EVERY_S`.

A refusal (an ACL's NOPERM, a command the Redis does not have) is asked again after
`REFUSED_WAIT_S`, twice as long after each refusal up to `REFUSED_WAIT_MAX_S` (it was asked
every second). A reply that means "not now" (Redis full at `maxmemory` refusing the walk's
SET, BUSY with a script, MISCONF: `transient_reply`) is no refusal: the check keeps its last
answer and asks again at the next check (taken for a refusal, it switched the bound off for
a minute, and up to 16, just when Redis was full: review); so does any other error, logged.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from dispatcher.connections import transient_reply

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = ["MAXMEMORY_SHARE", "NO_MAXMEMORY_BYTES", "StreamBytes", "bound", "refusal"]

# The share of a Redis' maxmemory the stream may take: the queue and the rest keep the others
MAXMEMORY_SHARE = 0.25
# The stream's bound in a Redis with no maxmemory (1 GiB: ~800,000 records of 1.3 KB)
NO_MAXMEMORY_BYTES = 1 << 30
WALK_DUTY = 100
WALK_LOCK_MS = 60_000  # a walk's claim (its worker killed mid-walk: another walks then)
# a cluster's bound (INFO of every node) is read again after this many seconds
BOUND_EVERY_S = 30.0
REFUSED_WAIT_S, REFUSED_WAIT_MAX_S = 60.0, 960.0

log = structlog.get_logger("dispatcher.worker")


@dataclass
class StreamBytes:
    """One shard's stream, as this worker last knew it."""

    bytes: int = 0  # the last read's
    count: int = 0  # how many records the stream held then
    refused: bool = False  # MEMORY USAGE or INFO refused (an ACL): no byte bound
    limit: int = 0  # the bound, as last read (0: not yet)
    seen: int = 0  # records in the stream at the last check
    answer: tuple[int, bool] = (0, False)  # the last check's: kept while Redis says not now
    _limit_until: float = 0.0  # a cluster's: when to read the bound again (monotonic)
    _ask_after: float = 0.0  # refused: when to ask again (monotonic)
    _refused_wait: float = REFUSED_WAIT_S
    _failing: bool = False  # an error (neither refusal nor "not now") said since the last read

    def ask_bound(self, pipe: Pipeline, redis: Redis) -> bool:
        """Queue `INFO memory` on the check's pipeline, with its XLEN (one round trip), when
        the stream held records at the last check (an empty one asks nothing), unless Redis
        refused it (asked again later) or is a cluster; its reply goes to `over`'s `info`."""
        if not self.seen or time.monotonic() < self._ask_after or isinstance(redis, RedisCluster):
            return False
        pipe.info("memory")
        return True

    async def over(
        self, redis: Redis, stream: str, count: int, info: Any = None
    ) -> tuple[int, bool]:
        """The bytes of `stream`, which holds `count` records now, and whether they are past
        the bound; (0, False) for an empty stream, with no command, and when Redis refuses
        to tell (logged once; asked again after a wait that doubles). `info`: the `INFO
        memory` reply (or error) `ask_bound` queued, else the bound is read here."""
        now, self.seen = time.monotonic(), count
        if count == 0 or now < self._ask_after:
            self.answer = 0, False
            return self.answer
        try:
            size = await self.read(redis, stream, count)
            await self._bound(redis, info, now)
        except ResponseError as exc:
            return self._unread(exc, now)
        self.refused, self._refused_wait, self._failing = False, REFUSED_WAIT_S, False
        self.answer = size, size >= self.limit
        return self.answer

    async def _bound(self, redis: Redis, info: Any, now: float) -> None:
        if isinstance(info, Exception):
            raise info
        if info is not None:
            self.limit = share_of(info)
        elif now >= self._limit_until or not isinstance(redis, RedisCluster):
            self.limit, self._limit_until = await bound(redis), now + BOUND_EVERY_S

    def _unread(self, exc: ResponseError, now: float) -> tuple[int, bool]:
        """A read Redis answered with an error: a refusal leaves no byte bound until it is
        asked again; anything else keeps the last answer until the next check."""
        if not refusal(exc):
            if not transient_reply(exc) and not self._failing:  # (said once until a read)
                log.warning("history.backlog_bytes_unread", error=str(exc), refused=False)
                self._failing = True
            return self.answer
        if not self.refused:
            log.warning("history.backlog_bytes_unread", error=str(exc), refused=True)
        self.refused, self._ask_after = True, now + self._refused_wait
        self._refused_wait = min(2 * self._refused_wait, REFUSED_WAIT_MAX_S)
        self.answer = 0, False
        return self.answer

    async def read(self, redis: Redis, stream: str, count: int) -> int:
        """The bytes of `stream`, which holds `count` records now: the fleet's last read,
        scaled to `count`, or one read now (see the module's doc)."""
        kept, walk = f"{stream}:bytes", f"{stream}:bytes:walk"
        if (shared := await redis.get(kept)) is not None:
            self.bytes, self.count = (int(n) for n in shared.split())
        elif await redis.set(walk, 1, nx=True, px=WALK_LOCK_MS):
            start = time.monotonic()
            try:
                size = int(await redis.memory_usage(stream, samples=0) or 0)
            except BaseException:  # (a refusal, an outage): the next check's worker walks
                with contextlib.suppress(Exception):
                    await redis.delete(walk)
                raise
            self.bytes, self.count = size, count
            kept_ms = max(1000, int(WALK_DUTY * (time.monotonic() - start) * 1000))
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(kept, f"{self.bytes} {count}", px=kept_ms)
                pipe.delete(walk)
                await pipe.execute()
        return self.bytes * count // self.count if self.count else self.bytes


async def bound(redis: Redis) -> int:
    """The stream's bytes past which workers stop claiming: `MAXMEMORY_SHARE` of the Redis'
    maxmemory (of a cluster's nodes, the smallest), else `NO_MAXMEMORY_BYTES`."""
    return share_of(await redis.info("memory"))


def share_of(info: dict[str, Any]) -> int:
    """`bound` from an `INFO memory` reply (a cluster's: one per node)."""
    nodes = [info] if "maxmemory" in info else [n for n in info.values() if isinstance(n, dict)]
    limits = [int(node.get("maxmemory", 0)) for node in nodes]
    return (
        int(min(limit for limit in limits if limit) * MAXMEMORY_SHARE)
        if any(limits)
        else NO_MAXMEMORY_BYTES
    )


def refusal(exc: ResponseError) -> bool:
    """Whether Redis refused a command for good rather than for now: an ACL's NOPERM, or a
    command (or subcommand) it does not have (renamed, a proxy's)."""
    said = str(exc).lower()
    return isinstance(exc, NoPermissionError) or any(
        word in said for word in ("noperm", "unknown command", "unknown subcommand")
    )
