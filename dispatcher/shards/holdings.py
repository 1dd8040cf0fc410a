"""What of a project one shard holds (its callbacks, roles and Redis history): which
projects a shard holds, whether it holds one, and removing one from it (a move's end,
its drops first put with those on its new shard)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dispatcher.auth import ALL_PROJECTS
from dispatcher.errors import NotFound
from dispatcher.history.redis import RedisHistory
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.registry.copies import callback_ids
from dispatcher.worker.record import DROPS_KEPT_S, KEPT_ENTRIES

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.services import Services

__all__ = ["copy_drops", "forget", "glob_escaped", "holds", "projects_on", "thaw"]


async def projects_on(services: Services) -> set[str]:
    """The projects with callbacks, roles or Redis history on one shard."""
    k, found = services.keys, set()
    for prefix in (k.PROJECT_CALLBACKS_PREFIX, k.ROLES_PREFIX):
        async for key in services.redis.scan_iter(match=f"{prefix}*", count=1000):
            found.add(key.decode().removeprefix(prefix))
    async for index in services.redis.sscan_iter(k.HISTORY_INDEXES, count=1000):
        found.add(index.decode().removeprefix(k.HISTORY_INDEX_PREFIX).split(":", 1)[0])
    return found - {PLATFORM_PROJECT, ALL_PROJECTS}


async def holds(services: Services, project: str) -> bool:
    """Whether `project` has callbacks, roles or Redis history on this shard."""
    k = services.keys
    if await services.redis.exists(k.project_callbacks(project), k.roles(project)):
        return True
    of_project = glob_escaped(f"{k.HISTORY_INDEX_PREFIX}{project}:") + "*"
    async for _ in services.redis.sscan_iter(k.HISTORY_INDEXES, match=of_project, count=1000):
        return True
    return False


def glob_escaped(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


async def forget(services: Services, project: str, alive: Callable[[], None]) -> None:
    """Remove a moved project's callbacks, roles and Redis history from its old shard,
    `alive` checked before each step (it raises to stop: a mover's lease may be lost)."""
    for callback_id in await callback_ids(services.registry, project):
        alive()
        try:
            await services.registry.delete(project, callback_id, mover=True)  # (frozen)
        except NotFound:
            continue
    alive()
    await services.redis.delete(services.keys.roles(project), services.keys.dropped(project))
    alive()
    if isinstance(services.history, RedisHistory):
        from dispatcher.history.moving import forget_project

        await forget_project(services.history, project, alive)


async def copy_drops(src: Services, dst: Services, project: str) -> int:
    """Put the project's drops on `src` after those on `dst` (made there since its flip),
    but for those there already (copied by a move that died before it cleaned
    `src`); returns how many. Its list stays as bounded, and expires as, on any shard."""
    theirs = await src.redis.lrange(src.keys.dropped(project), 0, -1)  # type: ignore[misc]
    key = dst.keys.dropped(project)
    there = set(await dst.redis.lrange(key, 0, -1)) if theirs else set()  # type: ignore[misc]
    new = [entry for entry in theirs if entry not in there]

    def write(pipe: Pipeline) -> None:
        pipe.rpush(key, *new)
        pipe.ltrim(key, 0, KEPT_ENTRIES - 1)
        pipe.expire(key, DROPS_KEPT_S)

    if new:
        await run_pipeline(dst.redis, write)
    return len(new)


async def thaw(services: Services, project: str) -> None:
    """Remove the freeze of the project's callbacks from this shard (a move's mark)."""
    await services.redis.delete(services.keys.callbacks_frozen(project))
