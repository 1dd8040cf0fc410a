"""How far a claim looks into the queue, on a real Redis: as far as its budget for the
busy projects with room, a page (its scout) for a project new to the worker, what just
came due for those and for the quiet (busy, with room, found with nothing due), since one
project's backlog at its share must neither hide another's jobs nor cost every claim a
walk through thousands of entries it may not take."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.jobs import EventJob
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.queue import Queue
from dispatcher.settings import Settings
from dispatcher.worker.claim_script import JUST_DUE_SLACK_MS, SWEEP_ENTRIES
from dispatcher.worker.claims import Budgets, Claims
from dispatcher.worker.served import WIDE_BUDGET, Served
from dispatcher.worker.shares import Shares

if TYPE_CHECKING:
    from dispatcher.services import Services
    from dispatcher.worker.engine import Engine


async def due_for_a_while(redis: Redis, settings: Settings) -> str:
    """Every queued job due 10 s earlier (long before anything just came due); the queue."""
    queue = Keys(settings.queue_name).QUEUE
    for job_id, score in await redis.zrange(queue, 0, -1, withscores=True):
        await redis.zadd(queue, {job_id: score - 10_000})
    return queue


async def enqueue(
    redis: Redis, settings: Settings, project: str, count: int, name: str = "evt"
) -> list[str]:
    """`count` jobs of `project`, due after the jobs enqueued before; their ids (padded:
    the jobs enqueued within a millisecond go by their ids)."""
    await asyncio.sleep(0.002)  # a due time of their own (a tie goes by the id)
    queue = Queue(redis, Keys(settings.queue_name))
    for i in range(count):
        await queue.enqueue(EventJob(f"{name}_{i:03}", project, "BUILD_END"))
    return [f"{project}:{name}_{i:03}" for i in range(count)]


def claims_of(redis: Redis, settings: Settings) -> Claims:
    return Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)


async def claimed_once_beside_a_backlog(
    redis: Redis, settings: Settings, shares: Budgets
) -> Claims:
    """A worker's claims after one claim (so they look at what came due since it) that
    took nothing of projA's 150 jobs, due for a while, with projB quiet."""
    await enqueue(redis, settings, "projA", 150)
    await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    assert await claims.claim(10, scout=20, quiet=["projB"], shares=shares) == []
    return claims


def served_with(redis: Redis, settings: Settings, *running: str) -> Served:
    """A shard as a worker serves it, its claims alone, with `running` jobs started: a
    worker of 6 slots (two busy projects: a share of 2 each)."""
    shares = Shares(slots=6, max_per_host=100)
    for job_id in running:
        shares.job_started(job_id)
    served = Served.__new__(Served)
    served.claims = claims_of(redis, settings)
    served.engine = cast("Engine", SimpleNamespace(shares=shares))
    served.services = cast("Services", SimpleNamespace(shard=SimpleNamespace(index=0)))
    return served


async def test_a_claim_fills_a_busy_projects_room_past_its_scout_and_scouts_no_further(
    settings: Settings, redis: Redis
) -> None:
    """Once the projects with room have taken theirs, a claim looks at `scout` entries
    for a project new to the worker, not at its whole budget: projA's backlog (at its
    share) hides projC's job (neither among the oldest due nor the newest) from a narrow
    scout, not from a wide one; projB, busy with room, is found behind the same backlog by
    the narrow one."""
    await enqueue(redis, settings, "projA", 150)
    await enqueue(redis, settings, "projB", 2)
    await enqueue(redis, settings, "projA", 150, name="more")
    await enqueue(redis, settings, "projC", 1)
    await enqueue(redis, settings, "projA", 120, name="last")
    claims = claims_of(redis, settings)
    took = await claims.claim(10, scout=20, shares=(1, {"projA": 3, "projB": 0}))
    assert [c.job_id for c in took] == ["projA:evt_000", "projA:evt_001", "projA:evt_002"]
    took = await claims.claim(10, scout=20, shares=(1, {"projA": 0, "projB": 2}))
    assert sorted(c.job_id for c in took) == ["projB:evt_000", "projB:evt_001"]
    took = await claims.claim(10, scout=2000, shares=(1, {"projA": 0, "projB": 0}))
    assert [c.job_id for c in took] == ["projC:evt_000"]


