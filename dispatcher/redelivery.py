"""A window's redelivery: every delivery of a history window that finally failed, sent
again once, and a count of what was left out and why (`RedeliveryResult`).

A delivery is sent again as its newest failure of the window, once, and only while its
newest attempt anywhere is a final failure: not one redelivered since that succeeded or is
retried. Each call used to send every failure of the window again, a redelivery's own
failure included: twice as many each time (review). A delivery's redelivery after its
newest attempt has one job id, queued once (`Queue.push_many`): calls at once, or one that
reads a history not yet shipped to PostgreSQL, send it once; the next is queued once its
own attempt shows in the history. Left out, and counted when the delivery still needs
sending (its newest attempt anywhere a final failure):

- a delivery none of whose records in the window keeps its request body whole (cut at
  `DISPATCHER_MAX_REQUEST_BODY`, or its kept body lost): it cannot be sent as it was (an
  older record outside the window may keep it: a wider window, or that record by id);
- a delivery whose callback is disabled or deleted: its redelivery would be dropped, with
  no attempt to show, and hold its place.

Paced (`Pace`: the project's emit share, `dispatcher.api.pacing`): each job is paid for
(its body's bytes) before its batch is queued, and given back when it was there already;
when the share runs out the call stops (`Pace.refused`, a 429 saying how many it queued),
and calling again goes on (what it queued is there already: not queued, nor paid, again).
Each record the walk read and left out (`LEFT_OUT_COST`: it read the record, and its
delivery's newest attempt, bodies and all) is owed when the call ends, whether the share
holds it or not: the project's next call waits it out (`Pace.owe`). Refused mid-walk, a
call would walk the same records again each time and never pass them. It had no pace: one
call queued a whole window of 64 KiB bodies (review); then the walk was free, and a window
of 1,500 failures of a disabled callback, 40 KB each, made Redis send 116 MiB a call, call
after call (review). A batch is at most `BATCH` jobs and `BATCH_BYTES` of bodies.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dispatcher.models import DeliveryStatus, RedeliveryResult

if TYPE_CHECKING:
    from dispatcher.history import HistoryStore
    from dispatcher.jobs import DeliveryJob
    from dispatcher.models import HistoryRecord
    from dispatcher.producer import Producer
    from dispatcher.registry import Registry

__all__ = ["Check", "Pace", "redeliver_window"]

BATCH = 100  # redeliveries queued per round trip
BATCH_BYTES = 1 << 20  # and their bodies' bytes, at most (past one job)
LEFT_OUT_COST = 1024  # what a record read and left out costs: the least a job costs


Check = Callable[[RedeliveryResult], Awaitable[None]]  # raises to stop before a batch


class Pace(Protocol):
    """A project's share of what it may queue: bodies' bytes paid for each job."""

    def take(self, size: int) -> float:
        """Pay for a job of `size` body bytes: 0 when paid, else the seconds until it
        could be (nothing paid)."""

    def give_back(self, size: int) -> None:
        """Return what a job of `size` body bytes paid (it was not queued)."""

    def owe(self, size: int) -> float:
        """Spend `size` bytes whether the share holds them or not (below empty, the next
        call waits until it is paid back, a burst's worth at most); the seconds it adds to
        that wait."""

    def refused(self, done: RedeliveryResult, wait: float) -> Exception:
        """The error that stops the call, `done` queued so far, `wait` seconds to wait."""


async def redeliver_window(
    history: HistoryStore,
    registry: Registry,
    producer: Producer,
    project_id: str,
    failures: AsyncIterator[HistoryRecord],
    *,
    on_queued: Callable[[int], None] | None = None,
    check: Check | None = None,
    pace: Pace | None = None,
) -> RedeliveryResult:
    """Queue the redelivery of each delivery of `failures` (a window's final failures,
    newest first) that may be sent again; `on_queued` hears each batch's count, `check`
    (given what was done so far) may stop the call before each batch by raising, `pace`
    pays for each job, and stops the call when it cannot."""
    window = _Window(history, registry, producer, project_id)
    batch: list[DeliveryJob] = []

    async def flush() -> float:
        """Queue the batch (what `pace` pays of it); the seconds until it pays for the
        rest (0: it paid for all)."""
        if check is not None:
            await check(window.result)
        paid, wait = _pay(pace, batch)
        answers = await producer.requeue_each(batch[:paid], once=True)
        sent = sum(answers)
        for job, queued in zip(batch, answers, strict=False):
            if pace is not None and not queued:
                pace.give_back(len(job.body))  # there already: paid for before
        window.result.queued += sent
        window.result.already_queued += paid - sent
        if on_queued is not None:
            on_queued(sent)
        batch.clear()
        return wait

    if pace is not None and (wait := _ready(pace)):  # nothing to pay with: walk nothing
        raise pace.refused(window.result, wait)
    stopped, owed_s = 0.0, 0.0
    try:
        stopped = await _walked(window.redeliveries(failures), batch, flush)
    finally:
        if pace is not None and window.left_out:
            owed_s = pace.owe(window.left_out * LEFT_OUT_COST)
    if stopped and pace is not None:  # its Retry-After counts the walk's debt (review)
        raise pace.refused(window.result, stopped + owed_s)
    return window.result


async def _walked(
    jobs: AsyncGenerator[DeliveryJob, None],
    batch: list[DeliveryJob],
    flush: Callable[[], Awaitable[float]],
) -> float:
    """`jobs` queued by `flush` a batch at a time (`BATCH` jobs, `BATCH_BYTES` of bodies);
    stopped, its walk too, at the first batch not paid for whole: the seconds until it
    would be (0: every batch was)."""
    async with contextlib.aclosing(jobs):
        async for job in jobs:
            batch.append(job)
            if len(batch) >= BATCH or sum(len(j.body) for j in batch) >= BATCH_BYTES:
                if wait := await flush():
                    return wait
    return await flush() if batch else 0.0


def _ready(pace: Pace) -> float:
    """The seconds until `pace` pays for the smallest job (0: now), nothing spent."""
    if wait := pace.take(0):
        return wait
    pace.give_back(0)
    return 0.0


def _pay(pace: Pace | None, batch: list[DeliveryJob]) -> tuple[int, float]:
    """How many of `batch`, from its first, `pace` paid for, and the seconds to wait
    for the next (0: every one paid)."""
    if pace is None:
        return len(batch), 0.0
    for paid, job in enumerate(batch):
        if wait := pace.take(len(job.body)):
            return paid, wait
    return len(batch), 0.0


@dataclass
class _Window:
    """One window's redelivery, and what it left out (`result`)."""

    history: HistoryStore
    registry: Registry
    producer: Producer
    project_id: str
    result: RedeliveryResult = field(default_factory=lambda: RedeliveryResult(queued=0))
    live: dict[int, bool] = field(default_factory=dict)  # callbacks enabled, read once
    left_out: int = 0  # records read and left out (`LEFT_OUT_COST` each)

    async def redeliveries(
        self, failures: AsyncIterator[HistoryRecord]
    ) -> AsyncGenerator[DeliveryJob, None]:
        """The redelivery of each delivery of `failures` that is sent again, once."""
        seen: set[str] = set()  # deliveries looked at (the window's newest failure first)
        cut: set[str] = set()  # with a record not kept whole (an older one may be)
        async for record in failures:
            job = await self._job(record, seen, cut)
            if job is None:
                self.left_out += 1
            else:
                yield job
        for delivery_id in cut - seen:  # none of its records here kept the body whole
            self.left_out += 1
            self.result.body_not_kept += (await self._failed(delivery_id))[0]

    async def _job(
        self, record: HistoryRecord, seen: set[str], cut: set[str]
    ) -> DeliveryJob | None:
        """`record`'s delivery sent again, or None when it is left out."""
        callback_id, delivery_id = record.callback_id, record.delivery_id
        if callback_id is None or delivery_id is None:
            return None  # not a delivery's record: nothing to send it again as
        if record.request_body_truncated:
            cut.add(delivery_id)
            return None
        if delivery_id in seen:
            return None
        seen.add(delivery_id)
        failed, newest = await self._failed(delivery_id)
        if not failed:
            return None  # redelivered since: it succeeded, or is being retried
        if not await self._live(callback_id):  # its redelivery would be dropped
            self.result.callback_gone += 1
            return None
        return self.producer.redelivery_job(record, after=newest or record.id)

    async def _failed(self, delivery_id: str) -> tuple[bool, int | None]:
        """Whether the delivery's newest attempt anywhere is a final failure (or none is
        found), and that attempt's id."""
        newest = await self.history.attempts(delivery_id, self.project_id, limit=1)
        if not newest:
            return True, None
        return newest[0].final and newest[0].status is DeliveryStatus.FAILED, newest[0].id

    async def _live(self, callback_id: int) -> bool:
        if callback_id not in self.live:
            self.live[callback_id] = await self.registry.target(callback_id) is not None
        return self.live[callback_id]
