"""The fence a worker puts before each attempt: its job's lease still its own (no
servers: a stand-in for the renewal's answer)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from dispatcher.worker import fence as fence_module
from dispatcher.worker.fence import Fence, LeaseLost, running

if TYPE_CHECKING:
    from dispatcher.worker.claims import Claims


@dataclass
class Renewals:
    """What Redis answers to a renewal: the ids another worker holds, those with no
    lease; `refused` (an exception) or `slow` (seconds before it answers)."""

    taken: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    refused: Exception | None = None
    slow: float = 0.01
    calls: int = 0

    async def renew(self, job_ids: list[str]) -> tuple[set[str], set[str]]:
        self.calls += 1
        answer = self.taken & set(job_ids), self.gone & set(job_ids)  # as the script runs
        await asyncio.sleep(self.slow)  # then the answer's way back
        if self.refused is not None:
            raise self.refused
        return answer


def fence_over(renewals: Renewals, held: list[str], paused: float = 0.0) -> Fence:
    """A fence of 3 s leases whose last renewal was sent `paused` seconds ago."""
    fence = Fence(cast("Claims", renewals), lease_s=3.0, held=lambda: held)
    fence.confirmed = (time.monotonic() - paused, time.time() - paused)
    return fence


async def check_as(fence: Fence, job_id: str) -> None:
    """`fence.check()` in a task that runs `job_id`, as the worker starts one."""
    context = contextvars.copy_context()
    context.run(running.set, job_id)
    await asyncio.create_task(fence.check(), context=context)


async def test_a_fence_renewed_lately_lets_attempts_go_without_asking_redis() -> None:
    renewals = Renewals(taken={"a"})
    fence = fence_over(renewals, ["a", "b"])
    await check_as(fence, "a")  # the renewal of 0 s ago vouches: no question asked
    assert renewals.calls == 0


async def test_after_a_pause_attempts_wait_for_one_renewal_and_a_lost_job_sends_no_more() -> None:
    renewals = Renewals(taken={"a"}, gone={"c"})
    fence = fence_over(renewals, ["a", "b", "c"], paused=2.5)  # past 2/3 of the lease
    checks = [check_as(fence, job) for job in ("a", "b", "c", "b")]
    outcomes = await asyncio.gather(*checks, return_exceptions=True)
    assert renewals.calls == 1  # one renewal, shared
    assert [isinstance(o, LeaseLost) for o in outcomes] == [True, False, True, False]
    assert outcomes[1] is None
    with pytest.raises(LeaseLost, match="job a: its lease lapsed"):
        await check_as(fence, "a")  # still: the renewal just sent vouches for the rest only
    fence.started("a")  # claimed here again, under a lease of its own
    await check_as(fence, "a")


async def test_a_renewal_sent_before_the_pause_does_not_vouch_for_after_it() -> None:
    """The round was sent, then the worker stopped before reading its answer (all ours,
    then): on waking, that answer is as stale as the pause, and a round sent now says."""
    renewals = Renewals(slow=0.2)
    fence = fence_over(renewals, ["a"], paused=2.5)
    fence.fresh_s = 0.1  # a pause of 0.2 s, the answer's way back, outlives the lease
    early = asyncio.ensure_future(fence.renew())
    await asyncio.sleep(0)  # sent: all ours
    renewals.taken = {"a"}  # meanwhile the lease lapsed and another worker took the job
    with pytest.raises(LeaseLost):
        await check_as(fence, "a")
    assert renewals.calls == 2
    await early


async def test_a_job_started_again_during_a_renewal_is_not_lost_by_its_answer() -> None:
    renewals = Renewals(gone={"x"}, slow=0.1)  # x's chunk handed over: no lease, then
    fence = fence_over(renewals, ["x"])
    round_ = asyncio.ensure_future(fence.renew())
    await asyncio.sleep(0.01)
    fence.started("x")  # its next chunk, claimed here meanwhile
    await round_
    await check_as(fence, "x")
    renewals.taken = {"x"}  # a round sent after it started speaks for its new lease
    await fence.renew()
    with pytest.raises(LeaseLost):
        await check_as(fence, "x")


@pytest.mark.parametrize(
    "renewals",
    [
        Renewals(refused=RedisConnectionError("Redis is away")),
        Renewals(refused=OutOfMemoryError("OOM command not allowed")),
        Renewals(slow=5.0),
    ],
    ids=["away", "refusing", "slow"],
)
async def test_a_renewal_redis_does_not_answer_leaves_the_attempt_to_go_on(
    renewals: Renewals, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fence_module, "CONFIRM_WAIT_S", 0.05)
    fence = fence_over(renewals, ["a"], paused=2.5)
    stale = fence.confirmed
    await check_as(fence, "a")
    assert renewals.calls == 1 and fence.confirmed == stale  # still unconfirmed


async def test_a_wall_clock_gone_on_without_the_monotonic_one_is_a_pause_too() -> None:
    """A VM frozen and thawed whose monotonic clock skipped the gap (its wall clock
    caught up)."""
    renewals = Renewals(taken={"a"})
    fence = fence_over(renewals, ["a"])
    fence.confirmed = (time.monotonic(), time.time() - 2.5)
    with pytest.raises(LeaseLost):
        await check_as(fence, "a")


async def test_an_engine_outside_a_worker_holds_no_lease_and_is_never_fenced() -> None:
    fence = Fence(None, lease_s=3.0)
    fence.confirmed = (0.0, 0.0)
    await check_as(fence, "a")
