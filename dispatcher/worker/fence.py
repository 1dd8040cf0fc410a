"""A worker's own word on its leases: no attempt starts under a lease it cannot vouch for.

A job's lease lapses in Redis `DISPATCHER_LEASE_SECONDS` after it was last renewed, and
another worker may then take the job. A worker that was paused meanwhile (SIGSTOP, a
frozen VM, a long stall) knows nothing of it: on waking, its jobs would go on sending
what their new holders send too. So before each attempt starts (`Fence.check`) the
worker asks whether it renewed its leases lately (the renewal sent within two thirds of
a lease: every lease it then held lasts at least a third longer, and a job claimed since
holds a lease newer still). When it has not, the attempt waits for a renewal, which
answers which leases were lost; a job whose lease was lost starts no more attempts
(`LeaseLost`) and leaves the job to its new holder. When Redis cannot answer that
renewal, the attempt goes on, as it did before: the lease question cannot be settled,
and the attempt's record waits for Redis all the same.

A fence is per shard (a worker's leases on one shard are renewed together); the job an
attempt belongs to is the one its task runs (`running`, set where the worker starts it).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import TYPE_CHECKING

import structlog

from dispatcher.connections import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.worker.claims import Claims

__all__ = ["FRESH", "Fence", "LeaseLost", "running"]

log = structlog.get_logger("dispatcher.worker")

FRESH = 2 / 3  # of a lease: a renewal sent this recently vouches for every lease held
# the job the current task runs (its id), set by the worker where it starts the task
running: contextvars.ContextVar[str | None] = contextvars.ContextVar("running", default=None)


class LeaseLost(Exception):
    """The job's lease lapsed and went to another worker: it starts no more attempts."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: its lease lapsed and another worker holds it")
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
        self.confirmed = time.monotonic()  # when the last renewal that answered was sent
        self.lost: set[str] = set()  # jobs whose lease another worker took
        self._round: asyncio.Future[None] | None = None

    async def renew(self) -> None:
        """Extend the leases of the jobs held; one renewal at a time, shared by whoever
        asks meanwhile. Raises what Redis raised."""
        if self._round is None:
            self._round = asyncio.ensure_future(self._renew())
            self._round.add_done_callback(self._over)
        await asyncio.shield(self._round)

    async def _renew(self) -> None:
        assert self.claims is not None
        sent = time.monotonic()
        lost = await self.claims.renew(self.held())
        if lost:
            log.warning("worker.leases_lost", jobs=sorted(lost)[:20], count=len(lost))
        self.lost = lost  # of the jobs still running here
        self.confirmed = sent

    def _over(self, done: asyncio.Future[None]) -> None:
        self._round = None
        if not done.cancelled():
            done.exception()  # retrieved: each caller got it through the shield

    async def check(self) -> None:
        """Before an attempt of the job this task runs starts: returns when its lease is
        ours, raises `LeaseLost` when another worker holds it."""
        if self.claims is None:
            return
        if time.monotonic() - self.confirmed >= self.fresh_s:
            try:
                await self.renew()
            except REDIS_ERRORS as exc:  # unsettled: the attempt goes on, as before
                log.debug("worker.lease_unconfirmed", error=str(exc))
        if self.lost and (job_id := running.get()) in self.lost:
            raise LeaseLost(job_id)

    def started(self, job_id: str) -> None:
        """`job_id` runs (again) under a lease of this worker's."""
        self.lost.discard(job_id)
