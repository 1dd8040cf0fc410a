"""The job loop: claim due jobs in batches, run them under a lease, write their ends.

Why not arq's `Worker`: it claims one job per ~6 round trips (WATCH, EXISTS, ZSCORE,
MULTI/EXEC, then GET+INCR), treats a job that outlives its timeout as finished and deletes
it, and needs a restart of its loop (and of the process, on `WatchError` while Redis is
`LOADING`) after a Redis outage. This loop keeps arq's job format and keys (what
`Producer`, any arq client and arq's health check read and write) and owns the lifecycle
instead:

- one Lua round trip claims a batch of due jobs (`claims.py`); a job's in-progress key is
  a lease renewed while it runs, so a dead worker's jobs come back within a lease;
- a job ends only by its own writes (a record and what follows it), which wait in memory
  until Redis takes them (`writer.py`); a failed, timed-out or cancelled run puts the job
  back in the queue, never drops it;
- a Redis error anywhere is waited out with backoff inside the loop; nothing blocks the
  event loop, so HTTP attempts in flight finish on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError

from dispatcher import keys, metrics
from dispatcher.connections import REDIS_ERRORS, connect, redis_full
from dispatcher.errors import describe
from dispatcher.jobs import FAN_OUT, BadJob, DeliveryJob, EventJob, decode
from dispatcher.services import Services
from dispatcher.worker.claims import Claimed, Claims
from dispatcher.worker.duties import Counts, Duties, every
from dispatcher.worker.engine import Engine, Then, keep_entry
from dispatcher.worker.shipping import Shipping
from dispatcher.worker.writer import Writer

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.settings import Settings

__all__ = ["Worker", "create_worker"]

log = structlog.get_logger("dispatcher.worker")

MAX_CLAIMS = 25  # a job claimed this often without ending is dropped, on record
# waited out while claiming: an outage, and any reply error (READONLY after a failover)
CLAIM_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, RedisError)


def _retry_in(claims: int) -> float:
    """Backoff before a failed run's job is due again."""
    return min(60.0, 0.5 * 2.0 ** min(claims, 7))


