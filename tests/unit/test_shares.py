"""Fair shares of a worker's slots (in memory, no servers)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dispatcher.worker.claims import Claimed
from dispatcher.worker.served import NARROW_BUDGET, WIDE_BUDGET, WIDE_SCAN_S, Served
from dispatcher.worker.shares import Shares, Slot, project_of


def test_a_job_id_names_its_project_before_the_first_separator() -> None:
    assert project_of("projA:build-1001") == "projA"
    assert project_of("projA:a:b.7:redeliver:0123") == "projA"
    assert project_of("evt_1.7") is None  # an id of an older version


async def test_a_project_alone_holds_half_and_a_share_stays_free_for_the_next() -> None:
    shares = Shares(slots=12, max_per_host=100)
    held = [await shares.admit("projB", f"h{i}:80", wait=0) for i in range(12)]
    assert sum(slot is not None for slot in held) == 6  # 12 // (1 busy + 1)
    victim = await shares.admit("projA", "fast:80", wait=0)
    assert victim is not None  # admitted at once: a share was free
    assert await shares.admit("projB", "other:80", wait=0) is None


async def test_a_host_is_capped_whatever_project_calls_it() -> None:
    shares = Shares(slots=100, max_per_host=3)
    admitted = [await shares.admit(f"p{i}", "slow:80", wait=0) for i in range(5)]
    assert sum(slot is not None for slot in admitted) == 3
    assert await shares.admit("p9", "fast:80", wait=0) is not None


async def test_projects_on_one_host_split_it_and_an_eighth_stays_free_for_the_next() -> None:
    """projB's slow endpoint on a host projA calls too (a shared SaaS host): alone there
    it holds 56 of the host's 64, projA is admitted at once, and as projB's attempts end
    it gets back no more than half of the 56 while projA is busy there."""
    shares = Shares(slots=200, max_per_host=64)
    held = [slot for _ in range(64) if (slot := await shares.admit("projB", "saas:443", 0))]
    assert len(held) == 56  # 64 - 64 // 8
    victims = [slot for _ in range(20) if (slot := await shares.admit("projA", "saas:443", 0))]
    assert len(victims) == 8  # the host's 64 are all held now
    for slot in held[:28]:
        slot.release(5.0)
    assert await shares.admit("projB", "saas:443", wait=0) is None  # 28: (64 - 8) // 2
    more = [slot for _ in range(40) if (slot := await shares.admit("projA", "saas:443", 0))]
    assert len(victims) + len(more) == 28
    assert await shares.admit("projB", "other:443", wait=0) is not None  # its other hosts
    for slot in held[28:] + victims + more:
        slot.release(0.1)
    assert shares.on_host == {"other:443": shares.on_host["other:443"]}


def test_costly_filters_start_only_what_their_share_of_the_loop_has_room_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """projB's filters take 60 ms an event. Alone, nothing holds it back; once projA is
    busy here, projB may start as many jobs as its quarter of the loop has room for: none
    while its ten events' 0.6 s are owed, then 4 (0.25 s / 60 ms) once paid back, never
    100 at once. A short claim is no reason to claim again for it. Cheap filters (under a
    millisecond) are never counted; two costly projects get a sixth each."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    shares = Shares(slots=200, max_per_host=10)
    for _ in range(10):
        shares.filtered("projB", 0.06)
    assert shares.claim_budgets() == (100, {})  # alone here
    shares.job_started("projA:1")
    assert shares.claim_budgets() == (66, {"projA": 99, "projB": 0})
    assert not shares.claim_fell_short([])
    clock[0] += 1.5  # 0.375 s paid back: 0.225 owed
    assert shares.claim_budgets()[1]["projB"] == 0
    clock[0] += 1.0
    assert shares.claim_budgets()[1]["projB"] == 4
    shares.filtered("projB", 0.06)  # what it owed is paid back: 0.06 now
    assert shares.claim_budgets()[1]["projB"] == 3
    shares.filtered("projC", 0.0005)  # cheap
    shares.filtered("projD", 0.05)
    assert shares.pace.share() == pytest.approx(0.5 / 3)
    assert set(shares.claim_budgets()[1]) == {"projA", "projB", "projD"}
    stalled = Shares(slots=200, max_per_host=10)
    stalled.job_started("projA:1")
    stalled.filtered("projE", 5.0)  # the loop stalled meanwhile (a collection): 0.1 at most
    assert stalled.claim_budgets()[1]["projE"] == 1  # (0.25 - 0.1) / 0.1
    unfair = Shares(slots=200, max_per_host=10, fair=False)
    unfair.filtered("projB", 0.06)
    assert unfair.pace.share() == 0.5 and unfair.claim_budgets() == (-1, {})  # none kept