async def test_a_project_a_claim_finds_new_has_its_room_filled_past_the_scout(
    settings: Settings, redis: Redis
) -> None:
    """A project new to the worker, found by the scout, may take `newcomer` jobs: the same
    claim looks on for the rest of them, past the scout, as it does for a busy one's, and
    no further once they are taken (projD, a page behind, is left to a later claim)."""
    await enqueue(redis, settings, "projC", 1)
    await enqueue(redis, settings, "projA", 150)
    await enqueue(redis, settings, "projC", 1, name="more")
    await enqueue(redis, settings, "projA", 120, name="more")
    await enqueue(redis, settings, "projD", 1)
    await enqueue(redis, settings, "projA", 120, name="last")
    took = await claims_of(redis, settings).claim(10, scout=20, shares=(2, {"projA": 0}))
    assert [c.job_id for c in took] == ["projC:evt_000", "projC:more_000"]


async def test_without_fair_shares_a_claim_looks_past_its_scout(
    settings: Settings, redis: Redis
) -> None:
    """With fair shares off (newcomer -1) any project may take any job: the scout, which
    only bounds the search for a new project, does not stop the claim."""
    running = await enqueue(redis, settings, "projA", 30)
    await enqueue(redis, settings, "projA", 1, name="more")
    took = await claims_of(redis, settings).claim(10, scout=5, mine=running)
    assert [c.job_id for c in took] == ["projA:more_000"]


async def test_a_project_new_here_whose_job_just_came_due_is_found_behind_any_backlog(
    settings: Settings, redis: Redis
) -> None:
    """A look stopped short reads last what just came due: a project not busy here, whose
    jobs have just come due behind another's backlog longer than the claim's whole
    budget, is found at once (its oldest first), and so is one whose job was due a little
    before the worker's claim before (the writer's clock, or its write on the way), but
    not one due long before that (left to the wide look); a claim before by a clock
    ahead of Redis's now counts as now."""
    await enqueue(redis, settings, "projA", 150)
    queue = await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0})
    assert await claims.claim(10, budget=50, scout=20, shares=shares) == []  # none before
    await enqueue(redis, settings, "projC", 2)
    took = await claims.claim(10, budget=50, scout=20, shares=shares)
    assert [c.job_id for c in took] == ["projC:evt_000"]
    [old, late] = await enqueue(redis, settings, "projD", 2)
    since = claims.claimed_at_ms
    await redis.zadd(queue, {old: since - JUST_DUE_SLACK_MS - 50})  # still behind projA's
    await redis.zadd(queue, {late: since - JUST_DUE_SLACK_MS + 50})
    took = await claims.claim(10, budget=50, scout=20, shares=(1, {"projA": 0, "projC": 0}))
    assert [c.job_id for c in took] == [late]
    claims.claimed_at_ms += 60_000  # a clock that ran ahead (Redis's, before a failover)
    await enqueue(redis, settings, "projE", 1)
    took = await claims.claim(10, budget=50, scout=20, shares=(1, {"projA": 0, "projC": 0}))
    assert [c.job_id for c in took] == ["projE:evt_000"]


async def test_a_failed_claim_forgets_the_time_of_the_one_before(
    settings: Settings, redis: Redis
) -> None:
    """Redis may come back with another clock (a failover): after a claim that failed,
    the next claim does not look for what just came due by the old one."""
    served = served_with(redis, settings)
    assert await served.claim(10, [], poll_delay=0.02) == []
    assert served.claims.claimed_at_ms > 0
    await redis.set(Keys(settings.queue_name).QUEUE, "not a sorted set")  # a claim fails
    assert await served.claim(10, [], poll_delay=0.02) is None
    assert served.claims.claimed_at_ms == 0


