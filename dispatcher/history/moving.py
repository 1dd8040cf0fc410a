"""A project's Redis history taken from one shard to another (`dispatcher shards move`):
its records read page by page (a scan of each index), written on the new shard by the
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
    """The project's records, a page at a time, each with whether its delivery gave up.
    Each index is read with ZSCAN, which returns every member that stays in it from the
    scan's start to its end, whatever the old shard's retention sweep removes meanwhile (a
    member met twice is copied twice, stored once). Read by position (ZRANGE, 500 a page),
    a page began as many records late as the sweep had removed before it: those were never
    read, and the move then removed them from the old shard, gone from both (review)."""
    keys, redis = history.keys, history.redis
    dead = {int(m) for m in await redis.zrange(keys.history_dead(project_id), 0, -1)}
    for index in await _indexes(history, project_id):
        cursor: int | None = None
        while cursor != 0:
            cursor, scored = await redis.zscan(index, cursor or 0, count=PAGE)
            if not (ids := [int(m) for m, _ in scored if m.isdigit()]):  # (the index's mark)
                continue
            raws = await redis.mget([keys.history_record(i) for i in ids])
            raws = await with_bodies(redis, keys, raws)  # the new shard keeps them again
            records = [orjson.loads(raw) for raw in raws if raw]
            yield [(record, int(record["id"]) in dead) for record in records]


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