async def test_without_fair_share_only_the_host_cap_holds() -> None:
    shares = Shares(slots=4, max_per_host=3, fair=False)
    admitted = [await shares.admit("projB", f"h{i % 2}:80", wait=0) for i in range(8)]
    assert sum(slot is not None for slot in admitted) == 6
    assert shares.claim_budgets() == (-1, {})


async def test_projects_arriving_in_turn_hold_no_more_than_the_slots_together() -> None:
    """Each project's share is reckoned as it arrives (200 // 2, 200 // 3, ...): before, the
    five took 100 + 66 + 50 + 40 + 33 = 289 attempts on 200 slots. Each takes at most half
    of what the others leave now, and a sixth still finds a slot free at once."""
    shares = Shares(slots=200, max_per_host=64)
    held: list[Slot] = []
    for p in range(5):
        for h in range(8):  # its own hosts
            while (slot := await shares.admit(f"evil{p}", f"h{p}-{h}:80", wait=0)) is not None:
                held.append(slot)
    assert len(held) <= 200, len(held)
    assert sum(slot.project == "evil0" for slot in held) == 100  # alone: its half
    assert await shares.admit("victim", "fast:80", wait=0) is not None


async def test_attempts_in_flight_never_outnumber_the_connection_pool() -> None:
    """A pool smaller than the slots bounds the attempts, with fair shares (a project alone:
    half the pool) and without them (no project rule, the pool all the same)."""
    fair = Shares(slots=200, max_per_host=64, pool=20)
    alone = [slot for h in range(40) if (slot := await fair.admit("p", f"h{h}:80", wait=0))]
    assert len(alone) == 10
    unfair = Shares(slots=200, max_per_host=64, fair=False, pool=20)
    every = [slot for h in range(40) if (slot := await unfair.admit("p", f"h{h}:80", wait=0))]
    assert len(every) == 20
    waiting = asyncio.ensure_future(unfair.admit("p", "h0:80", wait=5))
    await asyncio.sleep(0)
    every[0].release(0.01)  # a connection free: the waiting attempt takes it
    assert await waiting is not None