class Worker:
    """One worker process's loop. `main()` runs it (until `stop()`, a signal, or, in
    burst mode, an empty queue); `close()` releases what it opened."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis | None = None,
        burst: bool = False,
        max_burst_jobs: int = -1,
        poll_delay: float | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.burst = burst
        self.max_burst_jobs = max_burst_jobs
        self.poll_delay = settings.poll_delay if poll_delay is None else poll_delay
        self.handle_signals = handle_signals
        self.max_jobs = settings.worker_max_jobs
        self.claim_batch = max(1, min(100, self.max_jobs // 4))
        self.max_pending_writes = 4 * self.max_jobs
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.redis = redis or connect(settings)
        self._owns_redis = redis is None
        self.services = Services(settings, self.redis)
        self.writer = Writer(self.redis, self.services.history.assign_ids)
        self.claims = Claims(self.redis, settings.queue_name, self.token, settings.lease_seconds)
        self.engine = Engine(self.services, self.writer)
        self.shipping = Shipping(self.services)
        self.duties = Duties(settings, self.redis, self.services.history, self.engine.stats,
                             self.token, self._counts)  # fmt: skip
        self.running: dict[str, asyncio.Task[None]] = {}
        self.jobs_started = self.jobs_complete = self.jobs_failed = 0
        self._stop: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._due: asyncio.Event | None = None  # set when this worker queued a job due now
        self._closed = False

    # ---- running ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running jobs get `DISPATCHER_SHUTDOWN_GRACE` to finish."""
        if self._stop is not None:
            self._stop.set()
        self._wake()

    async def main(self) -> None:
        self._stop, self._room, self._due = asyncio.Event(), asyncio.Event(), asyncio.Event()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        background = [
            asyncio.create_task(every(self.settings.lease_seconds / 3, self._renew)),
            *self.duties.start(),
        ]
        self.shipping.start()
        if self.settings.worker_metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.settings.worker_metrics_port, addr=self.settings.api_host)
        log.info("worker.started", queue=self.settings.queue_name, max_jobs=self.max_jobs,
                 token=self.token)  # fmt: skip
        try:
            await self._claim_loop()
        finally:
            await self._wind_down(background)

    async def _claim_loop(self) -> None:
        assert self._stop is not None and self._due is not None
        backoff = self.poll_delay
        while not await self.services.upgrade():  # the stored layout first (Redis waited out)
            await self._pause(1.0)
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            if self.burst and await self._burst_done():
                return
            room = self.max_jobs - len(self.running)
            if room < min(self.claim_batch, self.max_jobs) and self.running:
                await self._wait_for_room()
                continue
            if (
                self.writer.pending > self.max_pending_writes
                or self.writer.stalled  # Redis away, or full: claims wait
                or self.shipping.full
                or self._burst_spent()
            ):
                await self._pause(self.poll_delay)
                continue
            try:
                self._due.clear()
                claimed = await self.claims.claim(room, shares=self.engine.shares.claim_budgets())
            except CLAIM_ERRORS as exc:
                if full := redis_full(exc):
                    metrics.REDIS_FULL.labels(refused="claim").inc()
                wait = round(backoff, 2)
                log.warning("worker.claim_failed", error=str(exc), redis_full=full, retry_in_s=wait)
                await self._pause(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = self.poll_delay
            for job in claimed:
                self._start(job)
            if len(claimed) < room:  # nothing more is due now
                await self._idle()

    async def _idle(self) -> None:
        """A poll interval, cut short when this worker queues a job due at once (the next
        chunk of a fan-out) or stops."""
        assert self._due is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._due.wait(), self.poll_delay)

    def _wake(self) -> None:
        if self._due is not None:
            self._due.set()

    async def _pause(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _wait_for_room(self) -> None:
        """Until a batch's worth of slots is free (or a poll interval passed)."""
        assert self._room is not None
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), self.poll_delay)

    def _burst_spent(self) -> bool:
        return 0 <= self.max_burst_jobs <= self.jobs_started

    async def _burst_done(self) -> bool:
        """Burst mode ends when nothing runs, nothing waits to be written and the queue is
        empty (deferred retries included), or `max_burst_jobs` ran."""
        if self.running or self.writer.pending:
            return False
        if self._burst_spent():
            return True
        try:
            return int(await self.redis.zcard(self.settings.queue_name)) == 0
        except REDIS_ERRORS:
            return False

    # ---- one job ------------------------------------------------------------------------

    def _start(self, claimed: Claimed) -> None:
        self.jobs_started += 1
        self.engine.shares.job_started(claimed.job_id)
        task = asyncio.create_task(self._run(claimed))
        self.running[claimed.job_id] = task
        task.add_done_callback(lambda done: self._ended(claimed.job_id, done))

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.engine.shares.job_ended(job_id)
        if self.running.get(job_id) is task:  # not a new run of the same job (a fan-out's)
            del self.running[job_id]
        if self._room is not None and self.max_jobs - len(self.running) >= self.claim_batch:
            self._room.set()

    async def _run(self, claimed: Claimed) -> None:
        if claimed.data is None:  # its data expired before anyone ran it (arq's rule)
            await self._drop(claimed, "job data expired before it ran", finish=False)
            return
        if claimed.claims > MAX_CLAIMS:
            await self._drop(claimed, f"claimed {claimed.claims} times without ending")
            return
        try:
            async with asyncio.timeout(self.settings.effective_job_timeout):
                await self._execute(claimed, decode(claimed.data))
            self.jobs_complete += 1
        except BadJob as exc:
            await self._poison(claimed, str(exc))
        except Exception as exc:  # a timeout, Redis, a bug: the same work again later
            self.jobs_failed += 1
            delay = _retry_in(claimed.claims)
            log.warning(
                "job.failed",
                job_id=claimed.job_id,
                error=describe(exc, trusted=CLAIM_ERRORS),
                claims=claimed.claims,
                retry_in_s=delay,
            )
            # Held (its lease renewed) until Redis has taken the put-back, and so every
            # write the run queued before it: another worker claiming the job before its
            # writes landed (Redis away or full) would send its deliveries again.
            with contextlib.suppress(Exception):  # refused for good: logged by the writer
                await self._put_back(claimed.job_id, delay)

    async def _execute(self, claimed: Claimed, wire: Any) -> None:
        if wire.function == FAN_OUT:
            event = EventJob.from_wire(wire.payload)
            structlog.contextvars.bind_contextvars(event_id=event.id)
            after = await self.engine.fan_out(event, rerun=claimed.claims > 1)
            await self.writer.commit(lambda pipe: self._fan_out_end(pipe, claimed, event, after))
            if after is not None:
                self._wake()
        else:
            job = DeliveryJob.from_wire(wire.payload, claimed.job_id)
            await self.engine.deliver(job, self._next_step(claimed.job_id))

    def _fan_out_end(
        self, pipe: Pipeline, claimed: Claimed, event: EventJob, after: int | None
    ) -> None:
        """A fan-out job's end, or its move to the event's next chunk when there is one (one
        write, so a crash re-runs at most the chunk in hand)."""
        if after is None:
            self.claims.finish(pipe, claimed.job_id)
        else:
            self.claims.hand_over(pipe, claimed, event.continued(after))

    def _put_back(self, job_id: str, delay: float) -> asyncio.Future[list[Any]]:
        """The job's run failed or was stopped: due again in `delay` seconds (unless its
        own writes already ended it or set it later). Done once Redis has it."""
        return self.writer.submit(
            lambda pipe: self.claims.again(pipe, job_id, delay, next_attempt=False)
        )

    def _next_step(self, job_id: str) -> Then:
        """After a `deliver` job's attempt: back in the queue for the next one, or done."""
        claims = self.claims

        def then(pipe: Pipeline, delay: float | None) -> None:
            if delay is None:
                claims.finish(pipe, job_id)
            else:
                claims.again(pipe, job_id, delay, next_attempt=True)

        return then

    async def _poison(self, claimed: Claimed, problem: str) -> None:
        """A job that cannot be read: recorded for operators, then removed, never retried."""
        raw = (claimed.data or b"")[:500].decode("utf-8", errors="replace")

        def write(pipe: Pipeline) -> None:
            keep_entry(pipe, keys.POISON_JOBS, {"jobId": claimed.job_id, "problem": problem,
                                                "raw": raw})  # fmt: skip
            self.claims.finish(pipe, claimed.job_id)

        await self.writer.commit(write)
        metrics.POISON_JOBS.inc()
        log.error("job.poison", job_id=claimed.job_id, problem=problem)

    async def _drop(self, claimed: Claimed, reason: str, *, finish: bool = True) -> None:
        def write(pipe: Pipeline) -> None:
            keep_entry(pipe, keys.DROPPED, {"jobId": claimed.job_id, "reason": reason})
            if finish:
                self.claims.finish(pipe, claimed.job_id)

        await self.writer.commit(write)
        metrics.DROPPED.labels(reason="job").inc()
        log.error("job.dropped", job_id=claimed.job_id, reason=reason)

    async def _renew(self) -> None:
        await self.claims.renew(list(self.running))

    def _counts(self) -> Counts:
        return Counts(self.jobs_complete, self.jobs_failed, len(self.running))

    # ---- stopping -----------------------------------------------------------------------

    async def _wind_down(self, background: list[asyncio.Task[None]]) -> None:
        """Let running jobs finish (up to the grace), put the others back at once, write
        what waits, then stop the background tasks."""
        grace = self.settings.shutdown_grace
        if self.running:
            _, late = await asyncio.wait(list(self.running.values()), timeout=grace)
            late_ids = [job_id for job_id, task in self.running.items() if task in late]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            for job_id in late_ids:
                self._put_back(job_id, 0)
        try:
            async with asyncio.timeout(max(grace, 1.0)):
                await self.writer.drain()
        except TimeoutError:  # Redis is away: their jobs are still queued, and run again
            log.error("worker.writes_unsaved", pending=self.writer.pending)
        await self.shipping.stop(within=max(grace, 1.0))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.duties.last_words()
        log.info("worker.stopped", complete=self.jobs_complete, failed=self.jobs_failed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.writer.close()
        await self.engine.close()
        await self.services.close()
        if self._owns_redis:
            await self.redis.aclose()


def create_worker(settings: Settings, **options: Any) -> Worker:
    """A `Worker` for `settings` (options: `redis`, `burst`, `max_burst_jobs`,
    `poll_delay`, `handle_signals`)."""
    return Worker(settings, **options)
