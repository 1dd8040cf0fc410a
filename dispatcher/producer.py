"""Producers: `emit()` an event, and it is queued for fan-out at once (never waits for
delivery). The Python API; the CLI and the HTTP routes reach it through the services."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import orjson
from redis.exceptions import ResponseError

from dispatcher import metrics, tracing
from dispatcher.batch import Batcher
from dispatcher.connections import REDIS_ERRORS, redis_full, transient_reply
from dispatcher.errors import DispatcherError, InvalidInput, NotReplicated, Unavailable
from dispatcher.events import EventIdReused, event_job, wire_event_job
from dispatcher.jobs import DeliveryJob, EventJob, Job
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.placement import Placement, kept_fresh
from dispatcher.queue import Queue
from dispatcher.replication import Replication, run_replicated
from dispatcher.sequence import REUSED
from dispatcher.shard import Shard
from dispatcher.topology import close_all, connect_shards, shards_of

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.models import HistoryRecord
    from dispatcher.settings import Settings

__all__ = ["Producer", "emit"]

T = TypeVar("T")


class _Jobs(NamedTuple):
    """What an `Unavailable` calls the jobs it gave up on, and says of trying again."""

    name: str
    again: str


EVENTS = _Jobs("the events", "Emitting again with the same event ids is safe.")
REDELIVERIES = _Jobs(
    "the redeliveries",
    "Asking again for a window's failures sends none twice (its count leaves out what the "
    "first ask queued); asking again for one record may send it twice if the first ask "
    "was queued: look at the delivery's attempts first.",
)
# what waiting for Redis looks like: its errors, no answer within the wait, or too few
# replicas confirming (DISPATCHER_REDIS_MIN_REPLICAS); and a reply that means "not now"
# (a reply error: full, busy with a script, ...: `connections.transient_reply`)
_UNANSWERED: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError, NotReplicated)
_WAITED_OUT: tuple[type[Exception], ...] = (*_UNANSWERED, ResponseError)


class _Lane:
    """What a producer queues with on one shard: its queue, its group commit."""

    def __init__(self, settings: Settings, redis: Redis, shard: Shard, batcher: Batcher | None):
        self.queue = Queue(redis, shard.keys)
        self.replication = Replication.of(settings, shard.keys)
        self.batcher = batcher or Batcher(redis, window=0, replication=self.replication)


class Producer:
    """Emits events. Use as an async context manager: it connects to every shard and
    queues each event on its project's shard (see `dispatcher.shards`). Or pass an
    existing connection and its `shard` (the services do): everything goes there.
    Concurrent `emit` calls share round trips (group commit through `batcher`, the
    services' one when given). With `DISPATCHER_REDIS_MIN_REPLICAS` > 0 a call returns
    once that many replicas have its jobs (see `dispatcher.replication`)."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis | None = None,
        *,
        batcher: Batcher | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.settings = settings
        self._largest = settings.api_max_body_bytes  # an event's data, as JSON, at most
        # a window redelivery's id is queued once in twice its progress mark's life
        self._once_ms = 2000 * settings.progress_ttl
        self._owns_redis = redis is None
        self._lanes: list[_Lane] = []
        self._placement = Placement(1)
        self._opened: contextlib.AsyncExitStack | None = None
        if redis is not None:
            shard = shard or Shard.single(settings.queue_name)
            self._lanes = [_Lane(settings, redis, shard, batcher)]
            self.replication = self._lanes[0].replication
        else:
            self.replication = Replication.of(settings, Keys(settings.queue_name))

    async def __aenter__(self) -> Producer:
        if self._owns_redis and not self._lanes:
            shards = shards_of(self.settings)
            clients = connect_shards(self.settings, shards)
            self._opened = stack = contextlib.AsyncExitStack()
            stack.push_async_callback(close_all, clients)
            self._lanes = [
                _Lane(self.settings, client, shard, None)
                for shard, client in zip(shards, clients, strict=True)
            ]
            self._placement = Placement(len(shards), clients[0], shards[0].keys)
            every = self.settings.placement_refresh
            try:
                await stack.enter_async_context(kept_fresh(self._placement, every))
            except BaseException:  # too few shards listed (InvalidSetting), or cancelled
                await self.close()
                raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._opened is not None:
            opened, self._opened, self._lanes = self._opened, None, []
            await opened.aclose()

    def _lane(self, project_id: str) -> _Lane:
        if not self._lanes:
            raise RuntimeError("Producer is not connected: use `async with Producer(...)`")
        return self._lanes[self._placement.shard_of(project_id)]  # 0 of one, or refused

    def queue_of(self, project_id: str) -> Queue:
        """The queue of `project_id`'s shard."""
        return self._lane(project_id).queue

    @property
    def queue(self) -> Queue:
        """The queue of a producer on one shard (the services')."""
        return self._lane("").queue

    async def emit(
        self,
        project_id: str,
        event: str,
        data: Mapping[str, Any] | None = None,
        *,
        event_id: str | None = None,
    ) -> str:
        """Queue one event for every matching callback; returns its event id.

        An `event_id` of your own makes the call idempotent while that event is queued:
        the same event (name and data) again is the one queued; another one under that id
        is refused (`EventIdReused`, nothing queued).
        The current OpenTelemetry context, when there is one, goes with the event.
        """
        lane = self._lane(project_id)
        with tracing.emitting() as emission:
            job = event_job(
                project_id, event, data, event_id, trace=emission.trace, max_bytes=self._largest
            )
            emission.emitted(project_id, [job.id])
            (answer,) = await self._patiently(
                lambda: lane.batcher.execute(lambda pipe: lane.queue.push(pipe, job))
            )
        if answer == REUSED:
            raise EventIdReused([job])
        metrics.EVENTS_EMITTED.inc()
        return job.id

    async def emit_many(
        self,
        events: Iterable[
            tuple[str, str, Mapping[str, Any]] | tuple[str, str, Mapping[str, Any], str | None]
        ],
    ) -> list[str]:
        """Queue many `(project_id, event, data[, event_id])` in one round trip; returns
        their ids. Every event is checked before any is queued. With event ids of your own,
        emitting the same list again is safe (what is still queued is not queued twice); an
        id that names another event still queued is refused: `EventIdReused`, raised once
        the others are queued, with each event's id or refusal in its `outcomes`. The
        current OpenTelemetry context, when there is one, goes with every event."""
        with tracing.emitting() as emission:
            jobs = [
                event_job(*event, trace=emission.trace, max_bytes=self._largest) for event in events
            ]
            projects = {job.project_id for job in jobs}  # a batch of several names none
            emission.emitted(projects.pop() if len(projects) == 1 else "", [j.id for j in jobs])
            refused = await self._enqueue(jobs)
        if refused:
            skipped = set(refused)
            outcomes = [None if i in skipped else job.id for i, job in enumerate(jobs)]
            raise EventIdReused([jobs[i] for i in refused], len(jobs) - len(refused), outcomes)
        return [job.id for job in jobs]

    async def emit_each(
        self, project_id: str, entries: Sequence[Any | InvalidInput]
    ) -> list[str | DispatcherError]:
        """Queue every well-formed `{"event", "data", "eventId"?}` of `entries` in one round
        trip, whatever the others hold; returns, in order, each one's event id or why it was
        refused (an `InvalidInput` among `entries`, say a line that could not be read,
        stands for itself). An `eventId` already queued is not queued again: the same event
        is answered with its id, another one with `EventIdReused`. The current
        OpenTelemetry context, when there is one, goes with every event."""
        outcomes: list[str | DispatcherError] = []
        jobs: list[EventJob] = []
        places: list[int] = []  # each job's in `outcomes`
        with tracing.emitting() as emission:
            for entry in entries:
                if isinstance(entry, InvalidInput):
                    outcomes.append(entry)
                    continue
                try:
                    job = wire_event_job(project_id, entry, emission.trace, self._largest)
                except InvalidInput as exc:
                    outcomes.append(exc)
                    continue
                places.append(len(outcomes))
                jobs.append(job)
                outcomes.append(job.id)
            emission.emitted(project_id, [job.id for job in jobs])
            for refused in await self._enqueue(jobs):
                outcomes[places[refused]] = EventIdReused([jobs[refused]])
        return outcomes

    async def _enqueue(self, jobs: Sequence[EventJob]) -> list[int]:
        """Queue events the emit methods checked (the only way in: a job built by hand
        would skip the checks), one round trip per shard they go to, the shards at once (an
        id already queued stays as it is); returns the places in `jobs` of those refused,
        their ids naming other events still queued."""
        answers = await self._push(jobs, EVENTS)
        refused = [place for place, answer in enumerate(answers) if answer == REUSED]
        metrics.EVENTS_EMITTED.inc(len(jobs) - len(refused))
        return refused

    async def requeue(self, jobs: Sequence[DeliveryJob], *, once: bool = False) -> int:
        """Queue deliveries (redeliveries of recorded requests) as `_enqueue` queues events;
        returns how many were queued. `once`: a job id queued before, while its progress
        could last, is not queued again (a window's redeliveries)."""
        return sum(await self._push(jobs, REDELIVERIES, once=once))

    async def requeue_each(self, jobs: Sequence[DeliveryJob], *, once: bool = False) -> list[bool]:
        """`requeue`, saying of each job whether it was queued (not there already)."""
        return [answer == 1 for answer in await self._push(jobs, REDELIVERIES, once=once)]

    async def _push(self, jobs: Sequence[Job], kind: _Jobs, *, once: bool = False) -> list[int]:
        """The one way jobs are queued: grouped by the shard of their project, every group
        in one round trip, Redis waited out (`_patiently`); returns each job's answer (1
        queued, 0 there already, `REUSED`), in the order of `jobs`."""
        by_lane: dict[int, tuple[_Lane, list[int]]] = {}
        for place, job in enumerate(jobs):
            lane = self._lane(job.project_id)
            by_lane.setdefault(id(lane), (lane, []))[1].append(place)
        groups = list(by_lane.values())
        answers = await asyncio.gather(
            *(self._push_many(lane, [jobs[i] for i in mine], kind, once) for lane, mine in groups)
        )
        each = [0] * len(jobs)
        for (_, mine), chunks in zip(groups, answers, strict=True):
            for place, answer in zip(mine, (a for chunk in chunks for a in chunk), strict=True):
                each[place] = answer
        return each

    async def _push_many(self, lane: _Lane, jobs: list[Job], kind: _Jobs, once: bool) -> list[Any]:
        queue, mine = lane.queue, uuid.uuid4().hex  # a try again knows its first's pushes
        once_ms = self._once_ms if once else 0

        def push(pipe: Pipeline) -> None:
            queue.push_many(pipe, jobs, nonce=mine, once_ms=once_ms)

        return await self._patiently(
            lambda: run_replicated(queue.redis, push, lane.replication), kind
        )

    async def _patiently(self, enqueue: Callable[[], Awaitable[T]], kind: _Jobs = EVENTS) -> T:
        """Run `enqueue`, waiting out a Redis that does not answer, or answers "not now"
        (full at `maxmemory`, busy with a script, ...: `connections.TRANSIENT_REPLIES`), for
        up to `DISPATCHER_EMIT_WAIT` seconds. Enqueueing is idempotent (a
        job id already queued is left alone), so a try whose answer was lost, or that Redis
        took only in part, can be made again. `kind`: what the error calls the jobs."""
        deadline = time.monotonic() + self.settings.emit_wait
        delay = 0.05
        shortfall: NotReplicated | None = None  # the master had them; the replicas did not
        while True:
            left = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    return await enqueue()
            except _WAITED_OUT as exc:
                if not isinstance(exc, _UNANSWERED) and not transient_reply(exc):
                    raise
                if isinstance(exc, NotReplicated):
                    shortfall = exc
                if redis_full(exc):
                    metrics.REDIS_FULL.labels(refused="emit").inc()
                if time.monotonic() + delay >= deadline:
                    raise Unavailable(
                        f"{_unanswered(shortfall or exc, kind.name)} after "
                        f"{self.settings.emit_wait:g} s (DISPATCHER_EMIT_WAIT). {kind.again}"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    @staticmethod
    def redelivery_job(record: HistoryRecord, *, after: int | None = None) -> DeliveryJob:
        """The job that sends a recorded request again: same body (as it was, even from an
        older version) and delivery id (for the receiver's de-duplication), a fresh
        progress id (or the one of the redelivery that follows the delivery's attempt
        `after`: `DeliveryJob.redelivery`), the callback's current token, the emitter its
        body names."""
        if record.callback_id is None or record.delivery_id is None:
            raise InvalidInput(f"history record {record.id} cannot be redelivered: no callback")
        if record.request_body_truncated:
            raise InvalidInput(
                f"history record {record.id} cannot be redelivered: its stored body was "
                "truncated (raise DISPATCHER_MAX_REQUEST_BODY), or lost from Redis"
            )
        original = DeliveryJob(
            delivery_id=record.delivery_id,
            progress_id=record.delivery_id,
            event_id=record.event_id or "",
            project_id=record.project_id,
            event=record.events,
            body=record.request_body.encode(),
            callback_id=record.callback_id,
            emitter=_emitter_of(record),
            trace=tracing.TraceContext.read(record.model_dump(include=_TRACE_FIELDS)),
        )
        return original.redelivery(record.id, after=after)

    async def redeliver(self, record: HistoryRecord) -> str:
        """Queue `redelivery_job(record)`; returns its job id."""
        job = self.redelivery_job(record)
        await self.requeue([job])
        return job.job_id


def _unanswered(exc: Exception, jobs: str) -> str:
    """Why queueing `jobs` gave up, for the producer."""
    if isinstance(exc, NotReplicated):
        return (
            f"{jobs} are queued on Redis' master, but {exc.message}, so they would be "
            "lost if it failed now; gave up"
        )
    if redis_full(exc):
        return (
            f"Redis is full (maxmemory reached, writes refused); {jobs} may not be queued, "
            "or only some of them"
        )
    if isinstance(exc, ResponseError):  # another "not now"
        return f"Redis answers 'not now' ({exc}); {jobs} may not be queued, or only some of them"
    return f"Redis is unreachable ({str(exc) or type(exc).__name__}); {jobs} may not be queued"


# a record's trace context: what a redelivery continues
_TRACE_FIELDS = {"traceparent", "tracestate"}


def _emitter_of(record: HistoryRecord) -> str:
    """The project a recorded request's body names as its emitter; for a body of an older
    version (none named), the record's project, unless it is the platform's (unknown)."""
    try:
        named = orjson.loads(record.request_body).get("projectId")
    except (orjson.JSONDecodeError, AttributeError):
        named = None
    if isinstance(named, str):
        return named
    return "" if record.project_id == PLATFORM_PROJECT else record.project_id


async def emit(
    project_id: str,
    event: str,
    data: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    event_id: str | None = None,
) -> str:
    """Emit one event with a short-lived connection. For many, keep a `Producer` open."""
    from dispatcher.settings import Settings

    async with Producer(settings or Settings()) as producer:
        return await producer.emit(project_id, event, data, event_id=event_id)
