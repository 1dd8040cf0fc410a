"""`dispatcher shards`: the shards, their load, and growing (see `dispatcher.shards.move`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

import typer

from dispatcher.cli.common import Table, console, err, on_fleet, on_router, partial_end, tagged
from dispatcher.cluster import masters_of
from dispatcher.connections import shown
from dispatcher.shards import views
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.shards.stale import forget_copy
from dispatcher.slots import target_slot

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from dispatcher.placement import Placement
    from dispatcher.services import Services

__all__ = ["shards_app"]

shards_app = typer.Typer(
    help="Shards: list them, put new ones in use (grow), move projects to their shard.",
    no_args_is_help=True,
)


_said: list[str] = []  # what the mover said last (a move stopped by Ctrl+C names it)


def _say(text: str) -> None:
    _said[:] = [text]
    err.print(text)


@contextlib.contextmanager
def _stopped_said(again: Callable[[], str]) -> Iterator[None]:
    """A move stopped by Ctrl+C says where it stopped and what finishes it (`again()`: the
    command). It ended with exit 130 and no word: the project stayed frozen, or its ordered
    deliveries held, and nothing said so (review)."""
    _said.clear()
    try:
        yield
    except KeyboardInterrupt:
        where = f" after: {_said[-1]}" if _said else ""
        left = (
            ". A move stopped before its flip leaves its project's callbacks and roles "
            "frozen, one stopped after it its ordered deliveries held, until it is "
            f"finished: run {again()} (`dispatcher shards list` names the moves under way)"
        )
        err.print(tagged("stopped", "red", where + left))
        raise typer.Exit(130) from None


@shards_app.command("list")
def shards_list() -> None:
    """Each shard: where it is, its queue, the projects placed on it explicitly (a shard
    that does not answer within DISPATCHER_REDIS_TIMEOUT is shown so, and the exit is 3;
    shard 0 silent, what it says is `?`)."""

    async def go(router: Router, silent: list[int]) -> Table:
        placement = router.placement
        table = Table(
            "shard", "redis", "slot (master)", "in use", "jobs due", "pinned here", "moving out"
        )
        cluster = router.home.shard.cluster
        slots = [target_slot(s.shard.index) for s in router.shards] if cluster else []
        masters = await masters_of(router.home.redis, slots) if cluster else []
        # (each shard named: with none answering, the list still shows where they are)
        depths = dict(await views.answers(router, _depth, silent, router.shards))
        read = placement.version is not None  # (shard 0 silent: unread)
        for services in router.shards:
            index = services.shard.index
            pinned = sum(p.index == index for p in placement.explicit.values())
            where = f"{slots[index]} ({masters[index]})" if cluster else "-"
            in_use = _in_use(placement, index)
            table.add_row(
                str(index),
                shown(services.shard.url),
                where,
                in_use if read else "?",
                str(depths[index]) if index in depths else "did not answer",
                str(pinned) if read else "?",
                _moving_out(placement, index) if read else "?",
            )
        return table

    table, silent = on_fleet(go)
    console.print(table)
    partial_end(silent)


def _in_use(placement: Placement, index: int) -> str:
    """Whether the hash places projects on shard `index`; one a grow puts in use says so:
    the projects it moves are frozen until it ends (stopped, until it is run again)."""
    if index < placement.active:
        return "yes"
    if placement.growing is not None and index < placement.growing:
        return "growing (if stopped: grow again)"
    return "not yet (grow)"


def _moving_out(placement: Placement, index: int, most: int = 3) -> str:
    """The projects a move takes off shard `index` now (`P>1`), or that a move left so
    when it stopped (run it again: review)."""
    moving = sorted(f"{p}>{at.moving_to}" for p, at in placement.explicit.items()
                    if at.index == index and at.moving_to is not None)  # fmt: skip
    more = f" (+{len(moving) - most})" if len(moving) > most else ""
    return ", ".join(moving[:most]) + more if moving else "-"


async def _depth(services: Services) -> tuple[int, int]:
    due, _ = await services.queue.depth()
    return services.shard.index, due


@shards_app.command("grow")
def shards_grow(
    rebalance: Annotated[bool, typer.Option(help="Then move the pinned projects")] = False,
) -> None:
    """Put every listed shard in use (run once the longer list is on every process): the
    projects that would move are pinned where they are; new ones use the new shards."""

    async def go(router: Router) -> int:
        mover = Mover(router, _say)
        pinned = await mover.grow()
        return await mover.rebalance() if rebalance else len(pinned)

    then = ", then `dispatcher shards rebalance`" if rebalance else ""
    with _stopped_said(lambda: f"`dispatcher shards grow` again{then}"):
        count = on_router(go)
    console.print(f"{count} project(s) {'moved' if rebalance else 'pinned'}")


@shards_app.command("rebalance")
def shards_rebalance() -> None:
    """Move every project placed explicitly (pinned by `grow`, or by `move`) to where the
    hash puts it, finishing first any move of it that died."""
    with _stopped_said(lambda: "`dispatcher shards rebalance` again"):
        moved = on_router(lambda router: Mover(router, _say).rebalance())
    console.print(f"moved {moved} project(s)")


@shards_app.command("move")
def shards_move(
    project: Annotated[str, typer.Argument(help="Project id")],
    to: Annotated[int, typer.Option(help="The shard to move it to")],
    came_from: Annotated[
        int | None,
        typer.Option(
            help="The shard a move of it that died after its flip came from, when the "
            "refusal says its hold does not name one"
        ),
    ] = None,
) -> None:
    """Move one project (callbacks, roles, queued jobs, Redis history) to a shard and
    place it there explicitly, under load."""
    with _stopped_said(lambda: f"`dispatcher shards move {project} --to {to}` again"):
        on_router(lambda router: Mover(router, _say).move(project, to, came_from))
    console.print(f"{project} is on shard {to}")


@shards_app.command("forget")
def shards_forget(
    project: Annotated[str, typer.Argument(help="Project id")],
    shard: Annotated[int, typer.Option(help="The shard whose stale copy of it to remove")],
) -> None:
    """Remove a stale copy of a project (callbacks, roles, Redis history, its records
    copied first to where it lives) from a shard it does not live on: what a move of the
    version before left when several shards held it. Refused on the shard it lives on,
    when its own shard holds nothing of it, while that shard runs its jobs, while it
    moves, and while a move of it that died after its flip is unfinished."""
    if on_router(lambda router: forget_copy(router, project, shard, _say)):
        console.print(f"{project}: shard {shard} holds nothing of it now")


@shards_app.command("sync")
def shards_sync() -> None:
    """Copy the platform-wide callbacks and the `*` roles of shard 0 to every shard."""
    console.print(f"{on_router(lambda router: Mover(router, _say).sync())} platform callback(s)")
