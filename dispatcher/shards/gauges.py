"""The fleet's gauges of `/metrics`, read at scrape from every shard at once: queues,
history backlogs, Redis memory and the deliveries parked in lanes added up, the fullest
Redis, the blocked lanes, the live workers and the projects served late (`lateness.py`;
from the home shard).

Every read is asked at once and bounded by `DISPATCHER_REDIS_TIMEOUT` as a whole: a scrape
with Redis frozen answers within that (it asked each shard, then each server's memory, one
after another, each within the timeout: 10 s with one Redis, Prometheus's own scrape
timeout, so the scrape failed and `dispatcher_redis_up` went stale instead of 0; review).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

from dispatcher import lateness, metrics
from dispatcher.connections import REDIS_ERRORS
from dispatcher.shards.views import merged_lanes
from dispatcher.status import Lanes, count_live_workers, read_lanes

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from dispatcher.services import Services
    from dispatcher.shards.router import Router

__all__ = ["fleet_gauges"]

T = TypeVar("T")
_Shard = tuple[Lanes, tuple[int, float], tuple[int, float], int]  # (+ queue, backlog, parked)


async def fleet_gauges(router: Router) -> None:
    """Set the fleet's gauges. A shard or server that does not answer in time is left
    out and the others' are set, then its error is raised (`dispatcher_redis_up 0`): one
    shard away froze every gauge, the others' fullest Redis with them (review). None
    answering, every gauge keeps its last value."""
    bound, home = router.settings.redis_timeout, router.home
    shards, memories, _ = await asyncio.gather(
        _each(bound, [_shard(services) for services in router.shards]),
        _each(bound, [_memory(services) for services in _servers(router)]),
        _each(bound, [_home(home.redis, home.keys)]),
    )
    read = [found for found in shards if not isinstance(found, BaseException)]
    away = [found for found in (*shards, *memories) if isinstance(found, BaseException)]
    if not read:  # no shard answered: the gauges keep their last values
        raise away[0]
    metrics.QUEUE_DEPTH.set(sum(queue[0] for _, queue, _, _ in read))
    metrics.QUEUE_OLDEST_SECONDS.set(max(queue[1] for _, queue, _, _ in read))
    metrics.HISTORY_BACKLOG.set(sum(backlog[0] for _, _, backlog, _ in read))
    metrics.HISTORY_BACKLOG_AGE.set(max(backlog[1] for _, _, backlog, _ in read))
    metrics.LANES_PARKED.set(sum(parked for *_, parked in read))
    nodes = [node for found in memories if isinstance(found, list) for node in found]
    used = [int(node.get("used_memory", 0)) for node in nodes]
    limits = [int(node.get("maxmemory", 0)) for node in nodes]
    metrics.REDIS_USED_MEMORY.set(sum(used))
    metrics.REDIS_MAX_MEMORY.set(sum(limits))
    shares = [u / m for u, m in zip(used, limits, strict=True) if m]  # of those with a limit
    metrics.REDIS_FULLEST.set(max(shares, default=0.0))
    blocked = merged_lanes([lanes for lanes, *_ in read])
    metrics.LANES_BLOCKED.set(blocked.blocked)
    metrics.LANES_BLOCKED_OLDEST_SECONDS.set(blocked.oldest_s)
    if away:
        raise away[0]


async def _each(bound: float, reads: list[Awaitable[T]]) -> list[T | BaseException]:
    """Each of `reads`, all at once, within `bound` s: an outage's error in its place (any
    other error is raised)."""

    async def one(read: Awaitable[T]) -> T:
        async with asyncio.timeout(bound):
            return await read

    found = await asyncio.gather(*(one(read) for read in reads), return_exceptions=True)
    for result in found:
        if isinstance(result, BaseException) and not isinstance(result, REDIS_ERRORS):
            raise result
    return found


async def _shard(services: Services) -> _Shard:
    lanes = await read_lanes(services.redis, services.keys, limit=1)
    queue, backlog = await services.queue.depth(), await services.history.backlog()
    # (counted by the lanes' scripts, `lane_lua.FIRST_THERE`; below 0 after lanes that a
    # version before filled, which it did not count, were emptied)
    parked = int(await services.redis.get(services.keys.LANES_PARKED) or 0)
    return lanes, queue, backlog, max(0, parked)


async def _memory(services: Services) -> list[dict[str, Any]]:
    """INFO memory of the shard's server; a cluster client answers with one dict per node."""
    info = await services.redis.info("memory")
    if "used_memory" in info or not all(isinstance(v, dict) for v in info.values()):
        return [info]
    return list(info.values())


async def _home(redis: Any, keys: Any) -> None:
    """The live workers and the projects served late, from the home shard (its error is
    the home shard's own read's, counted there)."""
    metrics.WORKERS_LIVE.set(await count_live_workers(redis, keys))
    await lateness.export(redis, keys)


def _servers(router: Router) -> list[Services]:
    """One shard per Redis client (a cluster's INFO already covers its every node)."""
    return list({id(s.redis): s for s in router.shards}.values())
