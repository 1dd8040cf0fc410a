"""Ordered delivery through a move: a project's lanes finish on its old shard before any
of its lanes starts on the new one (see `dispatcher.worker.lanes`).

The numbers that order a project's events are its shard's, so a lane cannot run on two
shards at once. While the project moves, its new shard *holds* its lanes
(`keys.lanes_hold`): its events queue, fan out and enter their lanes there, its unordered
deliveries go on, but no head of its lanes is attempted (each is looked at again every
second). Its old shard keeps what is ordered: the mover leaves there the deliveries that
sit in a lane and, while the project has an ordered callback there, the events still to
fan out (they are numbered there), and waits until they have all ended, in order, on the
old shard's workers. Then it lets the new shard go: the hold is lifted and the heads that
waited are due at once. Everything the new shard's lanes hold came after the move's flip,
so after everything the old lanes held.

A mover that dies leaves the hold: the project's lanes wait on the new shard (its
unordered deliveries do not) until the move is run again, which finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.clock import now_ms
from dispatcher.keys import SEP
from dispatcher.lua import Key, Script
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from dispatcher.services import Services

__all__ = ["hold", "hold_source", "lanes_left", "let_go", "ordered_on"]

HELD_FROM = "from:"  # a hold's value: the shard the project comes from
LET_GO_PAGE = 1000  # the waiting heads a hold's lift makes due in one script call
LET_GO_PAGES = 10_000  # then left to their rechecks: a fleet putting heads back as fast


@dataclass
class LetGo(Script):
    """Lifts a project's hold (`lift`: the first page's call only); the first `page` heads
    that waited for it are due at `now_ms`, off its waiting set (as a lane's earlier
    events' end wakes them: `lane_lua.wake`). Returns how many: fewer than `page`, the
    last page."""

    LUA = """
    if lift == '1' then redis.call('DEL', hold) end
    local ids = redis.call('ZRANGE', waiting, 0, tonumber(page) - 1)
    for _, id in ipairs(ids) do redis.call('ZADD', queue, 'LT', now_ms, id) end
    if #ids > 0 then redis.call('ZREM', waiting, unpack(ids)) end
    return #ids
    """
    hold: Key
    waiting: Key
    queue: Key
    now_ms: int
    page: int
    lift: int


async def hold(services: Services, project_id: str, source: int) -> None:
    """The project's lanes on this shard wait (it is moving here from shard `source`)."""
    await services.redis.set(services.keys.lanes_hold(project_id), f"{HELD_FROM}{source}")


async def hold_source(services: Services, project_id: str) -> int | None:
    """The shard the project is moving here from while its lanes here wait (-1: a hold of
    the version before, which did not say), or None."""
    value = await services.redis.get(services.keys.lanes_hold(project_id))
    if value is None:
        return None
    source = value.decode().removeprefix(HELD_FROM)
    return int(source) if value.startswith(HELD_FROM.encode()) and source.isdigit() else -1


async def let_go(services: Services, project_id: str, *, page: int = LET_GO_PAGE) -> int:
    """The project's lanes on this shard go on; returns how many heads were waiting. The
    first call lifts the hold; the waiting heads are made due `page` at a time, one script
    call each, until a page comes back short (all at once, a project's million waiting
    heads held its shard's Redis 2.14 s). A head no page has reached yet is not stuck:
    each waits in the queue, looked at again within `worker.lanes.HELD_RECHECK_S`, and
    no hold stops it once lifted; a hold set again meanwhile (the project moved here
    again by another mover) is not lifted by the later pages. At most `LET_GO_PAGES`
    pages: workers putting waiting heads back as fast as the pages take them would keep
    every page full."""
    k, released, lift = services.keys, 0, 1
    for _ in range(LET_GO_PAGES):
        done = LetGo(
            hold=k.lanes_hold(project_id),
            waiting=k.lanes_waiting(project_id),
            queue=k.QUEUE,
            now_ms=now_ms(),
            page=page,
            lift=lift,
        )
        count = int(await done.run(services.redis))
        released, lift = released + count, 0
        if count < page:
            break
    return released


async def ordered_on(services: Services, project_id: str) -> bool:
    """Whether the project's events are numbered on this shard (it, or the platform, has
    an ordered callback there)."""
    k = services.keys
    flags = [k.lanes_ordered(project_id), k.lanes_ordered(PLATFORM_PROJECT)]
    return bool(await services.redis.exists(*flags))


async def lanes_left(services: Services, project_id: str) -> int:
    """How many lanes of the project's events still hold a delivery on this shard (a
    lane's key is `{receiver}:{project}:{key}`; an empty lane has no key)."""
    prefix, left = services.keys.LANE_PREFIX, 0
    async for name in services.redis.scan_iter(match=f"{prefix}*", count=1000):
        parts = name.decode().removeprefix(prefix).split(SEP, 2)
        left += len(parts) == 3 and parts[1] == project_id
    return left
