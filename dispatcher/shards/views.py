"""The operator's views over every shard, and the history reads that cross shards.

A project's history is on its shard, read there. What is not one project's is read from
every shard and merged: the status (queues added up; workers and statistics, which every
worker writes to the home shard, read there), failing callbacks, dead letters across
projects, the gauges of `/metrics`, and the history of the platform-wide callbacks, whose
deliveries each shard makes for its own projects. With the PostgreSQL history every record
is in one database: those reads go there once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, TypeVar

from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import InvalidInput, NotFound, Unavailable, Unplaced
from dispatcher.failing import SHOWN_PER_PROJECT, merged
from dispatcher.failing import read as read_failing
from dispatcher.history.window import check_page, unknown_record
from dispatcher.models import PLATFORM_PROJECT, HistoryPage, RedeliveryResult
from dispatcher.shards.lanes import hold_source
from dispatcher.status import Lanes, read_lanes

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dispatcher.failing import FailingView
    from dispatcher.models import HistoryRecord
    from dispatcher.redelivery import Pace
    from dispatcher.services import Services
    from dispatcher.shards.router import Router
    from dispatcher.status import Status

__all__ = [
    "answers",
    "dead_letters",
    "failing",
    "history_page",
    "holder",
    "redeliver",
    "redeliver_failed",
    "status",
]

T = TypeVar("T")

NONE_ANSWERED = "no shard answered within DISPATCHER_REDIS_TIMEOUT"
# The platform's history merged over the shards: a page is read as each shard's newest
# records down to it, in memory (1.5-9 KB a record, ~150 KB at most), so how deep it may
# go is bounded (page 50 of 20, page 10 of 100).
SPREAD_DEPTH = 1_000
Query = tuple[str, str, str, str | None, str | None]  # project, url, event, start, end


def _spread(router: Router, project_id: str | None) -> bool:
    """Whether `project_id`'s records (None: every project's) are on every shard's Redis."""
    return (
        router.sharded
        and not router.settings.history_url
        and (project_id is None or project_id == PLATFORM_PROJECT)
    )


async def answers(
    router: Router,
    step: Callable[[Services], Awaitable[T]],
    silent: list[int] | None,
    shards: list[Services] | None = None,
) -> list[T]:
    """`step` on every shard (or `shards`) at once; with `silent`, each bounded by the
    Redis timeout as a whole, and a shard that does not answer is left out, its position
    added to `silent` (the operator's views show the others: one shard down made them
    fail whole, review); without, its error is raised."""

    bound = None if silent is None else router.settings.redis_timeout

    async def one(services: Services) -> T:
        async with asyncio.timeout(bound):
            return await step(services)

    asked = router.shards if shards is None else shards
    found = await asyncio.gather(*(one(s) for s in asked), return_exceptions=silent is not None)
    kept: list[T] = []
    for services, result in zip(asked, found, strict=True):
        if isinstance(result, REDIS_ERRORS):
            assert silent is not None
            silent.append(services.shard.index)
        elif isinstance(result, BaseException):
            raise result
        else:
            kept.append(result)
    if shards is None and not kept:  # no view at all: not an empty one (review)
        raise Unavailable(NONE_ANSWERED)
    return kept


async def status(router: Router, silent: list[int] | None = None) -> Status:
    """`Services.status` of the home shard, with every shard's queue and callbacks (with
    `silent`: those of the shards that answer, see `answers`; the home shard silent, the
    first that answers gives the rest, the view failed whole: review. Its live workers and
    attempts are then that shard's, none, `of_home` False: the home shard holds them, so a
    caller shows them as unknown). Unavailable when none answers."""
    found, others = None, router.shards
    while found is None and others:
        first, others = others[0], others[1:]
        found = next(iter(await answers(router, _status, silent, [first])), None)
    if found is None:
        raise Unavailable(NONE_ANSWERED)
    found = dataclasses.replace(found, of_home=first is router.home)

    async def of_shard(s: Services) -> tuple[tuple[int, float, str], int, Lanes]:
        depth = await s.queue.oldest_due()
        return (
            depth,
            int(await s.redis.zcard(s.keys.CALLBACKS_DISABLED)),
            await read_lanes(s.redis, s.keys),
        )

    each = await answers(router, of_shard, silent, others)
    due = [(at, job) for (_, at, job), _, _ in each]
    oldest = max([(found.oldest_due_s, found.oldest_due_job), *due])
    late: list[int] | None = None if silent is None else []
    answered = [s for s in router.shards if s.shard.index not in (silent or ())]
    failing_now = await failing(router, silent=late, shards=answered)  # (asked once each)
    if silent is not None and late:
        silent += [index for index in late if index not in silent]
    return dataclasses.replace(
        found,
        queue_due=found.queue_due + sum(n for (n, _, _), _, _ in each),
        oldest_due_s=oldest[0],
        oldest_due_job=oldest[1],
        failing=failing_now,
        disabled=found.disabled + sum(n for _, n, _ in each),
        lanes=merged_lanes([found.lanes, *(lanes for _, _, lanes in each)]),
    )


