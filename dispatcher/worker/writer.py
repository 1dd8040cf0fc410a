"""Durable group commit: a worker's writes wait in memory until Redis has them (a
`batch.Batcher` that sends a batch again until Redis takes it).

Every attempt ends in writes (its history record, the delivery's progress, the next step
of its job). They are queued here and sent in pipelines shared by whatever else is
waiting (one round trip for many attempts). A write may lead with scripts (the record of
a delivery that ends with its attempt, and the job's end; then an ordered delivery's
lane release; or a small fan-out chunk's lane entries, `together`): a batch's leads go
first, run together as one script call per `TOGETHER_MAX` of a kind
(`lua.Script.queue_together`), every write's first lead before any second one, each
write's own commands after them in the order queued. The engine gives a lead only to a
write whose own commands can be done again by the job's next run, as a failover may keep
only a pipeline's start; and what must land before a lead (a re-run's lane releases,
before its entries, which may end its job) it waits for first. When Redis does not
answer (refused, reset, timed out, `LOADING` after a restart, paused), the same batch is
sent again with backoff until it does: nothing is dropped, and the HTTP attempts that
produced the writes never wait for them. A Redis at `maxmemory` (`OOM`, with
`noeviction`) is such an outage: it may take some commands of a batch and refuse others
(deletes pass, writes that grow it do not), and the whole batch is sent again until
every command is taken. This works because every write is idempotent (records carry
their ids, jobs are keyed by id, leases are checked), so a batch whose answer was lost
can be sent twice. What waits is bounded by the worker's slots and counted in
`dispatcher_pending_writes`; the worker claims no new job from a shard while too much
waits for it, or while it refuses its writes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher import metrics
from dispatcher.batch import Batcher, Pending, QueueCommands, leads_of
from dispatcher.connections import REDIS_ERRORS, redis_full, waited_out
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.history.record import AttemptRecord
    from dispatcher.lua import Script

__all__ = ["Then", "Writer"]

# What follows an attempt, queued after its record on the pipeline that writes it (Redis
# runs them in order; a failover may keep only a pipeline's start): `delay` seconds to the
# next attempt, or None when the delivery is over.
Then = Callable[["Pipeline", "float | None"], None]

log = structlog.get_logger("dispatcher.worker")

Prepare = Callable[[Iterable["AttemptRecord"]], Awaitable[None]]
STUCK_S = 1.0  # a batch in flight this long: its shard is paused or far too slow (`stuck`)


class _Transient(Exception):
    """A reply inside a pipeline that asks to try again later."""


RETRYABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, _Transient)


# Every writer of the process (one per shard it serves): `dispatcher_pending_writes` adds
# up theirs, read at scrape (each writer set it to its own count: the last one won, and a
# frozen shard's backlog hid behind a quiet shard's zero; review).
_WRITERS: weakref.WeakSet[Writer] = weakref.WeakSet()
metrics.PENDING_WRITES.set_function(lambda: sum(len(w._pending) for w in list(_WRITERS)))


class Writer(Batcher):
    """A `Batcher` whose batches are sent again until Redis takes them. `prepare` runs on
    each batch's records first (it gives them their ids)."""

    def __init__(
        self,
        redis: Redis,
        prepare: Prepare,
        *,
        window: float = 0.0005,
        max_batch: int = 500,
        backoff_cap: float = 1.0,
    ) -> None:
        super().__init__(redis, window=window, max_batch=max_batch)
        self.prepare = prepare
        self.backoff_cap = backoff_cap
        self._wake = asyncio.Event()
        self.retries = 0  # batches sent again since start
        self.failing_since: float | None = None  # loop time of the first failure of an outage
        self.sending_since: float | None = None  # loop time the batch in flight was first sent
        _WRITERS.add(self)

    @property
    def pending(self) -> int:
        """Writes not yet acknowledged by Redis."""
        return len(self._pending)

    @property
    def stalled(self) -> bool:
        """Redis refuses the writes waiting now (away, or full): they are being sent again;
        or a batch has been in flight for `STUCK_S` (a paused Redis answers no error for
        its socket timeout, four times over)."""
        return (self.failing_since is not None and bool(self._pending)) or self.stuck()

    def stuck(self) -> bool:
        """Whether writes wait and the batch in flight was first sent `STUCK_S` ago or more
        (a write answers in milliseconds)."""
        since = self.sending_since
        return (
            since is not None
            and bool(self._pending)
            and asyncio.get_running_loop().time() - since >= STUCK_S
        )

    def submit(
        self,
        queue: QueueCommands,
        records: Sequence[AttemptRecord] = (),
        lead: Callable[[], Script] | None = None,
        tail: Script | None = None,
    ) -> asyncio.Future[list[Any]]:
        """`Batcher.submit`: the future gets the results once Redis has them (cancelling it
        does not withdraw the write), and the write is counted until then."""
        done = super().submit(queue, records, lead, tail)
        return done

    def _queued(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())
        self._wake.set()

    async def commit(
        self, queue: QueueCommands, records: Sequence[AttemptRecord] = ()
    ) -> list[Any]:
        """`submit`, then wait until Redis has it."""
        return await asyncio.shield(self.submit(queue, records))

    async def execute(self, queue: QueueCommands) -> list[Any]:
        """`commit` (what a Batcher's callers call)."""
        return await self.commit(queue)

    async def together(self, script: Script) -> Any:
        """`Batcher.together` as a `commit`: waits until Redis has it (cancelling the
        caller does not withdraw the write)."""
        return await asyncio.shield(super().together(script))

    async def drain(self) -> None:
        """Wait until every write queued so far is acknowledged (bound it with a timeout)."""
        if self._pending:
            await asyncio.shield(self._pending[-1].done)

    async def close(self) -> None:
        if self._flusher is not None:
            await cancel_all([self._flusher])

    async def _flush_forever(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.window:
                await asyncio.sleep(self.window)  # let concurrent writers join the batch
            while self._pending:
                batch = self._pending[: self.max_batch]
                self.sending_since = self.sending_since or asyncio.get_running_loop().time()
                try:
                    answers = await self._durably(batch)
                except Exception as exc:
                    if isinstance(exc, RETRYABLE) or waited_out(exc):  # the ids' INCRBY too
                        self._failed(exc)
                        await asyncio.sleep(backoff)
                        backoff = min(self.backoff_cap, backoff * 2)
                        continue
                    # a bug: it must not stop the writes behind it
                    self.sending_since = None  # (the next batch is another)
                    if not self._weed_out(batch, exc):
                        log.exception("worker.write_failed", pending=len(self._pending))
                        await asyncio.sleep(self.backoff_cap)
                    continue
                backoff, self.sending_since = 0.05, None
                self._recovered()
                del self._pending[: len(batch)]
                for write, answer in zip(batch, answers, strict=True):
                    _settle(write.done, answer)

    async def _durably(self, batch: list[Pending]) -> list[list[Any]]:
        """The batch sent once, its records given their ids first, then their scripts run
        together; raises when a reply asks to try again later."""
        await self.prepare(record for write in batch for record in write.records)
        answers = await self._sent(batch)
        if any(waited_out(r) for answer in answers for r in answer):
            first = next(r for a in answers for r in a if waited_out(r))
            raise _Transient(str(first)) from first
        return answers

    def _weed_out(self, batch: list[Pending], exc: Exception) -> bool:
        """Settle, with their error, the writes of `batch` that cannot even be queued on a
        pipeline (a bug in the code that built them); the others go on. Returns whether
        any was found."""
        bad: list[tuple[Pending, Exception]] = []
        for write in batch:
            try:
                pipe = self.redis.pipeline(transaction=False)
                for script in leads_of(write):
                    type(script).queue_together(pipe, [script])
                write.queue(pipe)
            except Exception as failure:  # any error of the code that built the write
                bad.append((write, failure))
        for write, problem in bad:
            log.error("worker.write_refused", error=repr(problem), batch_error=repr(exc))
            self._pending.remove(write)
            if not write.done.done():
                write.done.set_exception(problem)
        return bool(bad)

    def _failed(self, exc: BaseException) -> None:
        self.retries += 1
        metrics.WRITE_RETRIES.inc()
        cause = exc.__cause__ if isinstance(exc, _Transient) else exc
        full = cause is not None and redis_full(cause)
        if full:
            metrics.REDIS_FULL.labels(refused="write").inc()
        if self.failing_since is None:
            self.failing_since = asyncio.get_running_loop().time()
            pending = len(self._pending)
            log.warning("worker.writes_waiting", pending=pending, error=str(exc), redis_full=full)

    def _recovered(self) -> None:
        if self.failing_since is not None:
            waited = asyncio.get_running_loop().time() - self.failing_since
            self.failing_since = None
            log.info("worker.writes_resumed", pending=len(self._pending), waited_s=round(waited, 1))


def _settle(done: asyncio.Future[list[Any]], answer: list[Any]) -> None:
    if done.done():
        return
    error = next((r for r in answer if isinstance(r, Exception)), None)
    if error is None:
        done.set_result(answer)
    else:  # a command Redis refuses for good (a bug): say so, do not send it forever
        log.error("worker.write_refused", error=str(error))
        done.set_exception(error)
