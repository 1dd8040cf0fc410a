"""Callbacks copied between shards, ids kept: a platform-wide callback's copies (one on
every shard), a moved project's callbacks. A copy is the callback's hash as stored (its
secrets still encrypted) and its place in the listing, upsert and match keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher import keys
from dispatcher.failing import failing_names
from dispatcher.lua import run_pipeline
from dispatcher.registry.scripts import PutCallback

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis.asyncio.client import Pipeline

    from dispatcher.registry.store import Registry

__all__ = ["callback_ids", "project_rows", "put_rows", "queue_put", "read_rows"]

Row = dict[str, str]


async def read_rows(registry: Registry, callback_ids: Sequence[int]) -> list[Row]:
    """The stored hashes of callbacks (empty for one that is gone), in one round trip."""
    if not callback_ids:
        return []

    def read(pipe: Pipeline) -> None:
        for cid in callback_ids:
            pipe.hgetall(registry.keys.callback(cid))

    answers = await run_pipeline(registry.redis, read)
    return [{k.decode(): v.decode() for k, v in raw.items()} for raw in answers]


async def callback_ids(registry: Registry, project_id: str) -> list[int]:
    """Every callback id of a project, its pipelines' included."""
    found = await registry.redis.zrange(registry.keys.project_callbacks(project_id), 0, -1)
    return [int(cid) for cid in found]


async def project_rows(registry: Registry, project_id: str) -> list[Row]:
    """The stored hashes of every callback of a project (`callback_ids`), those gone
    between the two reads left out."""
    return [
        row for row in await read_rows(registry, await callback_ids(registry, project_id)) if row
    ]


def queue_put(registry: Registry, pipe: Pipeline, row: Row, *, reset: bool) -> None:
    """Queue the write of `row` (a callback's hash from another shard) on `pipe`; `reset`
    starts its failure count again."""
    k = registry.keys
    cid, project, pipeline = row["id"], row["projectId"], row.get("pipelineId") or None
    scope = keys.scope(project, pipeline)
    listings = [k.project_callbacks(project)]
    if pipeline:
        listings.append(k.pipeline_callbacks(project, pipeline))
    PutCallback(
        callback=k.callback(cid),
        unique=k.callback_unique(scope),
        match=k.match(scope, row["event"]),
        disabled=k.CALLBACKS_DISABLED,
        **failing_names(k),
        health=k.health(cid),
        ordered_flag=k.lanes_ordered(project),  # its events (every project's) numbered
        version=k.registry_version(project),
        listings=listings,
        callback_id=cid,
        field=keys.callback_unique_field(row["event"], row["url"]),
        enabled=row.get("enabled", "1"),
        updated_ms=row.get("updatedTime", "0"),
        reset="1" if reset else "0",
        ordered="1" if row.get("orderBy") else "0",
        callback_prefix=k.CALLBACK_PREFIX,
        values=[item for field in row.items() for item in field],
    ).queue_on(pipe)


async def put_rows(registry: Registry, rows: Sequence[Row], *, reset: bool = False) -> None:
    """Write `rows` (callbacks' hashes from another shard), ids kept, in one round trip."""

    def put_all(pipe: Pipeline) -> None:
        for row in rows:
            queue_put(registry, pipe, row, reset=reset)

    if rows:
        await run_pipeline(registry.redis, put_all)