LANES_SHOWN = 20


def merged_lanes(found: list[Lanes]) -> Lanes:
    """The blocked lanes of every shard: counted, the oldest first."""
    shown = sorted((lane for one in found for lane in one.shown), key=lambda lane: lane.since_ms)
    return Lanes(
        sum(one.blocked for one in found),
        max((one.oldest_s for one in found), default=0.0),
        tuple(shown[:LANES_SHOWN]),
    )


async def failing(
    router: Router,
    project_id: str | None = None,
    rows: int = SHOWN_PER_PROJECT,
    silent: list[int] | None = None,
    shards: list[Services] | None = None,
) -> FailingView:
    """Callbacks whose last deliveries failed, over every shard (or `shards`), by project
    (`dispatcher.failing`): the projects with the most failures first, the worst `rows`
    of each; of `project_id` alone when given (every shard asked: a moving project's are
    on two). A platform-wide callback failing on several shards is shown and counted once,
    with its worst count (with `silent`: over the shards that answer, see `answers`)."""
    found = await answers(
        router, lambda s: read_failing(s.redis, s.keys, project_id, rows), silent, shards
    )
    return merged(found, rows)


async def dead_letters(
    router: Router, project_id: str | None = None, limit: int = 50, silent: list[int] | None = None
) -> list[HistoryRecord]:
    """The latest deliveries that gave up, newest first (of one project, or all; with
    `silent`, of the shards that answer, see `answers`)."""
    if not _spread(router, project_id):
        return await router.of(project_id or PLATFORM_PROJECT).dead_letters(project_id, limit)
    found = await answers(router, lambda s: s.dead_letters(project_id, limit), silent)
    return _newest([r for records in found for r in records])[:limit]


def _newest(records: list[HistoryRecord]) -> list[HistoryRecord]:
    return sorted(records, key=lambda r: (r.created_time, r.id), reverse=True)


