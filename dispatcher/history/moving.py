"""A project's Redis history taken from one shard to another (`dispatcher shards move`):
its records read page by page (each index oldest first, by score), written on the new shard by the
store's own `record` (which builds every index again), then removed from the old shard like
the retention sweep removes records. Record ids are unique over all shards, so a record
copied twice is stored once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from dispatcher.history.kept import with_bodies
from dispatcher.history.redis import RedisHistory
from dispatcher.history.redis_upkeep import Sweep
from dispatcher.lua import run_pipeline

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.history.record import AttemptRecord

__all__ = ["copy_project", "forget_project"]

PAGE = 500


async def _indexes(history: RedisHistory, project_id: str) -> list[str]:
    """The (project, event, url) indexes of a project (project ids hold no separator)."""
    prefix = history.keys.HISTORY_INDEX_PREFIX + project_id + ":"
    found = [i.decode() async for i in history.redis.sscan_iter(history.keys.HISTORY_INDEXES)]
    return [index for index in found if index.startswith(prefix)]


async def _records(
    history: RedisHistory, project_id: str
) -> AsyncIterator[list[tuple[AttemptRecord, bool]]]:
    """The project's records, a page at a time, oldest first in each index, each with
    whether its delivery gave up."""
    keys, redis = history.keys, history.redis
    dead = {int(m) for m in await redis.zrange(keys.history_dead(project_id), 0, -1)}
    for index in await _indexes(history, project_id):
        async for ids in _oldest_first(redis, index):
            raws = await redis.mget([keys.history_record(i) for i in ids])
            raws = await with_bodies(redis, keys, raws)  # the new shard keeps them again
            records = [orjson.loads(raw) for raw in raws if raw]
            yield [(record, int(record["id"]) in dead) for record in records]


async def _oldest_first(redis: Redis, index: str) -> AsyncIterator[list[int]]:
    """The record ids of `index`, oldest first, a page at a time, each page read from the
    score the one before ended at (its members at that score passed over). Oldest first:
    the new shard lists a delivery's attempts in the order they are written, and takes
    the last as its newest (the dead letters, a window's redelivery); a scan's hash order
    wrote a failure after the success that followed it, and a delivered delivery was a
    dead letter again, sent again by a window's redelivery (review). By score, not by
    position: the old shard's retention sweep removes an index's oldest records meanwhile,
    and a page read by position then began as many records late, records within the
    retention never copied and removed from the old shard, gone from both (review)."""
    low: float | str = "-inf"
    passed: set[bytes] = set()  # the members at `low` already read
    while True:
        scored = await redis.zrangebyscore(
            index, low, "+inf", start=0, num=PAGE + len(passed), withscores=True
        )
        fresh = [(member, score) for member, score in scored if member not in passed]
        if not fresh:
            return
        if ids := [int(m) for m, _ in fresh if m.isdigit()]:  # (not the index's mark)
            yield ids
        top = fresh[-1][1]
        passed = {m for m, score in fresh if score == top} | (passed if top == low else set())
        low = top


async def copy_project(
    source: RedisHistory, target: RedisHistory, project_id: str, alive: Callable[[], None]
) -> int:
    """Write every record of the project on `source` to `target`; returns how many.
    `alive` is checked before each page's write (it raises to stop: a mover's lease)."""
    copied = 0
    async for page in _records(source, project_id):
        alive()

        def write(pipe: Pipeline, page: list[tuple[AttemptRecord, bool]] = page) -> None:
            for record, dead in page:
                target.record(pipe, record, dead=dead)

        await run_pipeline(target.redis, write)
        copied += len(page)
    return copied


async def forget_project(history: RedisHistory, project_id: str, alive: Callable[[], None]) -> int:
    """Remove every record of the project, its indexes (its failures index too, whatever
    it holds) and dead letters; returns how many records. (A delivery's attempts index
    expires with its records.) `alive` is checked before each page's removal."""
    keys, redis, removed = history.keys, history.redis, 0
    for index in await _indexes(history, project_id):
        sweep = Sweep.of(keys, index, "+inf", PAGE)
        while True:
            alive()
            if not (n := int(await sweep.run(redis))):
                break
            removed += n
    alive()
    dead_key = keys.history_dead(project_id)
    ids = await redis.zrange(dead_key, 0, -1)

    def drop_dead(pipe: Pipeline) -> None:
        if ids:
            pipe.zrem(keys.HISTORY_DEAD, *ids)
        pipe.delete(dead_key, keys.history_failed(project_id))
        pipe.srem(keys.HISTORY_DEAD_KEYS, dead_key)

    await run_pipeline(redis, drop_dead)
    return removed
