"""A worker's own word on its leases: no attempt starts under a lease it cannot vouch for.

A job's lease lapses in Redis `DISPATCHER_LEASE_SECONDS` after it was last renewed, and
another worker may then take the job. A worker that was paused meanwhile (SIGSTOP, a
long stall, a VM frozen while its wall clock went on) knows nothing of it: on waking,
its jobs would go on sending what their new holders send too. So before each attempt
starts (`Fence.check`) the worker asks whether it renewed its leases lately: a renewal
sent within two thirds of a lease, by its monotonic clock and by its wall clock, vouches
for every lease it then held for a third of a lease more, and a job claimed since holds
a newer lease still. When it has not, the attempt waits for a renewal sent now (a round
sent before the pause answers for then), which answers whose leases are not ours any
more; such a job starts no more attempts (`LeaseLost`) and is left to its new holder.
When Redis does not answer that renewal within `CONFIRM_WAIT_S` (away, slow, refusing),
the attempt goes on, as it did before: the lease question cannot be settled, and the
attempt's record waits for Redis all the same.

A fence is per shard (a worker's leases on one shard are renewed together); the job an
attempt belongs to is the one its task runs (`running`, set where the worker starts it).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import RedisError

from dispatcher.connections import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.worker.claims import Claims

__all__ = ["CONFIRM_WAIT_S", "FRESH", "Fence", "LeaseLost", "running"]

log = structlog.get_logger("dispatcher.worker")

FRESH = 2 / 3  # of a lease: a renewal sent this recently vouches for every lease held
CONFIRM_WAIT_S = 1.0  # an attempt waits this long at most for its leases' renewal
# a renewal that did not answer (in time): Redis away, slow, refusing (full, read-only)
UNSETTLED: tuple[type[Exception], ...] = (TimeoutError, RedisError, *REDIS_ERRORS)
# the job the current task runs (its id), set by the worker where it starts the task
running: contextvars.ContextVar[str | None] = contextvars.ContextVar("running", default=None)


class LeaseLost(Exception):
    """The job's lease lapsed, or went to another worker: it starts no more attempts."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: its lease lapsed, and another worker may hold it")
        self.job_id = job_id


class Fence:
    """One shard's leases as this worker holds them: renewed together (`renew`), each
    attempt checked against the last renewal (`check`). `held` gives the ids of the jobs
    the worker runs on the shard; `claims` is None where nothing is leased (an engine on
    its own, in tests), and then every check passes."""

    def __init__(
        self, claims: Claims | None, lease_s: float, held: Callable[[], list[str]] = list
    ) -> None:
        self.claims = claims
        self.held = held
        self.fresh_s = lease_s * FRESH
        self.confirmed = (time.monotonic(), time.time())  # the last answered renewal's send
        self.lost: set[str] = set()  # jobs running here whose lease is not ours any more
        self._rounds = 0  # renewals sent
        self._started: dict[str, int] = {}  # job -> renewals sent before it started here
        self._round: asyncio.Future[None] | None = None

    def stale(self) -> bool:
        """Whether the last answered renewal was sent too long ago to vouch for a lease."""
        mono, wall = self.confirmed
        return max(time.monotonic() - mono, time.time() - wall) >= self.fresh_s

    async def renew(self) -> None:
        """Extend the leases of the jobs held; one renewal at a time, shared by whoever
        asks meanwhile. Raises what Redis raised."""
        if self._round is None:
            self._round = asyncio.ensure_future(self._renew())
            self._round.add_done_callback(self._over)
        await asyncio.shield(self._round)

    async def _renew(self) -> None:
        assert self.claims is not None
        sent, self._rounds = (time.monotonic(), time.time()), self._rounds + 1
        number = self._rounds
        taken, gone = await self.claims.renew(self.held())
        if taken:  # another worker holds them: this one was stalled past its leases
            log.warning("worker.leases_lost", jobs=sorted(taken)[:20], count=len(taken))
        started = self._started
        # a job started here since the round was sent (claimed again) holds a lease anew
        self.lost = {job for job in taken | gone if started.get(job, 0) < number}
        held = set(self.held())
        self._started = {job: n for job, n in started.items() if job in held}
        self.confirmed = sent

    def _over(self, done: asyncio.Future[None]) -> None:
        self._round = None
        if not done.cancelled():
            done.exception()  # retrieved: each caller got it through the shield

    async def check(self) -> None:
        """Before an attempt of the job this task runs starts: returns when its lease is
        ours (or Redis cannot say), raises `LeaseLost` when it is not."""
        if self.claims is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFIRM_WAIT_S  # for both rounds together
        for _ in range(2):  # a round sent before a pause answers for then: one sent now
            if not self.stale():
                break
            try:
                await asyncio.wait_for(self.renew(), max(0.0, deadline - loop.time()))
            except UNSETTLED as exc:  # the attempt goes on, as it did before
                log.debug("worker.lease_unconfirmed", error=str(exc) or type(exc).__name__)
                break
        if self.lost and (job_id := running.get()) in self.lost:
            raise LeaseLost(job_id)

    def started(self, job_id: str) -> None:
        """`job_id` runs (again) here, under a lease of this worker's."""
        self.lost.discard(job_id)
        self._started[job_id] = self._rounds
