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

from dispatcher.worker.fence import Fence, LeaseLost, running

if TYPE_CHECKING:
    from dispatcher.worker.claims import Claims


@dataclass
class Renewals:
    """What Redis answers to a renewal: the ids whose lease is not ours."""

    lost: set[str] = field(default_factory=set)
    down: bool = False
    calls: int = 0

    async def renew(self, job_ids: list[str]) -> set[str]:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise RedisConnectionError("Redis is away")
        return self.lost & set(job_ids)


def fence_over(renewals: Renewals, held: list[str]) -> Fence:
    return Fence(cast("Claims", renewals), lease_s=3.0, held=lambda: held)


async def check_as(fence: Fence, job_id: str) -> None:
    """`fence.check()` in a task that runs `job_id`, as the worker starts one."""
    context = contextvars.copy_context()
    context.run(running.set, job_id)
    await asyncio.create_task(fence.check(), context=context)


async def test_a_fence_renewed_lately_lets_attempts_go_without_asking_redis() -> None:
    renewals = Renewals(lost={"a"})
    fence = fence_over(renewals, ["a", "b"])
    await check_as(fence, "a")  # the renewal of 0 s ago vouches: no question asked
    assert renewals.calls == 0


async def test_after_a_pause_attempts_wait_for_one_renewal_and_a_lost_job_sends_no_more() -> None:
    renewals = Renewals(lost={"a"})
    fence = fence_over(renewals, ["a", "b"])
    fence.confirmed = time.monotonic() - 2.5  # paused: past two thirds of the 3 s lease
    checks = [check_as(fence, job) for job in ("a", "b", "b", "a")]
    outcomes = await asyncio.gather(*checks, return_exceptions=True)
    assert renewals.calls == 1  # one renewal, shared
    assert [isinstance(o, LeaseLost) for o in outcomes] == [True, False, False, True]
    assert outcomes[1] is None
    with pytest.raises(LeaseLost, match="job a: its lease lapsed"):
        await check_as(fence, "a")  # still: the renewal just sent vouches for the rest only
    fence.started("a")  # claimed here again, under a lease of its own
    await check_as(fence, "a")


async def test_a_renewal_redis_cannot_answer_leaves_the_attempt_to_go_on() -> None:
    renewals = Renewals(down=True)
    fence = fence_over(renewals, ["a"])
    fence.confirmed = stale = time.monotonic() - 2.5
    await check_as(fence, "a")
    assert renewals.calls == 1 and fence.confirmed == stale  # still unconfirmed


async def test_an_engine_outside_a_worker_holds_no_lease_and_is_never_fenced() -> None:
    fence = Fence(None, lease_s=3.0)
    fence.confirmed = 0.0
    await check_as(fence, "a")