async def history_page(
    router: Router,
    project_id: str,
    url: str,
    event: str,
    start_time: str | None = None,
    end_time: str | None = None,
    page: int = 1,
    page_size: int = 20,
) -> HistoryPage:
    """The seed's query, on the project's shard; for the platform-wide callbacks, merged
    over every shard: each shard's count and first page read, then, unless the page is
    past the end, each shard's newest records up to the page asked for (`SPREAD_DEPTH` at
    most: a page deeper is a 400). `page` and `page_size` are checked as on one shard: a
    page size of 0 divided by zero, and a page of 0 or less was an empty page (review)."""
    if not _spread(router, project_id):
        return await router.of(project_id).history_page(
            project_id, url, event, start_time, end_time, page, page_size
        )
    largest = router.settings.history_max_page_size
    size = check_page(page, page_size, largest)
    offset, wanted = (page - 1) * size, page * size
    query: Query = (project_id, url, event, start_time, end_time)
    firsts = await asyncio.gather(
        *(s.history_page(*query, 1, min(wanted, largest)) for s in router.shards)
    )
    count, records = sum(first.count for first in firsts), []
    if offset < count:
        if wanted > (deepest := max(SPREAD_DEPTH, largest)):
            raise InvalidInput(_too_deep(page, size, deepest), param="page")
        found = await asyncio.gather(
            *(
                _newest_of(s, first, wanted, query)
                for s, first in zip(router.shards, firsts, strict=True)
            )
        )
        records = _newest([r for shard in found for r in shard])[offset:wanted]
    return HistoryPage(
        records=records, count=count, total_pages=-(-count // size), page_size=size, page=page
    )


def _too_deep(page: int, size: int, deepest: int) -> str:
    return (
        f"page {page} of {size} is past the newest {deepest} records that the "
        "platform's history merges over the shards: narrow the window (startTime, endTime)"
    )


async def _newest_of(
    services: Services, first: HistoryPage, wanted: int, query: Query
) -> list[HistoryRecord]:
    """One shard's newest `wanted` records of the window, `first` its first page."""
    records, number = list(first.records), 1
    while len(records) < wanted and number < first.total_pages:
        number += 1
        records += (await services.history_page(*query, number, first.page_size)).records
    return records[:wanted]


async def holder(router: Router, record_id: int, project_id: str | None) -> Services:
    """The services of the shard a history record's project lives on (whose callback a
    redelivery needs): the project's when named; else the record's, read from the one
    database (PostgreSQL) or searched for over every shard (Redis)."""
    if project_id and project_id != PLATFORM_PROJECT:
        return router.of(project_id)
    if not _spread(router, project_id):
        return router.of((await router.home.history.get(record_id, project_id)).project_id)
    for services in router.shards:
        try:
            await services.history.get(record_id, project_id)
        except NotFound:
            continue
        return services
    raise NotFound(unknown_record(record_id, project_id))


async def redeliver_failed(
    router: Router,
    project_id: str,
    url: str,
    event: str,
    start_time: str | None = None,
    end_time: str | None = None,
    *,
    on_queued: Callable[[int], None] | None = None,
    pace: Pace | None = None,
) -> RedeliveryResult:
    """`Services.redeliver_failed` on the project's shard (on each, for the platform's).
    Refused (Unavailable) while the project moves, checked again before each batch:
    until the move's last history copy, its new shard does not see what was redelivered on
    the old one (its attempts, its queued-once keys), and would send it again, and what the
    old shard queues after the move's drain is not moved."""
    if _spread(router, project_id):  # the platform's: never moved
        result = RedeliveryResult(queued=0)
        for services in router.shards:
            result += await services.redeliver_failed(
                project_id, url, event, start_time, end_time, on_queued=on_queued, pace=pace
            )
        return result
    services = router.of(project_id)

    async def still(done: RedeliveryResult | None = None) -> None:
        if router.sharded:
            await _not_moving(router, services, project_id, done)

    await still()
    return await services.redeliver_failed(
        project_id, url, event, start_time, end_time, on_queued=on_queued, check=still, pace=pace
    )


async def redeliver(router: Router, project_id: str, record_id: int) -> str:
    """`Services.redeliver` on the project's shard; refused (Unavailable) while the project
    moves, as a window's redelivery is: it went on during a move, unchecked (review)."""
    services = router.of(project_id)
    if router.sharded and not _spread(router, project_id):
        await _not_moving(router, services, project_id, None, "a record's redelivery")
    return await services.redeliver(record_id, project_id)


async def _not_moving(
    router: Router,
    services: Services,
    project_id: str,
    done: RedeliveryResult | None,
    what: str = "a window's redelivery",
) -> None:
    """Unavailable while `project_id` moves (or its placement moved off `services`'
    shard), or a move of it to that shard is not finished."""
    here = router.of(project_id) is services and not router.placement.moving(project_id)
    if here and await hold_source(services, project_id) is None:
        return
    so_far = "" if done is None else f" ({done.queued} queued before it stopped)"
    home = router.home
    if here and not await home.redis.exists(home.keys.move_lease(project_id)):
        at = router.shards.index(services)
        raise Unplaced(
            f"project {project_id!r}: a move of it to shard {at} died after its flip; "
            f"finish it (dispatcher shards move {project_id} --to {at}), then redeliver"
            f"{so_far}"
        )
    raise Unplaced(
        f"project {project_id!r} is moving to another shard: {what} waits for the move's "
        "end; try again in a minute (a move that stopped is named by `dispatcher shards "
        f"list`: run it again){so_far}"
    )


async def _status(services: Services) -> Status:
    return await services.status()
