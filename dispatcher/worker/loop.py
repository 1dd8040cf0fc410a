"""The job loop: claim due jobs in batches, run them under a lease, write their ends.

Why not arq's `Worker`: it claims a job per ~6 round trips, deletes a job that outlives
its timeout as finished, and needs a restart (of the process, on `WatchError` while Redis
is `LOADING`) after a Redis outage. This loop keeps arq's job format and keys (what any
arq client and arq's health check read and write) and owns the lifecycle instead:

- one Lua round trip claims a batch of due jobs (`claims.py`), passing over the worker's
  own; a job's in-progress key is a lease renewed while it runs, so a dead worker's jobs
  come back within a lease; a project held at its share is claimed for again as soon as
  its jobs end (`shares.py`), not a poll interval later;
- a job ends only by its own writes (a record and what follows it), which wait in memory
  until Redis takes them (`writer.py`); a failed, timed-out or cancelled run puts the job
  back in the queue with backoff, and a job claimed too often without ending gives up: its
  deliveries end as final FAILED records, unsent (`unending.py`);
- a Redis error anywhere is waited out with backoff inside the loop; nothing blocks the
  event loop, so HTTP attempts in flight finish on time.

With shards (see `dispatcher.shards`) a worker serves each shard it is given (every one by
default, `DISPATCHER_WORKER_SHARDS`) in turn (`turns.py`): each turn claims at most a batch
from the next shard, so the shards share its slots fairly, and a shard that does not answer
(within a second: frozen, or gone quiet) waits out its own backoff while the others go on.
Each shard has its own claims, writer and lease renewals (`served.py`): a job's writes go to
its own shard, no shard's leases wait for another's, and a shard's claims stop on its own
waiting writes only. A failed run whose put-back its shard does not take, and a job whose
shard's writes have been in flight for a second, give their slots up while they wait
(`slots.py`): a frozen shard's jobs keep the others' slots for about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import describe
from dispatcher.jobs import FAN_OUT, BadJob, DeliveryJob, EventJob, decode
from dispatcher.services import Services
from dispatcher.shard import Shard
from dispatcher.stopping import cancel_all
from dispatcher.topology import close_all, connect_shards, shards_of
from dispatcher.worker import fence, unending
from dispatcher.worker.claim_script import DATA_GONE
from dispatcher.worker.duties import Counts, Duties, every
from dispatcher.worker.hold import held_back
from dispatcher.worker.idling import Idling
from dispatcher.worker.lanes import Adopt
from dispatcher.worker.served import CLAIM_ERRORS, Served, given_shards
from dispatcher.worker.shipping import Shipping
from dispatcher.worker.slots import JobKey, Slots
from dispatcher.worker.turns import Turns, claim_wait

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.settings import Settings
    from dispatcher.worker.claims import Claimed

__all__ = ["Worker", "create_worker", "stop_budget"]

log = structlog.get_logger("dispatcher.worker")

Job = Coroutine[Any, Any, None]  # a job's run, as its task runs it


def stop_budget(settings: Settings) -> float:
    """The most a worker's stop takes after SIGTERM (`Worker._wind_down`): twice the grace,
    a second each for the writes and the shipping, and the goodbye's Redis timeout. Every
    deployment's stop timeout is above it (`deploy/`)."""
    return 2 * settings.shutdown_grace + 2.0 + settings.redis_timeout


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
        shards = [Shard.single(settings.queue_name)] if redis else shards_of(settings)
        self._clients = [redis] if redis else connect_shards(settings, shards)
        self._owns_redis = redis is None
        every_shard = [Services(settings, c, s) for s, c in zip(shards, self._clients, strict=True)]
        self.served: list[Served] = []
        for services in given_shards(every_shard, settings.worker_shards):
            first = self.served[0].engine if self.served else None
            self.served.append(Served.build(services, self.token, shared=first))
        head = self.served[0]  # the first shard served: what a one-shard worker's tools see
        self.redis, self.services = head.services.redis, head.services
        self.writer, self.claims, self.engine = head.writer, head.claims, head.engine
        self._all = every_shard
        for run in self.served:  # a lane's next delivery, taken by a release: run it here
            spawn = functools.partial(self._adopt, run)
            run.engine.lanes.adopt = Adopt(self.token, spawn, run.next_step)
            run.engine.fence.held = functools.partial(self._held, run)
        self.shipping = Shipping([run.services for run in self.served])
        self.duties = Duties(settings, every_shard[0], [run.services for run in self.served],
                             self.engine.stats, self.token, self._counts)  # fmt: skip
        self.slots = Slots(self.max_jobs, self.claim_batch, self.served)
        self.running = self.slots.running
        self.turns = Turns(self.served, claim_wait(settings), self._late)
        self.idling = Idling(self.poll_delay)
        self.jobs_started = self.jobs_complete = self.jobs_failed = 0
        self._stop: asyncio.Event | None = None
        self._due: asyncio.Event | None = None  # set when this worker queued a job due now
        self._closed = False
        self._context = contextvars.Context()  # a job's task starts from it (`main`'s)

    # ---- running ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running jobs get `DISPATCHER_SHUTDOWN_GRACE` to finish."""
        if self._stop is not None:
            self._stop.set()
            self.slots.open()  # a loop waiting for room stops waiting
        self._wake()

    async def main(self) -> None:
        self._stop, self._due = self.turns.stopping(), asyncio.Event()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        renewals = [every(self.settings.lease_seconds / 3, run.renew) for run in self.served]
        background = [*map(asyncio.create_task, renewals), *self.duties.start()]
        self.shipping.start()
        if self.settings.worker_metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.settings.worker_metrics_port, addr=self.settings.api_host)
        log.info("worker.started", queue=self.settings.queue_name, max_jobs=self.max_jobs,
                 token=self.token, shards=[run.index for run in self.served])  # fmt: skip
        self._context = contextvars.copy_context()
        try:
            await self._claim_loop()
        finally:
            await self._wind_down(background)

    async def _claim_loop(self) -> None:
        assert self._stop is not None and self._due is not None
        for served in self.served:  # the stored layout first (Redis waited out)
            while not await served.services.upgrade():
                await self._pause(1.0)
                if self._stop.is_set():
                    return
        dry = 0  # shards in a row that had less due than they were asked for
        while not self._stop.is_set():
            if self.burst and await self._burst_done():
                return
            room = self.slots.left()
            if room < min(self.claim_batch, self.max_jobs) and self.running:
                await self.slots.wait(self.poll_delay)  # until a batch's worth is free
                continue
            await self.shipping.fresh()  # the backlog's check an idle worker's job woke
            run = self.turns.next_ready()
            if run is None or self._held_back(run):
                await self._pause(self.poll_delay)
                continue
            # one shard: all the room; several: a batch each in turn; one on an old backlog answer
            share = self.shipping.share(min(room, self.claim_batch) if self.served[1:] else room)
            self._due.clear()
            claimed = await self.turns.claim(run, share, self._held(run), self.poll_delay)
            if claimed is None:  # its Redis did not answer (in turn): that shard backs off
                continue
            self.idling.found(len(claimed))
            for job in claimed:
                self._start(run, job)
            short = len(claimed) < share
            # a full project's jobs may wait: claim as soon as it has room
            if short and run.engine.shares.claim_fell_short(job.job_id for job in claimed):
                self._wake()
            # a wake since this claim began (here, or a job's end): no shard is dry yet
            # (with several shards, the next claim, another shard's, clears the event)
            dry = dry + 1 if short and not self._due.is_set() else 0
            if dry >= len(self.served):  # nothing more is due now, on any shard
                dry = 0
                await self._idle()

    def _held_back(self, run: Served) -> bool:
        """Whether to take no new work from `run`'s shard now (`hold.py`)."""
        return held_back(run, self.max_pending_writes, self.shipping, self._burst_spent())

    async def _idle(self) -> None:
        """A poll interval (longer once idle: `idling.py`), cut short when this worker
        queues a job due at once (the next chunk of a fan-out) or stops."""
        assert self._due is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._due.wait(), self.idling.wait_s())

    def _wake(self) -> None:
        if self._due is not None:
            self._due.set()

    async def _pause(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _burst_spent(self) -> bool:
        return 0 <= self.max_burst_jobs <= self.jobs_started

    async def _burst_done(self) -> bool:
        """Burst mode ends when nothing runs, nothing waits to be written and the queue is
        empty (deferred retries included), or `max_burst_jobs` ran."""
        if self.running or any(run.writer.pending for run in self.served):
            return False
        if self._burst_spent():
            return True
        try:
            for run in self.served:
                if int(await run.services.redis.zcard(run.keys.QUEUE)):
                    return False
        except REDIS_ERRORS:
            return False
        return True

    # ---- one job ------------------------------------------------------------------------

    def _start(self, run: Served, claimed: Claimed) -> None:
        self._spawn(run, claimed.job_id, self._run(run, claimed), unending.reason(claimed.claims))

    def _late(self, run: Served, claimed: list[Claimed]) -> None:
        """The jobs of a claim that answered after its turn (`Turns`): run as any others
        (once the worker stops, `Turns` gives them back)."""
        for job in claimed:
            self._start(run, job)
        self._wake()

    def _adopt(self, run: Served, job_id: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work`, the attempt of a job this worker took outside a claim (a lane's next
        delivery, leased to it by the release of the one before), as it runs a claimed
        job: counted, its lease renewed, put back when it fails. Put back at once when the
        worker stops or holds its claims on the shard back (`hold.py`)."""
        if (self._stop is not None and self._stop.is_set()) or self._held_back(run):
            run.put_back(job_id, 0)
            return
        self._spawn(run, job_id, self._guarded(run, job_id, 1, work))

    def _spawn(self, run: Served, job_id: str, running: Job, gives_up: str | None = None) -> None:
        """Run a job's task in a context of its own (the worker's at its start, not its
        starter's: another job's log fields, span or giving up): its attempts check its
        lease (`fence`), and end unsent when it gives up (`unending`, `gives_up` why)."""
        self.jobs_started += 1
        self.shipping.job_started()  # its records may near the backlog's bound: checked now
        run.engine.shares.job_started(job_id)
        run.engine.fence.started(job_id)
        context = self._context.copy()
        context.run(fence.running.set, job_id)
        context.run(unending.giving_up.set, gives_up)
        task = asyncio.create_task(running, context=context)
        key = (run.index, job_id)
        self.running[key] = task
        task.add_done_callback(lambda done: self._ended(run, key, done))

    def _ended(self, run: Served, key: JobKey, task: asyncio.Task[None]) -> None:
        if run.engine.shares.job_ended(key[1]):  # a full project has room: claim for it
            self._wake()
        self.slots.ended(key, task)

    async def _run(self, run: Served, claimed: Claimed) -> None:
        if claimed.data is None:  # its data expired before anyone ran it (arq's rule)
            await run.drop(claimed, DATA_GONE, finish=False)
            return
        if unending.dropped(claimed.claims):  # its giving up failed too
            await run.drop(claimed, f"claimed {claimed.claims} times without ending")
            return
        data = claimed.data
        try:
            await self._guarded(
                run,
                claimed.job_id,
                claimed.claims,
                lambda: self._execute(run, claimed, decode(data)),
            )
        except BadJob as exc:
            await run.poison(claimed, str(exc))

    async def _guarded(
        self, run: Served, job_id: str, claims: int, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run a job's `work` within the job timeout; a run that fails (a timeout, Redis, a
        bug) puts the job back, to do the same work again later (BadJob: the caller's)."""
        released = run.engine.lanes.released
        try:
            async with asyncio.timeout(self.settings.effective_job_timeout):
                await work()
            self.jobs_complete += 1
        except BadJob:
            raise
        except fence.LeaseLost as exc:  # paused past its lease: the job is another's now
            log.warning("worker.job_left", job_id=job_id, reason=str(exc))
        except Exception as exc:
            self.jobs_failed += 1
            free = functools.partial(self.slots.free, (run.index, job_id))  # several shards
            error = describe(exc, trusted=CLAIM_ERRORS)
            await run.failed_run(job_id, claims, error, free if len(self.served) > 1 else None)
        finally:
            if run.engine.lanes.released != released:  # a lane's next delivery is due now
                self._wake()

    async def _execute(self, run: Served, claimed: Claimed, wire: Any) -> None:
        if wire.function == FAN_OUT:
            event = EventJob.from_wire(wire.payload, wire.enqueued_ms)
            structlog.contextvars.bind_contextvars(event_id=event.id)
            noted = self.duties.noted
            noted.claimed(event.project_id, wire.enqueued_ms, claimed.claims, claimed.at_ms)
            end = run.chunk_end(claimed, event)
            version = claimed.registry_version if event.scoped else None  # its project's
            after = await run.engine.fan_out(event, rerun=end.rerun, end=end, version=version)
            if not end.written:  # not with an attempt's write: on its own
                await run.writer.commit(lambda pipe: end(pipe, after))
            if after is not None:  # its lease handed over: the next claim may take it
                self.running.pop((run.index, claimed.job_id), None)
                self._wake()
        else:
            await run.deliver(claimed, DeliveryJob.from_wire(wire.payload, claimed.job_id))

    def _held(self, run: Served) -> list[str]:
        """The ids of the jobs this worker runs on `run`'s shard."""
        return [job_id for index, job_id in self.running if index == run.index]

    def _counts(self) -> Counts:
        return Counts(self.jobs_complete, self.jobs_failed, len(self.running))

    # ---- stopping -----------------------------------------------------------------------

    async def _wind_down(self, background: list[asyncio.Task[None]]) -> None:
        """Let running jobs finish (up to the grace), put the others back at once, write
        what waits and ship what is left within the rest of twice the grace (a second each
        at least), then stop the background tasks and say goodbye within the Redis
        timeout: the whole stop fits `stop_budget`. Each step took up to the grace of its
        own, three graces and the goodbye's retries in all, past the 60 s a deployment
        gives before SIGKILL (review)."""
        grace, clock = self.settings.shutdown_grace, asyncio.get_running_loop().time
        ends = clock() + 2 * grace
        await self.turns.stop(within=grace)  # claims still out: given back, or up
        if self.running:
            _, late = await asyncio.wait(list(self.running.values()), timeout=grace)
            late_keys = [key for key, task in self.running.items() if task in late]
            await cancel_all(late)
            by_index = {run.index: run for run in self.served}
            for index, job_id in late_keys:
                by_index[index].put_back(job_id, 0)
        try:
            async with asyncio.timeout(max(ends - clock(), 1.0)):
                await asyncio.gather(*(run.writer.drain() for run in self.served))
        except TimeoutError:  # Redis is away: their jobs are still queued, and run again
            pending = sum(run.writer.pending for run in self.served)
            log.error("worker.writes_unsaved", pending=pending)
        await self.shipping.stop(within=max(ends - clock(), 1.0))
        await cancel_all(background)
        with contextlib.suppress(TimeoutError):  # Redis away: its heartbeat lapses
            async with asyncio.timeout(self.settings.redis_timeout):
                await self.duties.last_words()
        log.info("worker.stopped", complete=self.jobs_complete, failed=self.jobs_failed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for run in self.served:
            await run.writer.close()
            await run.engine.close()
        for services in self._all:
            await services.close()
        if self._owns_redis:
            await close_all(self._clients)


def create_worker(settings: Settings, **options: Any) -> Worker:
    """A `Worker` for `settings` (options: `redis`, `burst`, `max_burst_jobs`,
    `poll_delay`, `handle_signals`)."""
    return Worker(settings, **options)