async def test_an_attempt_over_its_share_gets_a_slot_freed_within_its_wait() -> None:
    shares = Shares(slots=100, max_per_host=1)
    first = await shares.admit("p", "h:80")
    assert first is not None
    waiting = asyncio.create_task(shares.admit("p", "h:80", wait=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    first.release(0.01)
    second = await asyncio.wait_for(waiting, 1)
    assert second is not None and shares.hosts.held == {"h:80": 1}


async def test_waiters_get_freed_slots_in_order_and_none_is_left_behind() -> None:
    shares = Shares(slots=100, max_per_host=1)
    slot = await shares.admit("p", "h:80")
    waiters = [asyncio.create_task(shares.admit("p", "h:80", wait=5)) for _ in range(50)]
    await asyncio.sleep(0.01)
    for i, waiter in enumerate(waiters):
        assert slot is not None
        slot.release(0.001)
        slot = await asyncio.wait_for(waiter, 1)
        assert not any(later.done() for later in waiters[i + 1 :])
    assert slot is not None
    slot.release(0.001)
    assert not shares._waiting and shares.hosts.held == {} and shares.projects.held == {}


async def test_an_attempt_that_finds_no_slot_in_time_holds_none() -> None:
    shares = Shares(slots=100, max_per_host=1)
    assert await shares.admit("p", "h:80") is not None
    assert await shares.admit("p", "h:80", wait=0.01) is None
    assert shares.hosts.held == {"h:80": 1} and not shares._waiting


async def test_a_cancelled_wait_gives_back_the_slot_it_was_given() -> None:
    shares = Shares(slots=100, max_per_host=1)
    first = await shares.admit("p", "h:80")
    assert first is not None
    waiting = asyncio.create_task(shares.admit("p", "h:80", wait=5))
    await asyncio.sleep(0.01)
    first.release(0.01)  # the waiter is given the slot ...
    waiting.cancel()  # ... and cancelled before it could take it
    await asyncio.gather(waiting, return_exceptions=True)
    assert shares.hosts.held == {} and shares.projects.held == {}


def test_claim_budgets_keep_a_share_free() -> None:
    shares = Shares(slots=12, max_per_host=100)
    assert shares.claim_budgets() == (6, {})
    for i in range(5):
        shares.job_started(f"projB:e{i}")
    shares.job_started("evt_1.1")  # no project: never counted
    # projB is busy: it may hold 12 // 2 = 6, so one more; a newcomer 12 // 3 = 4
    assert shares.claim_budgets() == (4, {"projB": 1})
    shares.job_started("projA:e1")
    assert shares.claim_budgets() == (3, {"projB": 0, "projA": 3})
    for i in range(5):
        shares.job_ended(f"projB:e{i}")
    assert shares.claim_budgets() == (4, {"projA": 5})


def test_a_full_project_whose_jobs_end_while_the_claim_is_out_is_claimed_for_at_once() -> None:
    shares = Shares(slots=16, max_per_host=100)  # a batch of room: 2
    for i in range(8):  # alone, its share is 16 // 2 = 8: full
        shares.job_started(f"projA:e{i}")
    assert shares.claim_budgets() == (5, {"projA": 0})  # the claim goes out ...
    assert not shares.job_ended("projA:e0")  # ... its jobs end meanwhile ...
    assert not shares.job_ended("projA:e1")  # (no claim fell short yet)
    assert shares.claim_fell_short()  # ... and it comes back short: claim again now
    assert not shares.claim_fell_short()  # remembered no more


def test_a_claim_that_took_a_projects_whole_budget_is_followed_at_once() -> None:
    """Its jobs ended while the claim was out, but it was not full when the claim was
    asked: what it took (its whole budget) says more may wait in the queue, and it has a
    batch of room again (a lone project whose claims landed a poll interval apart)."""
    shares = Shares(slots=16, max_per_host=100)  # alone, a share of 8; a batch of room: 2
    for i in range(8):
        shares.job_started(f"projA:e{i}")
    for i in range(3):
        shares.job_ended(f"projA:e{i}")
    assert shares.claim_budgets() == (5, {"projA": 3})  # the claim goes out for 3 ...
    for i in range(3, 6):
        assert not shares.job_ended(f"projA:e{i}")  # ... 3 more end meanwhile ...
    took = [f"projA:n{i}" for i in range(3)]
    for job_id in took:
        shares.job_started(job_id)
    assert shares.claim_fell_short(took)  # ... all 3 taken, and room for 3: claim now
    assert shares.claim_budgets() == (5, {"projA": 3})
    shares.job_started("projA:n3")
    assert not shares.claim_fell_short(["projA:n3"])  # 1 of 3: the queue had no more


def test_a_claim_that_took_a_whole_budget_with_no_room_since_waits_for_room() -> None:
    """Taking all it was allowed says more may wait, but with no job ended meanwhile the
    project has no room: nothing to claim for until its jobs end (never a loop of empty
    claims). A newcomer's budget counts as its budget; ids without a project are skipped."""
    shares = Shares(slots=16, max_per_host=100)  # a newcomer may take 16 // 2 = 8
    assert shares.claim_budgets() == (8, {})
    took = [f"projA:e{i}" for i in range(8)] + ["evt_old"]
    for job_id in took:
        shares.job_started(job_id)
    assert not shares.claim_fell_short(took)  # its whole budget, no room: wait
    assert not shares.job_ended("projA:e0")  # 1 free: not a batch (2) yet
    assert shares.job_ended("projA:e1")  # a batch of room: claim for it now
    unfair = Shares(slots=16, max_per_host=100, fair=False)
    assert not unfair.claim_fell_short(["projA:e0"])  # no shares, nothing to follow


def test_with_many_busy_projects_a_full_one_is_claimed_for_at_half_its_share() -> None:
    shares = Shares(slots=64, max_per_host=100)  # a batch: 8; with 10 busy, a share: 5
    for p in range(10):
        for i in range(5):
            shares.job_started(f"proj{p}:e{i}")
    shares.claim_budgets()
    assert not shares.claim_fell_short()
    assert not shares.job_ended("proj0:e0")
    assert shares.job_ended("proj0:e1")  # 2 of its 5 free, never 8
    assert not shares.job_ended("proj1:e0")


def test_another_projects_last_job_ending_gives_a_full_one_room() -> None:
    shares = Shares(slots=24, max_per_host=100)  # a batch of room: 3
    for i in range(8):  # with projB busy too, a share is 24 // 3 = 8: full
        shares.job_started(f"projA:e{i}")
    shares.job_started("projB:e0")
    shares.claim_budgets()
    assert not shares.claim_fell_short()
    assert shares.job_ended("projB:e0")  # alone now, projA may hold 12: 4 more


def test_deferral_follows_the_hosts_answer_time_within_bounds() -> None:
    shares = Shares(slots=10, max_per_host=10)
    assert 0.5 <= shares.defer_s("new:80") <= 0.75
    for _ in range(50):
        shares._remember("slow:80", 3.0)
    assert 3.0 * 0.99 <= shares.defer_s("slow:80") <= 4.5
    for _ in range(50):
        shares._remember("stuck:80", 60.0)
    assert shares.defer_s("stuck:80") <= 15


async def test_over_its_share_an_attempt_to_a_slow_host_goes_back_to_the_queue_at_once() -> None:
    shares = Shares(slots=100, max_per_host=1)
    slow = await shares.admit("p", "slow:80")
    assert slow is not None
    slow.release(3.0)  # the host took 3 s to answer
    assert await shares.admit("p", "slow:80") is not None
    started = asyncio.get_running_loop().time()
    assert await shares.admit("p", "slow:80", wait=5) is None
    assert asyncio.get_running_loop().time() - started < 0.1  # not waited out in memory


def test_a_claim_scouts_one_page_for_new_projects_but_once_in_a_while() -> None:
    """Past the busy projects' room, only a project not busy yet could take a job: the
    whole claim budget is looked at for one once per `WIDE_SCAN_S`, one page the rest of
    the time, whether the busy projects have room or not (the claim script looks for
    theirs as far as the budget, but for the quiet ones; a wide look counts once it came
    back short: `tests/service/test_claim_scan.py`)."""
    served = Served.__new__(Served)  # no shard needed: the budget is arithmetic
    served.wide_at, served.quiet = 100.0, frozenset()
    none: frozenset[str] = frozenset()
    wide, narrow = (WIDE_BUDGET, none), (NARROW_BUDGET, none)
    assert served.reach({"projA": 0}, now=100.1) == narrow
    assert served.reach({"projA": 0, "projB": 3}, now=100.1) == narrow
    assert served.reach({}, now=100.15) == wide  # nothing busy: anything goes
    assert served.reach({"projA": 0}, now=100.2) == narrow
    assert served.reach({"projA": 0}, now=100 + WIDE_SCAN_S) == wide


def test_a_busy_project_found_with_nothing_due_is_quiet_until_the_next_wide_look() -> None:
    """A short claim looked for every busy project with room as far as it could: one that
    took nothing had nothing due there, and is quiet (looked for only in what just came
    due, and a page deep) until the next wide look, which passes no quiet ones; one that
    takes a job, in any claim, is looked for again. A wide look counts once it came back
    short."""
    served = Served.__new__(Served)
    served.wide_at, served.quiet = 0.0, frozenset()
    busy = {"projA": 0, "projB": 3, "projC": 2}
    served.scanned(busy, WIDE_BUDGET, 10, [Claimed("projC:e0", b"{}", 1)], now=100.0)
    assert served.reach(busy, now=100.1) == (NARROW_BUDGET, frozenset({"projB"}))
    assert served.reach(busy, now=100 + WIDE_SCAN_S) == (WIDE_BUDGET, frozenset())  # wide
    assert served.reach({"projA": 0}, now=100.1) == (NARROW_BUDGET, frozenset())
    full = [Claimed(f"projB:e{i}", b"{}", 1) for i in range(3)]
    served.scanned(busy, NARROW_BUDGET, 3, full, now=100.1)  # projB took: not quiet
    assert served.reach(busy, now=100.2) == (NARROW_BUDGET, frozenset())
    served.scanned(busy, WIDE_BUDGET, 3, full, now=100 + WIDE_SCAN_S)  # full: not counted
    assert served.reach(busy, now=100.01 + WIDE_SCAN_S) == (WIDE_BUDGET, frozenset())


class _Counting(Shares):
    """Counts the checks a release makes of waiting attempts."""

    looks = 0

    def _admits(self, project: str, host: str) -> bool:
        self.looks += 1
        return super()._admits(project, host)


async def test_a_project_waiting_on_many_hosts_costs_anothers_release_nothing() -> None:
    """A project at its share with 1,000 attempts waiting, each to a host of its own: a
    release by another project passes over them in one look (each release looked at every
    one: 4.7 ms a release at 5,000, review), and its own release admits its oldest."""
    shares = _Counting(200, 100)
    held = [await shares.admit("evil", f"h{n}.evil") for n in range(100)]  # its share
    waiting = [asyncio.ensure_future(shares.admit("evil", f"w{n}.evil")) for n in range(1000)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    shares.looks = 0
    slot = await shares.admit("demo", "demo.host")
    assert slot is not None
    shares.release(slot, 0.0)
    assert shares.looks <= 2  # demo's admit, and nothing of evil's
    first = held[0]
    assert first is not None
    shares.release(first, 0.0)
    await asyncio.sleep(0)
    assert waiting[0].done() and waiting[0].result() is not None
    assert not any(w.done() for w in waiting[1:])
    for w in waiting[1:]:
        w.cancel()
    await asyncio.gather(*waiting[1:], return_exceptions=True)
    assert not shares._waiting  # nothing left behind


async def test_a_freed_host_goes_to_the_line_that_waited_longest() -> None:
    """P1 waits for host A, then P2 for host B, then P1 for B; B frees: P2's turn. Served
    project by project, P1 took it, and a project with a backlog anywhere took every slot
    a shared host freed (review)."""
    shares = Shares(40, 1)
    a, b = await shares.admit("p0", "a"), await shares.admit("p0", "b")
    assert a is not None and b is not None
    p1_a = asyncio.ensure_future(shares.admit("p1", "a"))
    p2_b = asyncio.ensure_future(shares.admit("p2", "b"))
    p1_b = asyncio.ensure_future(shares.admit("p1", "b"))
    await asyncio.sleep(0)
    shares.release(b, 0.0)
    await asyncio.sleep(0)
    assert p2_b.done() and p2_b.result() is not None
    assert not p1_a.done() and not p1_b.done()
    shares.release(a, 0.0)
    await asyncio.sleep(0)
    assert p1_a.done() and not p1_b.done()
    p1_b.cancel()
    await asyncio.gather(p1_b, return_exceptions=True)


async def test_a_project_always_waiting_on_a_host_does_not_keep_it_from_the_others() -> None:
    """X waits twice for host h, then Y once, then X again: as h frees, X, X, Y, X. The
    line kept its place as long as it held an attempt, and X, never without one, took
    every slot h freed (fourth review)."""
    shares = Shares(40, 1)
    held = await shares.admit("p0", "h")
    assert held is not None
    waits = [(project, "h") for project in ("x", "x", "y", "x")]
    assert await served_in_turn(shares, held, waits) == waits


async def test_a_projects_older_attempt_to_another_host_is_not_passed_over() -> None:
    """P, held to one slot, waits for host a, then b, then a again: as its slot frees, a, b,
    a. Each project offered one line at a time, and its first line, always refilled, kept
    the older attempt to b waiting until it gave up (fifth review)."""
    shares = Shares(4, 10)
    q, p = await shares.admit("q", "x"), await shares.admit("p", "x")  # two busy: 1 slot each
    assert q is not None and p is not None
    waits = [("p", host) for host in ("a", "b", "a")]
    assert await served_in_turn(shares, p, waits) == waits


async def test_a_project_given_room_for_one_looks_at_one_of_its_waiting_hosts() -> None:
    """P holds its share and waits on 1,000 hosts with room. One of its slots ends: one
    attempt goes, after a look or two. Every line of P went through the heap, a look each
    (0.9 ms a release at 500 hosts, 87 ms at 50,000: sixth review)."""
    shares = _Counting(100, 10)
    held = [await shares.admit("p", f"x{n}") for n in range(50)]  # alone: half the slots
    waiting = [asyncio.ensure_future(shares.admit("p", f"w{n}")) for n in range(1000)]
    await asyncio.sleep(0)
    shares.looks = 0
    first = held[0]
    assert first is not None
    shares.release(first, 0.0)
    await asyncio.sleep(0)
    assert [w.done() for w in waiting].count(True) == 1 and waiting[0].done()
    assert shares.looks <= 3
    for w in waiting[1:]:
        w.cancel()
    await asyncio.gather(*waiting[1:], return_exceptions=True)
    assert not shares._waiting and not shares._heads  # nothing left behind


async def test_a_project_at_its_share_keeps_no_more_heap_entries_than_lines() -> None:
    """While P holds its share, 2,000 pairs of attempts to one host begin to wait and give
    up, the first first: each new head left an entry in P's heap, none of them dropped
    until P had room again (seventh review); the heap is rebuilt from the lines instead."""
    shares = Shares(4, 10)
    held = [await shares.admit("p", f"x{n}") for n in range(2)]  # alone: half the slots
    assert all(held)
    long = asyncio.ensure_future(shares.admit("p", "h0"))
    await asyncio.sleep(0)
    for _ in range(2000):
        first = asyncio.ensure_future(shares.admit("p", "h1"))
        second = asyncio.ensure_future(shares.admit("p", "h1"))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
    assert len(shares._heads["p"]) <= 2 * len(shares._waiting["p"]) + 16
    long.cancel()
    await asyncio.gather(long, return_exceptions=True)
    assert not shares._heads and not shares._waiting


async def served_in_turn(
    shares: Shares, held: Slot, waits: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Each (project, host) of `waits` begins to wait, in that order; then `held` is
    released, and each slot admitted in its turn: the (project, host) of each, in the
    order they were admitted."""
    waiting = []
    for project, host in waits:
        waiting.append(((project, host), asyncio.ensure_future(shares.admit(project, host))))
        await asyncio.sleep(0)
    order, slot = [], held
    for _ in waits:
        shares.release(slot, 0.0)
        await asyncio.sleep(0)
        [(who, done)] = [(who, w) for who, w in waiting if w.done()]
        waiting.remove((who, done))
        order.append(who)
        admitted = done.result()
        assert admitted is not None
        slot = admitted
    return order