async def range_reads(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("zrange", "zrangebyscore", "zrevrangebyscore")
    )


async def test_a_claim_that_saw_the_whole_due_range_looks_at_nothing_more(
    settings: Settings, redis: Redis
) -> None:
    """What came due since the last claim is read only when the look stopped short of the
    due range's end, and there was a claim before: the worker's first claim, stopped by
    its scout, reads its page; one that saw it all (its second page short) asks nothing
    more; one stopped by its scout reads one range more."""
    await enqueue(redis, settings, "projA", 30)
    claims = claims_of(redis, settings)
    before = await range_reads(redis)
    assert await claims.claim(10, scout=5, shares=(2, {"projA": 0})) == []
    assert await range_reads(redis) == before + 1  # a page of 10: none before it
    assert len(await claims.claim(10, scout=50, shares=(2, {}))) == 2
    assert await range_reads(redis) == before + 3  # a page of 10, then one of 100: short
    await enqueue(redis, settings, "projA", 200, name="more")
    assert await claims.claim(10, scout=5, shares=(2, {"projA": 0})) == []
    assert await range_reads(redis) == before + 5  # a page of 10, then what came due


async def test_what_came_due_keeps_to_the_shares_and_passes_over_the_workers_jobs(
    settings: Settings, redis: Redis
) -> None:
    """What came due since the last claim is taken within the shares, passing over the
    ids the worker runs: projC, at its share now, takes none of it, and the worker's own
    job there is passed over. A look stopped by its budget (here, with fair shares off,
    by the jobs the worker runs) reads it too."""
    await enqueue(redis, settings, "projC", 1)
    await enqueue(redis, settings, "projA", 150)
    claims = claims_of(redis, settings)
    assert [c.job_id for c in await claims.claim(1)] == ["projC:evt_000"]
    [mine] = await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projC", 1, name="more")
    took = await claims.claim(10, scout=20, shares=(1, {"projA": 0, "projC": 0}), mine=[mine])
    assert took == []
    await enqueue(redis, settings, "projC", 1, name="last")
    running = [f"projA:evt_{i:03}" for i in range(150)]
    took = await claims.claim(10, budget=50, mine=[*running, mine])
    assert [c.job_id for c in took] == ["projC:more_000", "projC:last_000"]


async def backdate(redis: Redis, settings: Settings, job_ids: list[str], like: str) -> None:
    """Make `job_ids` due when `like` is: in the middle of the due range."""
    queue = Keys(settings.queue_name).QUEUE
    score = await redis.zscore(queue, like)
    assert score is not None
    await redis.zadd(queue, dict.fromkeys(job_ids, float(score)))


