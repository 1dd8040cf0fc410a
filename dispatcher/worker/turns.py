"""The shards a worker serves, taking turns at its one claim loop.

Each turn claims from the next shard whose claims are not backing off (`Served.ready`).
A shard whose Redis does not answer must not hold the turns up: redis-py waits a frozen
Redis (SIGSTOP, a host gone quiet) out for its socket timeout four times over (~20 s with
the default `DISPATCHER_REDIS_TIMEOUT` of 5 s) before it raises. So with several shards a
claim is waited for at most `wait_s`; one that has not answered by then is left to answer
(not cancelled: a frozen Redis runs what it was sent once it resumes, and the jobs of a
claim cancelled here would be leased to this worker with nobody running them, until
their leases lapse). Until it has, its shard is not claimed from again, and the others
take the turns; its jobs then go to `late`, to run as any others, whatever room is left
then (the room and the writes waiting were checked when the claim was sent, not again):
each shard with a claim out may take the worker a claim batch over its `max_jobs`. With
one shard there is no other to hold up: the claim is awaited as it is, until it answers
or the worker stops.

A stop (`stopping()`'s event set) ends the wait for a claim at once, one shard or several:
the claim is left out, as above, and `stop` waits for it a turn's wait more (`wait_s`,
within the grace): a claim that answers once the worker stops starts none of its jobs,
they are given back at once (`Served.give_back`: due now, the claim not counted). One
still out then is given up (its jobs come back within a lease). The one-shard wait went
on after SIGTERM for the claim's retries (4 x the Redis timeout on a frozen Redis) before
the stop's own budget began: 64.8 s measured, past the 60 s a deployment gives before
SIGKILL (review); giving every claim out up at once left the jobs of one answering a
moment later (a healthy Redis) leased to nobody for a lease (review).

Not cancelling does not make every job leased run: redis-py sends a command again after
each socket timeout (3 more times, `connections.policy`) and a frozen Redis runs every
copy once it resumes. The jobs of the copy still awaited then run; the other copies'
(up to 4 batches, when the last one timed out too and the claim failed) stay leased to
this worker, which knows nothing of them, until their leases lapse
(`DISPATCHER_LEASE_SECONDS`), and are then claimed again by any worker: late, not lost
(each such claim counted). So it is with one shard too, and was before the shards took
turns.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING

import structlog

from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from collections.abc import Callable

    from dispatcher.settings import Settings
    from dispatcher.worker.claims import Claimed
    from dispatcher.worker.served import Served

__all__ = ["CLAIM_WAIT_S", "SLOW_BACKOFF_S", "Turns", "claim_wait"]

log = structlog.get_logger("dispatcher.worker")

CLAIM_WAIT_S = 1.0  # a claim answers in milliseconds; this long, the other shards go on
SLOW_BACKOFF_S = 1.0  # a shard whose claim outlasted the wait pauses at least this long
Claim = asyncio.Task["list[Claimed] | None"]


def claim_wait(settings: Settings) -> float:
    """How long a turn waits for a shard's claim: `CLAIM_WAIT_S`, less with a shorter
    Redis timeout or a lease under 3 s."""
    return min(CLAIM_WAIT_S, settings.redis_timeout, settings.lease_seconds / 3)


class Turns:
    """The turns of `served` at the claims; `late(run, claimed)` takes the jobs of a claim
    that answered after its turn was over."""

    def __init__(
        self,
        served: list[Served],
        wait_s: float,
        late: Callable[[Served, list[Claimed]], None],
    ) -> None:
        self.served = served
        self.wait_s = wait_s
        self.late = late
        self.pending: dict[int, Claim] = {}  # shard index -> its claim, not answered in turn
        self._turn = 0
        self._stopped = asyncio.Event()

    def stopping(self) -> asyncio.Event:
        """A fresh event (at each run of the worker's loop) whose setting is the worker's
        stop: a claim's wait ends with it."""
        self._stopped = asyncio.Event()
        return self._stopped

    def next_ready(self) -> Served | None:
        """The next shard in turn whose claims are not backing off, nor still out (None:
        none is)."""
        now = time.monotonic()
        for _ in range(len(self.served)):
            run = self.served[self._turn % len(self.served)]
            self._turn += 1
            if run.ready(now) and run.index not in self.pending:
                return run
        return None

    async def claim(
        self, run: Served, share: int, mine: list[str], poll_delay: float
    ) -> list[Claimed] | None:
        """`run.claim`: its jobs, or None when its Redis did not answer (in turn), or the
        worker stopped (what it claimed then is put back)."""
        claim = asyncio.ensure_future(run.claim(share, mine, poll_delay))
        stopped = asyncio.ensure_future(self._stopped.wait())
        wait_s = self.wait_s if self.served[1:] else None  # one shard: none to hold up
        try:
            await asyncio.wait(
                {claim, stopped}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the loop itself is stopped: its claim with it
            claim.cancel()
            raise
        finally:
            stopped.cancel()
        if claim.done():
            claimed = claim.result()
            if claimed and self._stopped.is_set():
                run.give_back(claimed)
                return None
            return claimed
        self.pending[run.index] = claim
        claim.add_done_callback(functools.partial(self._answered, run))
        if not self._stopped.is_set():
            run.backoff = max(run.backoff, SLOW_BACKOFF_S)  # a failure then pauses longer
            log.warning("worker.claim_slow", shard=run.index, waited_s=self.wait_s)
        return None

    def _answered(self, run: Served, claim: Claim) -> None:
        """A claim that outlasted its turn ended: its jobs (if it took any) run now, or
        are given back at once when the worker stops."""
        del self.pending[run.index]
        if claim.cancelled() or not (claimed := claim.result()):
            return
        if self._stopped.is_set():
            run.give_back(claimed)
        else:
            self.late(run, claimed)

    async def stop(self, within: float) -> None:
        """The worker stops: the claims still out are waited for up to `wait_s` (at most
        `within`), and those that answer give their jobs back at once (`_answered`); the
        rest are given up (any jobs they took come back within a lease, as a dead
        worker's). Given up at once, a claim whose script had run but whose answer was on
        its way (a healthy Redis) left its jobs leased with nobody running them, for a
        lease, and counted a claim against each (review)."""
        if self.pending:
            await asyncio.wait(list(self.pending.values()), timeout=min(self.wait_s, within))
        await cancel_all(list(self.pending.values()))
