"""What a worker does with a job: `fan_out` an event to its callbacks, `deliver` a retry.

A fan-out makes the first attempt of every delivery itself, concurrently, a chunk of
callbacks at a time (between chunks the job loop moves the job's cursor on), so an event
costs one queue job however many callbacks it has; only retries become `deliver` jobs (job
id = the delivery's progress id, one emission's). An attempt ends in one write
(`Engine._write`, through `writer.py`), sent in a pipeline shared with other attempts: its
history record, the delivery's progress, endpoint health, and what comes next for the
delivery (a `deliver` job, or the `deliver` job's own return to the queue or end; for a
fan-out chunk of one attempt, the fan-out job's end too). A worker killed at any point
loses nothing: an unwritten attempt is made again, same delivery id (receivers de-duplicate).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING

import orjson
import structlog

from dispatcher import bodies, metrics, tracing
from dispatcher.backoff import next_delay
from dispatcher.batch import Batcher
from dispatcher.delivery import Attempted, AttemptResult, Outcome, encode_body
from dispatcher.egress import Client
from dispatcher.ending import Ending
from dispatcher.health import CircuitBreaker
from dispatcher.jobs import BadJob, DeliveryJob, EventJob
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.registry.matches import Matches
from dispatcher.stats import AttemptStats
from dispatcher.worker import circuit as circuits
from dispatcher.worker import unending
from dispatcher.worker.claims import body_wait_ms
from dispatcher.worker.controls import Controls
from dispatcher.worker.fence import Fence
from dispatcher.worker.filtering import Filters
from dispatcher.worker.lanes import Lanes, Sending
from dispatcher.worker.marks import read_marks
from dispatcher.worker.record import attempt_record, disabled, keep_drop, observe
from dispatcher.worker.sender import Sender
from dispatcher.worker.shares import Shares, Slot
from dispatcher.worker.steps import FirstRetry, Step

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.history.record import AttemptRecord
    from dispatcher.registry import CallbackTarget
    from dispatcher.registry.match import Chunk, ChunkQuery
    from dispatcher.services import Services
    from dispatcher.worker.steps import ChunkEnd
    from dispatcher.worker.writer import Then, Writer

__all__ = ["Engine"]

log = structlog.get_logger("dispatcher.worker")

DONE = b"done"


class Engine:
    """A worker process's delivery machinery: one HTTP client per region, the circuit
    breaker, the attempt statistics, over the process's services and its writer."""

    def __init__(self, services: Services, writer: Writer, *, shared: Engine | None = None) -> None:
        self.services = services
        self.settings = settings = services.settings
        self.keys = services.keys
        self.writer = writer
        self.reads = Batcher(services.redis)
        self.matches = Matches()  # the chunks read, while the registry stands
        self.owner = shared is None  # of the clients (another shard's engine shares them)
        if shared is None:
            self.breaker = CircuitBreaker(settings.circuit_threshold, settings.circuit_cooldown)
            self.shares = Shares.of(settings)
            self.clients = {region: Client(settings, region) for region in Region}
            self.stats = AttemptStats()
        else:  # one process's HTTP pools, breaker, slots and statistics, whatever the shard
            self.breaker, self.shares = shared.breaker, shared.shares
            self.clients, self.stats = shared.clients, shared.stats
        self.controls = Controls(settings, self.keys, self.reads, writer, self.shares)
        self.filters = Filters(self.keys, writer, self.shares)
        self.sender = Sender(settings, services.policies, self.clients)
        self.progress_ttl, self.body_wait_ms = settings.progress_ttl, body_wait_ms(settings)
        self.fence = Fence(None, settings.lease_seconds)  # a worker's: its leases (`fence.py`)
        self.lanes = Lanes(  # ordered callbacks
            self.keys,
            writer,
            Sending(self.attempt, self.drop, services.registry.decrypt, self._defer),
            progress_ttl=self.progress_ttl,
            lease_s=settings.lease_seconds,
        )

    async def close(self) -> None:
        self.matches.close()
        if self.owner:
            await asyncio.gather(*(client.aclose() for client in self.clients.values()))

    async def fan_out(
        self, event: EventJob, *, rerun: bool = False, end: ChunkEnd | None = None,
        version: bytes | None = None,
    ) -> int | None:  # fmt: skip
        """First attempts of one chunk of `event`'s deliveries: to the callbacks after
        `event.after`, at most `DISPATCHER_FAN_OUT_CHUNK` of them. Returns where the next
        chunk starts, or None when this was the last. A `rerun` (the job ran before and did
        not finish) skips what was already handled. A chunk of one attempt writes the job's
        `end` (given where the next chunk starts) with that attempt, in the same write.
        `version`: the registry version the job's claim saw (its chunk may be one kept)."""
        query = self.services.registry.chunk_query(
            event.project_id,
            event.event,
            pipeline_id=event.pipeline_id,
            after=event.after,
            size=self.settings.fan_out_chunk,
        )
        with tracing.fanning_out(
            event.trace, event_id=event.id, project_id=event.project_id, event=event.event
        ) as carried:
            chunk = await self.matches.chunk(query, version, self._read_chunk)
            if chunk.after is not None:  # read while this chunk's attempts run
                self.matches.read_ahead(query.following(chunk.after), version, self._read_chunk)
            targets = self.filters.select(event, chunk.targets, chunk.shadows)  # the filters
            if targets:
                await self._first_attempts(event, targets, rerun, carried, end, chunk)
            elif chunk.numbered:  # its project's lanes may go on now, if it holds them
                await self.lanes.ready(event, chunk.after, end if chunk.after is None else None)
        return chunk.after

    async def _read_chunk(self, query: ChunkQuery) -> Chunk:
        (answer,) = await self.reads.execute(query.queue_on)
        return query.read(answer)

    async def _first_attempts(
        self,
        event: EventJob,
        targets: list[CallbackTarget],
        rerun: bool,
        carried: tracing.TraceContext | None,
        end: ChunkEnd | None,
        chunk: Chunk,
    ) -> None:
        after = chunk.after
        try:  # once for all callbacks
            body = encode_body(event.event, event.project_id, event.data)
        except orjson.JSONEncodeError as exc:  # queued by another client: never sendable
            raise BadJob(f"the event's data cannot be encoded: {exc}") from None
        big = len(body) >= bodies.SHARED_MIN_BYTES  # its retries' and records' body kept once
        shared = self.settings.shared_bodies and len(targets) > 1 and big  # (not a chunk's one)
        pending = [
            (DeliveryJob.first(event, target.id, body, target.project_id, carried, shared=shared),
             target)
            for target in targets
        ]  # fmt: skip
        if rerun:  # what the run before handled is left to the job it queued
            lane_of = functools.partial(self.lanes.lane_of, event)
            marked = await read_marks(
                self.services.redis, self.keys, event, pending, self.progress_ttl, lane_of
            )
            await self.lanes.ended_before(event, marked)
            pending = [(job, target) for job, target, mark in marked if not mark]
        # ordered deliveries join their lanes; those not at their lane's head wait there
        one = len(pending) == 1  # the job's end rides with its one attempt (if made now)
        queue = self.services.queue
        now = await self.lanes.enter(
            event,
            pending,
            lambda job: FirstRetry(queue, job, end if one else None, after),
            after=after,
            holding=chunk.numbered,
            end=end if after is None else None,
        )
        if len(now) == 1:
            job, target, then = now[0]
            await self.attempt(job, target, 1, then)
            return
        attempts = [self.attempt(job, target, 1, then) for job, target, then in now]
        # An attempt ends as a record; should one raise all the same, the others still end
        # theirs before the job runs again (and skips them).
        ended = await asyncio.gather(*attempts, return_exceptions=True)
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome

    async def deliver(self, job: DeliveryJob, then: Then) -> None:
        """One more attempt of a delivery; `then` queues the job's next step (its return
        to the queue for the next attempt, or its end)."""
        if job.lane is not None:  # an ordered delivery: when its lane's turn comes
            turn = await self.lanes.claimed(job, then)
            if turn is None:
                return
            then = turn
        progress_key = self.keys.delivery(job.progress_id)  # and its circuit state beside it
        (progress, waiting), target, found = await asyncio.gather(  # (read once: its turn come)
            self.services.redis.mget(progress_key, circuits.waiting_key(progress_key)),
            self.services.registry.target(job.callback_id),
            bodies.read(self.services.redis, self.keys, job, self.body_wait_ms),
        )
        if progress == DONE:  # a run that ended the delivery, then lost its job's end
            self.lanes.landed(await self.writer.commit(lambda pipe: then(pipe, None)))
        elif target is None:
            await self.lanes.gone(job, then)  # dropped, or (ordered, disabled) deferred
        elif found is None:  # the body it refers to is gone: never sent empty
            await self.drop(job, bodies.GONE, then, "body")
        else:
            await self.attempt(found, target, int(progress or 0) + 1, then, waiting)

    async def drop(self, job: DeliveryJob, reason: str, then: Then, kind: str = "callback") -> None:
        """End a delivery without an attempt, on record in the drops (`record.keep_drop`) of
        the project whose event it was (`DeliveryJob.event_project`); `kind`: the metric's."""

        def write(pipe: Pipeline) -> None:
            keep_drop(pipe, self.keys, job.event_project, {"deliveryId": job.delivery_id,
                      "reason": reason, "callbackId": job.callback_id,
                      "projectId": job.project_id})  # fmt: skip
            if job.redelivery_of is None:
                pipe.set(self.keys.delivery(job.progress_id), DONE, ex=self.progress_ttl)
            else:  # its id is free again for a window redelivery, as if never queued
                mark = self.keys.delivery(job.progress_id)
                pipe.delete(mark, circuits.waiting_key(mark), self.keys.pushed(job.job_id))
            then(pipe, None)

        self.lanes.landed(await self.writer.commit(write))  # a lane's next delivery: now
        metrics.DROPPED.labels(reason=kind).inc()
        log.info(
            "delivery.dropped",
            delivery_id=job.delivery_id,
            callback_id=job.callback_id,
            reason=reason,
        )

    async def attempt(
        self, job: DeliveryJob, target: CallbackTarget, number: int, then: Then,
        waiting: bytes | None = None,
    ) -> None:  # fmt: skip
        """Attempt `number` of `job`, recorded, and what follows it, in one write. A callback
        with limits is admitted first (`controls.py`; its share of the worker held): over
        them, it waits in the queue without spending an attempt. While its circuit is open
        it is put off (`waiting`: its state, `circuit.py`). A run that gives up
        (`unending.py`) sends nothing: the delivery ends FAILED."""
        if (why := unending.giving_up.get()) is not None:
            await self.fence.check()  # its job still ours: not another worker's to end
            done = Attempted(AttemptResult.unsent(why), [])
            await self._settle(job, target, number, done, then, given_up=True)
        elif target.options.limited:  # its lease checked before a fleet-wide start is taken
            attempt = functools.partial(self._attempt, job, target, number, waiting=waiting)
            put_off = functools.partial(self._defer, job, then)
            await self.controls.admitted(job, target, then, attempt, put_off, self.fence.check)
        else:
            await self._attempt(job, target, number, then, waiting=waiting)

    async def _circuit_open(
        self, job: DeliveryJob, target: CallbackTarget, number: int, then: Then,
        put_off: tuple[float, str] | None,
    ) -> None:  # fmt: skip
        """Attempt `number` while its circuit is open (`circuit.py`): `put_off` (how long, its
        state after), or, put off past its schedule (None), ended unsent."""
        if put_off is None:
            await self.fence.check()  # its job still ours: not another worker's to end
            done = Attempted(AttemptResult.unsent(circuits.ENDED), [])
            await self._settle(job, target, number, done, then, given_up=True)
        else:
            progress = self.keys.delivery(job.progress_id)
            state = circuits.PutOff.of(progress, number, put_off[1], self.progress_ttl)
            await self._defer(job, then, put_off[0], "circuit", state)

    async def _attempt(
        self, job: DeliveryJob, target: CallbackTarget, number: int, then: Then,
        held: Slot | None = None, waiting: bytes | None = None,  # held: its share, taken first
    ) -> None:  # fmt: skip
        host, project = target.destination.host, job.emitter or job.project_id
        circuit = (project, host)  # the emitter's own: none trips another project's
        if wait := self.breaker.wait(circuit, target.id):  # after its limits: no place kept
            if held is not None:
                held.release(0.0)
            failed = self.breaker.failed(circuit, target.id)  # (its own probe failed)
            put_off = circuits.put_off(self.settings, number, wait, waiting, failed)
            await self._circuit_open(job, target, number, then, put_off)
            return
        slot = held or await self.shares.admit(project, host)
        if slot is None:  # its project or host holds its share of the worker: later
            await self._defer(job, then, self.shares.defer_s(host), "share")
            return
        started = 0.0  # the request's start: only its time is the host's answer time
        try:
            await self.fence.check()  # its job's lease still ours (after a pause: another's?)
            started = time.monotonic()
            with tracing.attempt(job.trace, url=target.url, owner=target.project_id,
                                 number=number, delivery_id=job.delivery_id,
                                 event_id=job.event_id, project_id=job.emitter or job.project_id,
                                 callback_id=target.id) as traced:  # fmt: skip
                done = await self.sender.send(job, target, traced.headers)
                result = done.result
                traced.end(result.outcome.value, result.status_code, result.error)
        finally:
            slot.release(time.monotonic() - started if started else 0.0)
        if result.sent:  # nothing sent (its secrets unreadable here, a bad proxy): not the host's
            self.breaker.record(circuit, result.outcome is not Outcome.RETRY, target.id)
        await self._settle(job, target, number, done, then)

    async def _settle(
        self, job: DeliveryJob, target: CallbackTarget, number: int, done: Attempted,
        then: Then, *, given_up: bool = False,
    ) -> None:  # fmt: skip
        """What came of an attempt: its record, its next step and the callback's health, in
        its write; its metrics and log line. The attempt times count only what went out;
        the health, no delivery `given_up` (`unending.py`, `circuit.py`)."""
        result, delay = done.result, None
        if result.outcome is Outcome.RETRY:
            delay = next_delay(
                self.settings.retry_schedule,
                number,
                jitter=self.settings.retry_jitter,
                retry_after=result.retry_after,
                retry_after_cap=self.settings.retry_after_cap,
            )
            # the retry it queues (a fan-out's: a job of its own) only while its job is ours:
            # an attempt in flight as the worker was paused past its lease is its holder's now
            await self.fence.check()
        record = attempt_record(job, target, number, done, delay is None, self.settings)
        timed = result.sent and not given_up  # an exchange's time: none when nothing went out
        observe(job, target, number, result, delay, timed=timed)
        if not given_up:
            self.stats.count(result.outcome.value, result.duration_ms if timed else None)
        await self._write(job, target, record, result, delay, then, judged=not given_up)

    async def _defer(
        self, job: DeliveryJob, then: Then, delay: float, why: str,
        mark: circuits.PutOff | None = None,
    ) -> None:  # fmt: skip
        """Not an attempt: back to the queue, due in `delay` s, its job still ours (a fan-out's
        put-off queues a job its new holder may send too). Its progress is marked unless it has
        a mark (a count, "done"; `mark`: with its circuit state), so a fan-out's re-run skips it."""
        await self.fence.check()

        def write(pipe: Pipeline) -> None:
            if mark is None:
                pipe.set(self.keys.delivery(job.progress_id), 0, nx=True, ex=self.progress_ttl)
            else:
                mark.queue_on(pipe)
            then(pipe, delay)

        await self.writer.commit(write)
        metrics.DEFERRED.labels(reason=why).inc()

    async def _write(
        self, job: DeliveryJob, target: CallbackTarget, record: AttemptRecord,
        result: AttemptResult, delay: float | None, then: Then, *, judged: bool,
    ) -> None:  # fmt: skip
        """The attempt's one write, in the writer's next pipeline: the callback's health, its
        record with the delivery's progress and the job's end when nothing else follows (one
        script), then what else does (`then`: `steps.py`). A delivery that ends here with no
        health to write is `joint`: its record, then its release (`Step.joint`, asked before
        `job_end`), with the batch's others. A final failure: counted by `health.py`."""
        outcome = result.outcome
        failed_for_good = delay is None and outcome is not Outcome.SUCCESS
        registry, health = self.services.registry, self.services.health
        healed = outcome is Outcome.SUCCESS and target.failing
        shared = target.project_id == PLATFORM_PROJECT  # no one emitter may disable it
        emitter = (job.emitter or job.project_id) if shared else ""
        gone = outcome is Outcome.GONE and not shared  # a 410 disables a project's own
        joint = delay is None and not healed and not gone
        tail = then.joint(delay) if joint and isinstance(then, Step) else None  # asked first
        job_end = then.job_end(delay) if isinstance(then, Step) else None
        mark = DONE.decode() if delay is None else str(record["attempt"])
        ending = Ending(self.keys.delivery(job.progress_id), mark, self.progress_ttl, job_end)

        def write(pipe: Pipeline) -> None:
            if healed:
                health.succeeded(pipe, target.id)
            if not joint:
                self.services.history.record(pipe, record, dead=failed_for_good, ending=ending)
            if gone:  # after the record: a failover keeps a pipeline's start
                registry.queue_set_enabled(pipe, target.id, False, GONE_REASON)
            if job_end is None and tail is None:
                then(pipe, delay)

        recording = self.services.history.recording  # called once the record has its id
        lead = functools.partial(recording, record, dead=failed_for_good, ending=ending)
        written = self.writer.submit(write, (record,), lead if joint else None, tail)
        counted = None
        if failed_for_good and not gone and judged:
            error, created = result.error or "failed", record["createdTime"]
            counted = self.writer.submit(  # its id: given by the time this is queued
                lambda pipe: health.queue_failed(
                    pipe, target.id, error, created, record["id"], emitter=emitter
                )
            )
        self.lanes.landed(await asyncio.shield(written))  # a lane's next delivery: now
        if counted is not None:
            (reply,) = await asyncio.shield(counted)
            health.judged(target.id, reply)
        elif gone:
            disabled(target.id, "gone", GONE_REASON)


GONE_REASON = "the receiver answered 410 Gone"