async def test_a_quiet_project_is_looked_for_only_where_its_jobs_come_due(
    settings: Settings, redis: Redis
) -> None:
    """A busy project with room that a claim before found with nothing due (`quiet`) is
    not looked for through another's backlog: its job in the middle of projA's, due for a
    while, is left to the next wide look (named but not quiet, it is found); one of its
    jobs that just came due is found at once. A claim with no claim before (so no look at
    what came due: a worker's first, or one after a failed claim) looks for it as for any
    busy project."""
    await enqueue(redis, settings, "projA", 150)
    await enqueue(redis, settings, "projA", 150, name="more")
    middle = await enqueue(redis, settings, "projB", 2)
    await backdate(redis, settings, middle, like="projA:evt_120")
    await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0, "projB": 1})
    took = await claims.claim(10, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == middle[:1]  # no claim before
    assert await claims.claim(10, scout=20, quiet=["projB"], shares=shares) == []
    assert [c.job_id for c in await claims.claim(10, scout=20, shares=shares)] == middle[1:]
    [just] = await enqueue(redis, settings, "projB", 1, name="new")
    took = await claims.claim(10, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [just]


async def test_what_came_due_ends_with_its_newest_page_unless_read_whole(
    settings: Settings, redis: Redis
) -> None:
    """A project new here finds its job at the newest end of what just came due though a
    quiet project has room: the read of what came due stops once the quiet one's room is
    filled, or finds the budget spent (here by projD, busy with room, looked for through
    the backlog), and its newest page is read then."""
    shares = (1, {"projA": 0, "projB": 1})
    claims = await claimed_once_beside_a_backlog(redis, settings, shares)
    [quiet_job] = await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projA", 150, name="burst")
    [new_job] = await enqueue(redis, settings, "projC", 1)
    took = await claims.claim(10, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [quiet_job, new_job]
    await enqueue(redis, settings, "projB", 1, name="more")
    await enqueue(redis, settings, "projA", 150, name="again")
    [newer] = await enqueue(redis, settings, "projE", 1)
    shares = (1, {"projA": 0, "projB": 1, "projD": 1})
    took = await claims.claim(10, budget=150, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [newer]  # projB's, behind 150, waits


async def test_a_quiet_projects_jobs_are_found_in_a_burst_that_just_came_due(
    settings: Settings, redis: Redis
) -> None:
    """While a quiet project has room, what just came due is read whole, oldest first, a
    page at a time: its jobs among pages of projA's that came due with them are found (the
    newest page alone holds none of them), as many as its room, and the read stops once
    its room is filled (the newest page is read then, for a project new here). The budget
    bounds that read too: one that runs out first finds none of them. (Each claim looks
    from the first claim's time, however long the writes took.)"""
    shares = (1, {"projA": 0, "projB": 2})
    claims = await claimed_once_beside_a_backlog(redis, settings, shares)
    since = claims.claimed_at_ms
    await enqueue(redis, settings, "projA", 150, name="burst")
    [first] = await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projA", 150, name="mid")
    [second, _] = await enqueue(redis, settings, "projB", 2, name="more")
    await enqueue(redis, settings, "projA", 250, name="after")
    assert await claims.claim(10, budget=210, scout=20, quiet=["projB"], shares=shares) == []
    before = await range_reads(redis)
    claims.claimed_at_ms = since
    took = await claims.claim(10, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [first, second]
    assert await range_reads(redis) == before + 7  # 10, 100 oldest; 4 pages of 100; newest


async def test_a_workers_claim_finds_a_busy_projects_job_behind_a_page_of_others(
    settings: Settings, redis: Redis
) -> None:
    """Through `Served.claim`, between its wide looks: projB (busy, with room) has a job
    behind 150 of projA's (at its share), found at once; projC's, further (a project not
    busy here, its job neither among the oldest due nor the newest), waits for the next
    wide look. A wide look that came back short counts (projD waits for the next), one
    that filled its share does not (projE is found by the claim after it)."""
    await enqueue(redis, settings, "projA", 150)
    await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projA", 120, name="more")
    await enqueue(redis, settings, "projC", 1)
    await enqueue(redis, settings, "projA", 120, name="last")
    served = served_with(redis, settings, "projA:r0", "projA:r1", "projB:r0")

    async def claim(share: int) -> list[str]:
        took = await served.claim(share, [], poll_delay=0.02)
        assert took is not None
        return [c.job_id for c in took]

    served.wide_at = time.monotonic() + 60  # just looked wide
    assert await claim(10) == ["projB:evt_000"]
    served.engine.shares.job_started("projB:evt_000")  # projB at its share now too
    served.wide_at = 0.0  # a wide look is due
    wide_at = served.wide_at
    assert await claim(10) == ["projC:evt_000"]
    assert served.wide_at > wide_at  # it came back short: it counts
    later = [
        *await enqueue(redis, settings, "projD", 1),
        *await enqueue(redis, settings, "projE", 1),
    ]
    await backdate(redis, settings, later, like="projA:more_060")  # not just come due
    served.wide_at = time.monotonic() + 60  # as if the wide look were just now
    assert await claim(10) == []
    served.wide_at = 0.0  # a wide look is due
    assert await claim(1) == ["projD:evt_000"]  # its share filled: still wide
    assert await claim(10) == ["projE:evt_000"]


async def test_a_workers_claim_looks_for_a_quiet_project_no_further_than_a_page(
    settings: Settings, redis: Redis
) -> None:
    """Through `Served.claim`: projF, busy with room, has nothing due at a wide look, so
    the claims after it look for projF no further than a page; its job in the middle of
    projA's backlog waits for the next wide look."""
    await enqueue(redis, settings, "projA", 150)
    await due_for_a_while(redis, settings)
    served = served_with(redis, settings, "projA:r0", "projA:r1", "projF:r0")
    assert await served.claim(10, [], poll_delay=0.02) == []  # wide: projF has none due
    assert served.quiet == frozenset({"projF"})
    [job] = await enqueue(redis, settings, "projF", 1)
    await backdate(redis, settings, [job], like="projA:evt_120")
    served.wide_at = time.monotonic() + 60  # as if the wide look were just now
    assert await served.claim(10, [], poll_delay=0.02) == []
    served.wide_at = 0.0  # a wide look is due
    took = await served.claim(10, [], poll_delay=0.02)
    assert took is not None
    assert [c.job_id for c in took] == [job]


async def backlog(redis: Redis, settings: Settings, project: str, count: int) -> None:
    """`count` jobs of `project` (`{project}:e0000`, ...), due a millisecond apart."""
    keys = Keys(settings.queue_name)
    queue = Queue(redis, keys)
    jobs = [EventJob(f"e{i:04}", project, "BUILD_END") for i in range(count)]
    await run_pipeline(redis, lambda pipe: queue.push_many(pipe, jobs))
    first = await redis.zscore(keys.QUEUE, f"{project}:e0000")
    assert first is not None
    spread = {f"{project}:e{i:04}": first - count + i for i in range(count)}
    await redis.zadd(keys.QUEUE, spread)


async def test_sweeping_claims_find_a_job_past_the_budget_a_step_further_each(
    settings: Settings, redis: Redis
) -> None:
    """A job deeper in the due range than a claim's budget, behind jobs no one may take
    (projA at its share) and long due, is found by the claims that sweep: each looks
    `SWEEP_ENTRIES` past the budget, from where the one before stopped (its offset, when
    the entry it passed over last has left the due range since); one that reached the
    range's end has the next start again. A claim that does not sweep leaves the place
    alone."""
    await backlog(redis, settings, "projA", 1500)
    [deep] = await enqueue(redis, settings, "projC", 1)
    await backdate(redis, settings, [deep], like="projA:e1300")
    await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0})
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert claims.sweep_at == 110 + SWEEP_ENTRIES  # pages of 10 and 100, then the sweep's
    assert await claims.claim(10, budget=100, shares=shares) == []
    assert claims.sweep_at == 110 + SWEEP_ENTRIES
    queue = Keys(settings.queue_name).QUEUE
    await redis.zadd(queue, {claims.sweep_after: now_ms() + 60_000})  # running elsewhere
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert claims.sweep_at == 110 + 2 * SWEEP_ENTRIES
    took = await claims.claim(10, budget=100, sweep=True, shares=shares)
    assert [c.job_id for c in took] == [deep]
    assert claims.sweep_at == 0


async def test_a_workers_wide_looks_sweep_and_its_narrow_ones_do_not(
    settings: Settings, redis: Redis
) -> None:
    """Through `Served.claim`: a wide look steps the sweep on past the whole budget (and
    finds projC's job there, deeper than 2,000 entries of projA's backlog), a narrow one
    leaves it where it was."""
    await backlog(redis, settings, "projA", 2700)
    [deep] = await enqueue(redis, settings, "projC", 1)
    await backdate(redis, settings, [deep], like="projA:e2600")
    await due_for_a_while(redis, settings)
    served = served_with(redis, settings, "projA:r0", "projA:r1", "projB:r0")

    async def claim() -> list[str]:
        took = await served.claim(10, [], poll_delay=0.02)
        assert took is not None
        return [c.job_id for c in took]

    assert await claim() == []  # wide
    swept = served.claims.sweep_at
    assert swept > WIDE_BUDGET
    served.wide_at = time.monotonic() + 60  # as if the wide look were just now
    assert await claim() == []  # narrow
    assert served.claims.sweep_at == swept
    served.wide_at = 0.0  # a wide look is due
    assert await claim() == [deep]


async def test_a_sweeping_claim_that_saw_the_whole_range_starts_the_next_again(
    settings: Settings, redis: Redis
) -> None:
    """A sweeping claim that went on from where the budget stopped it to the range's end
    saw all of it: it reads nothing of what came due, and the next sweep starts again
    (where the budget ends); so does one that started past the range's end, and the next
    after one whose budget alone saw the whole range."""
    await backlog(redis, settings, "projA", 300)
    await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0})
    assert await claims.claim(10, budget=100, shares=shares) == []  # a claim before
    claims.sweep_at = 50
    before = await range_reads(redis)
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert await range_reads(redis) == before + 4  # pages of 10 and 100, the sweep's two
    assert claims.sweep_at == 0
    claims.sweep_at = 1000  # further than the range now reaches
    before = await range_reads(redis)
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert claims.sweep_at == 0
    assert await range_reads(redis) == before + 3  # 10, 100, the newest (the sweep's: none)
    claims.sweep_at = 50
    assert await claims.claim(10, budget=1000, sweep=True, shares=shares) == []
    assert claims.sweep_at == 0


async def test_a_quiet_projects_job_deep_in_what_came_due_is_found_by_rank(
    settings: Settings, redis: Redis
) -> None:
    """Deep in what came due (past the first pages, read by rank, not walked to), a quiet
    project's job is found behind 700 of projA's that came due with it, neither among the
    oldest due nor the newest."""
    shares = (1, {"projA": 0, "projB": 1})
    claims = await claimed_once_beside_a_backlog(redis, settings, shares)
    since = claims.claimed_at_ms
    await backlog(redis, settings, "projA", 700)
    [deep] = await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projA", 150, name="after")
    claims.claimed_at_ms = since
    before = await range_reads(redis)
    took = await claims.claim(10, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [deep]
    assert await range_reads(redis) == before + 11  # 10 and 100 oldest, 8 pages, newest


async def test_a_look_by_rank_keeps_to_the_due_range_as_it_takes_jobs(
    settings: Settings, redis: Redis
) -> None:
    """Deep in the due range (read by rank), each job taken leaves the range: a job due
    in 3 s (before the taken jobs' leases end, so ranked between them and the range) is
    left alone though its project has room."""
    await backlog(redis, settings, "projA", 600)
    taken = await enqueue(redis, settings, "projB", 3)
    await enqueue(redis, settings, "projA", 97, name="tail")
    queue = await due_for_a_while(redis, settings)
    [later] = await enqueue(redis, settings, "projB", 1, name="later")
    score = await redis.zscore(queue, later)
    assert score is not None
    await redis.zadd(queue, {later: score + 3000})
    claims = claims_of(redis, settings)
    took = await claims.claim(10, shares=(1, {"projA": 0, "projB": 4}))
    assert [c.job_id for c in took] == taken


async def test_a_sweep_goes_on_from_the_entry_it_passed_last_though_the_range_moved(
    settings: Settings, redis: Redis
) -> None:
    """Between two sweeping claims, 300 jobs ahead of the sweep leave the queue (another
    worker ended them): the next sweep goes on right past the entry the one before passed
    over last, where that entry is now, not from its old offset (which now lies 300
    entries further on, past projC's job). A wide claim filled before its sweep keeps
    that entry for the next."""
    await backlog(redis, settings, "projA", 1500)
    [deep] = await enqueue(redis, settings, "projC", 1)
    await backdate(redis, settings, [deep], like="projA:e0700")
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0})
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert claims.sweep_after == b"projA:e0609"
    [first] = await enqueue(redis, settings, "projD", 1)
    await backdate(redis, settings, [first], like="projA:e0000")
    took = await claims.claim(1, budget=100, sweep=True, shares=shares)  # full: no sweep
    assert [c.job_id for c in took] == [first]
    assert claims.sweep_after == b"projA:e0609"
    await redis.zrem(Keys(settings.queue_name).QUEUE, *(f"projA:e{i:04}" for i in range(300)))
    took = await claims.claim(10, budget=100, sweep=True, shares=shares)
    assert [c.job_id for c in took] == [deep]


