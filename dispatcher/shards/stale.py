"""A stale copy of a project: its callbacks, roles or Redis history on a shard it does not
live on, as a move of the version before left it when several shards held the project
(`dispatcher shards move --came-from` finishes the move from one of them; the others'
copies stay). `dispatcher shards forget P --shard N` removes one, on the operator's word,
under the project's move lease, so that no move of it runs meanwhile."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dispatcher.auth import ALL_PROJECTS
from dispatcher.errors import InvalidInput, Unavailable
from dispatcher.history.moving import copy_project
from dispatcher.history.redis import RedisHistory
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.shards.drain import confirmed
from dispatcher.shards.holdings import copy_drops, forget, holds
from dispatcher.shards.lanes import hold_source
from dispatcher.shards.lease import MoveLease
from dispatcher.shards.left import left_on

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.services import Services
    from dispatcher.shards.router import Router

__all__ = ["forget_copy"]


async def forget_copy(
    router: Router, project: str, index: int, say: Callable[[str], None] = print
) -> bool:
    """Remove `project`'s copy from shard `index`, where it does not live, its Redis
    history and its drops (after those where it lives) copied first to where it lives;
    returns whether that shard held any of it.
    Refused: the shard it lives on; a project whose own shard holds nothing of it (the
    copy may be its only one); a project moving, or whose move died after its flip
    (`dispatcher shards move` finishes or undoes it, and the copy may be where that move
    came from); a shard where jobs or lanes of it are left (they run there: forget the
    copy once they end)."""
    if project in (PLATFORM_PROJECT, ALL_PROJECTS) or ":" in project:
        raise InvalidInput(f"{project!r} is not a project that lives on one shard")
    if not 0 <= index < len(router.shards):
        raise InvalidInput(f"there is no shard {index}")
    token = f"forget:{time.time_ns()}"
    lease = MoveLease(router.home, project, token, lease_s=router.settings.move_lease, say=say)
    async with lease.held():
        home = await _where_it_lives(router, project, index)
        stale = router.shards[index]
        if left := await left_on(stale, project):
            raise Unavailable(
                f"{project}: shard {index} still runs {left} of its job(s) or lane(s): "
                "forget the copy once they end"
            )
        if not await holds(stale, project):
            say(f"{project}: shard {index} holds nothing of it")
            return False
        await lease.fence()
        await _keep_history(stale, router.shards[home], project, lease.alive)
        lease.alive()
        await copy_drops(stale, router.shards[home], project)  # `forget` deletes them
        await confirmed(
            router.shards[home], f"{project}'s history and drops", "the stale copy stays"
        )
        await forget(stale, project, lease.alive)
        say(f"{project}: its copy on shard {index} is gone (it lives on shard {home})")
        return True


async def _keep_history(
    stale: Services, home: Services, project: str, alive: Callable[[], None]
) -> None:
    """Copy the stale copy's Redis history where the project lives first: records its
    leftover jobs wrote there are its own (a record there already is written again as it
    is)."""
    if isinstance(stale.history, RedisHistory) and isinstance(home.history, RedisHistory):
        await copy_project(stale.history, home.history, project, alive)


async def _where_it_lives(router: Router, project: str, index: int) -> int:
    """The shard `project` lives on, once it is sure that shard `index` can only hold a
    stale copy of it (see `forget_copy`'s refusals)."""
    placement = router.placement
    await placement.load()
    placed = placement.explicit.get(project)
    if placed is not None and placed.moving_to is not None:
        raise InvalidInput(
            f"{project} is moving (shard {placed.index} -> {placed.moving_to}): finish "
            f"or undo that first (dispatcher shards move {project} --to N)"
        )
    home = placed.index if placed is not None else placement.shard_of(project)
    if index == home:
        raise InvalidInput(f"{project} lives on shard {index}: that is no stale copy")
    if home >= len(router.shards):
        raise Unavailable(f"{project} is placed on shard {home}, which is not listed")
    if await hold_source(router.shards[home], project) is not None:
        raise InvalidInput(
            f"{project}: a move of it to shard {home} died after its flip: finish it "
            f"first (dispatcher shards move {project} --to {home}); shard {index} may "
            "be where it came from"
        )
    if not await holds(router.shards[home], project):
        raise InvalidInput(
            f"{project}: shard {home}, where it lives, holds nothing of it: the copy on "
            f"shard {index} may be its only one (to keep it: dispatcher shards move "
            f"{project} --to {index})"
        )
    return home