async def test_a_sweep_goes_on_from_an_entry_whose_id_is_not_utf8(
    settings: Settings, redis: Redis
) -> None:
    """The entry a sweep passed over last is another client's job with an id that is not
    UTF-8: the next sweep goes on from it as it is. Decoded, it raised out of the
    worker's loop, its claimed batch left leased (review)."""
    await backlog(redis, settings, "projA", 1500)
    [deep] = await enqueue(redis, settings, "projC", 1)
    await backdate(redis, settings, [deep], like="projA:e0700")
    queue = Keys(settings.queue_name).QUEUE
    score = await redis.zscore(queue, "projA:e0609")
    assert score is not None
    await redis.zrem(queue, "projA:e0609")
    await redis.zadd(queue, {b"projA:e\xff": score})
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0})
    assert await claims.claim(10, budget=100, sweep=True, shares=shares) == []
    assert claims.sweep_after == b"projA:e\xff"
    took = await claims.claim(10, budget=100, sweep=True, shares=shares)
    assert [c.job_id for c in took] == [deep]


async def test_what_came_due_passes_over_what_the_claim_took_without_counting_it(
    settings: Settings, redis: Redis
) -> None:
    """A claim moves the jobs it took out of the due range once, as it ends: its look at
    what came due reads again those its first look took (projD's five), and passes them
    by as taken, not as entries passed over against its budget. The first look passed
    over 205 entries (150 long due, then 55 of the burst), the look at what came due 95
    more in its first page: a budget of 301 reads the next page, with projB's job in it
    (projD's five counted too, the budget was spent at 305)."""
    shares = (1, {"projA": 0, "projB": 1, "projD": 5})
    claims = await claimed_once_beside_a_backlog(redis, settings, shares)
    busy = await enqueue(redis, settings, "projD", 5)
    await enqueue(redis, settings, "projA", 150, name="burst")
    [quiet_job] = await enqueue(redis, settings, "projB", 1)
    await enqueue(redis, settings, "projA", 150, name="after")  # the newest page: none of it
    took = await claims.claim(10, budget=301, scout=20, quiet=["projB"], shares=shares)
    assert [c.job_id for c in took] == [*busy, quiet_job]


async def test_a_sweep_that_took_jobs_leaves_the_next_where_the_range_is_now(
    settings: Settings, redis: Redis
) -> None:
    """The place a sweep stopped at is an offset into the range as the next claim finds it:
    without the jobs the sweep took, which leave the range as the claim ends. Here it took
    projC's three and passed over six pages of 100 less them: 707 entries past the budget's
    110, not 710."""
    await backlog(redis, settings, "projA", 1500)
    deep = await enqueue(redis, settings, "projC", 3)
    await backdate(redis, settings, deep, like="projA:e0300")
    await due_for_a_while(redis, settings)
    claims = claims_of(redis, settings)
    shares = (1, {"projA": 0, "projC": 3})
    took = await claims.claim(10, budget=100, sweep=True, shares=shares)
    assert [c.job_id for c in took] == deep
    assert claims.sweep_at == 110 + 6 * 100 - 3
