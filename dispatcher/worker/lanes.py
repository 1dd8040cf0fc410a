"""Ordered delivery: the deliveries of one lane start one after another, in event order.

A callback registered with `orderBy` (see `registry.options`) has one *lane* per value of
that path in its events' data, shared by the callbacks of the same URL, owner and path
(one per event, as the batch route makes them), per emitting project (`lane_ids.lane_id`). A
lane is a sorted set of deliveries' progress ids (`{delivery id}@{emittedAt}`) scored by
their event's number, which Redis gave the event when it queued it (`dispatcher.sequence`).
Its lowest member, the *head*, is the one delivery of the lane that may be attempted; the
others wait, their `deliver` jobs parked (stored, out of the queue). Three scripts keep it
(`lane_scripts.py`, `lane_release.py`):

- enter, at fan-out, before any attempt (one call per chunk of the event's callbacks that
  has an ordered delivery, or whose project numbers its events: `match.Chunk.numbered`):
  each ordered delivery joins its lane; a head is attempted at once, inside the fan-out,
  as any delivery is; the others are parked. A head waits while an event of its project
  numbered lower may still add a delivery to a lane: one in the project's *pending* set
  still queued. That event's last chunk, or an earlier one after which none of its
  event's callbacks is ordered, moves it to the *ready* set before its attempts, and
  wakes the heads that waited for it; their jobs look again meanwhile after half their
  event's age (50 ms to 5 s: `lane_scripts.recheck_at`), for one that never comes (dropped).
- head, before a queued `deliver` job's attempt: a job that is no longer its lane's head
  (a lower-numbered delivery joined after it was queued) is parked again; one whose
  earlier events are still being fanned out waits; one that goes on wakes its project's
  heads waiting with it (numbered no higher: their earlier events are in their lanes).
- release, queued on the pipeline that writes the delivery's end (its SUCCESS record, its
  final FAILED record, or its recorded drop), after them: the head leaves its lane, its job
  ends, and the lane's next delivery is taken for this worker (leased as a claimed job,
  queued under that lease) and answered with what its attempt needs; `landed` starts it at
  once (`Adopt`: the worker loop runs it as one of its jobs). No claim and no read stand
  between two deliveries of a lane. A crash cannot release a lane without its record; a
  record written without its release (a crash mid-pipeline) is released again by the
  job's next run, which finds the delivery done; a taken delivery whose worker died is
  claimed again once its lease lapses.

Retries and deferrals of the head hold its lane (its job waits in the queue as any other),
and so does a head waiting for its earlier events or its project's move: the lane is then
*blocked*, listed in `LANES_BLOCKED` by when (the first wait or put-back), until the head
ends. A
delivery run twice (its worker killed mid-attempt) repeats the head of its lane, never a
delivery behind it. An event whose data has no value at the path is delivered unordered,
and its records say so (`orderNote`), as are events queued before the callback was ordered.
Redeliveries of past records bypass lanes. An event's ordered deliveries keep its body
once, for ever while parked, not in each job (`dispatcher.bodies`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher import metrics
from dispatcher.bodies import GONE as BODY_GONE
from dispatcher.bodies import body_key, read
from dispatcher.clock import now_ms
from dispatcher.jobs import BadJob, DeliveryJob, decode, encode
from dispatcher.keys import SEP
from dispatcher.lane_ids import lane_id
from dispatcher.registry.match import TARGET_FIELDS, CallbackTarget, event_scopes
from dispatcher.registry.options import order_key
from dispatcher.worker.fence import running
from dispatcher.worker.lane_release import NEXT_TAG, SKIPPED_TAG, Release
from dispatcher.worker.lane_scripts import LATE, RECHECK_S, Enter, Head, recheck_at
from dispatcher.worker.steps import ChunkEnd, LaneStep

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.ending import JobEnd
    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.worker.marks import Marked
    from dispatcher.worker.writer import Then, Writer

__all__ = ["Adopt", "Lanes", "Sending"]

HELD_RECHECK_S = 1.0  # a head whose project is moving here, its old lanes still busy
NO_KEY = "unordered: the event's data has no value at orderBy {path!r}"
NOT_NUMBERED = "unordered: the event was queued before its callback was ordered"
GONE = "callback deleted or disabled"
DISABLED_RECHECK_S = 60.0  # a lane's head whose callback is disabled: looked at again
KEPT_TARGETS = 1024  # the lanes' next deliveries' targets a worker keeps (see `_target`)
TOGETHER_ENTRIES = 10  # a fan-out chunk's entries at most, to run with others' (50 a call)
_FIELDS = [name.encode() for name in TARGET_FIELDS]  # what a lane's next delivery needs

Attempt = tuple[DeliveryJob, CallbackTarget, "Then"]
Decrypt = Callable[[bytes | None], str]


@dataclass(frozen=True, slots=True)
class Adopt:
    """How a worker runs a lane's next delivery that a release took for it: its lease
    token, `spawn` (runs the work as one of its jobs, under that lease), `step_of` (the
    job's next step: back to the queue for a retry)."""

    token: str
    spawn: Callable[[str, Callable[[], Awaitable[None]]], None]
    step_of: Callable[[str], Then]


@dataclass(frozen=True, slots=True)
class Sending:
    """What the lanes need of the delivery engine: its attempt, its recorded drop, how a
    callback's secrets are read, and its deferral (not an attempt: due again later)."""

    attempt: Callable[[DeliveryJob, CallbackTarget, int, Then, bytes | None], Awaitable[None]]
    drop: Callable[[DeliveryJob, str, Then, str], Awaitable[None]]  # (..., the metric's kind)
    decrypt: Decrypt
    defer: Callable[[DeliveryJob, Then, float, str], Awaitable[None]]  # (..., delay, why)


class Lanes:
    """The lanes of one shard, as one worker process keeps them (its writer writes)."""

    def __init__(
        self, keys: Keys, writer: Writer, sending: Sending, *, progress_ttl: int, lease_s: float
    ) -> None:
        self.keys = keys
        self.writer = writer
        self.sending = sending
        self.progress_ttl = progress_ttl
        self.lease_ms = int(lease_s * 1000)
        self.adopt: Adopt | None = None  # set by the worker loop: next deliveries run at once
        self.released = 0  # releases queued: the loop looks for a next head at once
        self._targets: dict[tuple[object, ...], CallbackTarget] = {}  # by callback and fields

    def lane(self, job: DeliveryJob) -> str:
        assert job.lane is not None
        return self.keys.lane(job.lane)

    # ---- at fan-out ----------------------------------------------------------------------

    async def enter(
        self,
        event: EventJob,
        pending: list[tuple[DeliveryJob, CallbackTarget]],
        then_of: Callable[[DeliveryJob], Then],
        *,
        after: int | None = None,
        holding: bool = False,
        end: ChunkEnd | None = None,
    ) -> list[Attempt]:
        """The first attempts of a fan-out's chunk to make now: every unordered delivery,
        and each ordered one that heads its lane (the others are parked, in one write).
        `after`: where the event's next chunk starts (None: this is its last, no more of
        its deliveries will join a lane); `end`, its job's end, which the parking write
        takes when no attempt is made now. `holding`: the event may hold its project's
        lanes (its project numbers events: `Chunk.numbered`); if it does (`Enter` looks),
        it lets them go before this chunk's attempts, though none of them is ordered (one
        script, run with the batch's other entries), when this is its last chunk or no
        ordered callback of its event lies beyond `after`."""
        now: list[Attempt] = []
        ordered: list[tuple[DeliveryJob, CallbackTarget]] = []
        for job, target in pending:
            path = target.options.order_by
            key = None if path is None else order_key(path, event.data)
            if path is None:
                now.append((job, target, then_of(job)))
            elif key is None:
                job = dataclasses.replace(job, order_note=NO_KEY.format(path=path))
                now.append((job, target, then_of(job)))
            else:
                ordered.append((_in_lane(job, target, path, key), target))
        if ordered or holding:
            now += await self._enter(event, ordered, then_of, after, None if now else end)
        return now

    async def ready(self, event: EventJob, after: int | None, end: ChunkEnd | None) -> None:
        """A chunk of an event that may hold its project's lanes matched no callback:
        the event lets them go when `enter` would (and its job ends with its last chunk
        when it did, in that script)."""
        await self._enter(event, [], _unused, after, end)

    async def _enter(
        self,
        event: EventJob,
        ordered: list[tuple[DeliveryJob, CallbackTarget]],
        then_of: Callable[[DeliveryJob], Then],
        after: int | None,
        end: ChunkEnd | None,
    ) -> list[Attempt]:
        stamp = now_ms()
        enter = Enter.of(
            self.keys,
            event.project_id,
            event.job_id,
            [(self.lane(job), job.job_id, encode(job, stamp)) for job, _ in ordered],
            progress_ttl=self.progress_ttl,
            now_ms=stamp,
            recheck_ms=stamp + int(RECHECK_S * 1000),
            last=after is None,
            end=None if end is None else end.job_end(None),
            body=_kept(self.keys, [job for job, _ in ordered]),
            refers={job.job_id for job, _ in ordered if job.body_of is not None},
            beyond=None if after is None else (self._levels(event), after),
        )
        if len(ordered) <= TOGETHER_ENTRIES:  # with the batch's other entries: one call
            answer = await self.writer.together(enter)
        else:  # a big chunk's, alone: a joint call of many would hold Redis too long
            (answer,) = await self.writer.commit(enter.queue_on)
        if answer is None:  # queued before the callback was ordered: no number
            answer = [LATE] * len(ordered) + [0, 0]
        *verdicts, woken, ended = answer
        if end is not None and not ended:  # attempts made now carry it, or the job loop
            end.written = False
        if woken:  # heads that waited for this event are due now: the loop claims them
            self.released += 1
        now: list[Attempt] = []
        for (job, target), verdict in zip(ordered, verdicts, strict=True):
            if verdict == 1:
                now.append((job, target, self.releasing(job, then_of(job), then_at_end=True)))
            elif verdict == LATE:  # ordered since: goes as any delivery of an event before
                late = dataclasses.replace(job, order_key=None, lane=None, order_note=NOT_NUMBERED)
                now.append((late, target, then_of(late)))
        return now

    def _levels(self, event: EventJob) -> list[str]:
        """The match sets of the callbacks `event` goes to, at each level (`registry.match`)."""
        scopes = event_scopes(event.project_id, event.pipeline_id)
        return [self.keys.match(scope, event.event) for scope, _ in scopes]

    def lane_of(self, event: EventJob, job: DeliveryJob, target: CallbackTarget) -> str | None:
        """The key of the lane `job` (of `event`, to `target`) joins; None: unordered."""
        joined = self._joined(event, job, target)
        return None if joined is None else self.lane(joined)

    async def ended_before(self, event: EventJob, marked: list[Marked]) -> None:
        """A fan-out run again: the ordered deliveries that ended in the run before (their
        progress mark done) release their lanes again, in case that run wrote their records
        but not their releases (it died mid-pipeline). Written before the run's entries:
        those may end its job, and run first in a batch (a failover that kept only the
        batch's start would have ended the job with a lane left held)."""
        releases = [
            self.writer.commit(self._releaser(joined))
            for job, target, mark in marked
            if mark == b"done" and (joined := self._joined(event, job, target)) is not None
        ]
        for answer in await asyncio.gather(*releases):
            self.landed(answer)  # (none taken: counts what they dropped)

    @staticmethod
    def _joined(event: EventJob, job: DeliveryJob, target: CallbackTarget) -> DeliveryJob | None:
        """`job` in its lane, when its callback is ordered and `event` has its key."""
        path = target.options.order_by
        key = None if path is None else order_key(path, event.data)
        return None if path is None or key is None else _in_lane(job, target, path, key)

    def _releaser(self, job: DeliveryJob) -> Callable[[Pipeline], None]:
        return lambda pipe: self.release(pipe, job, take=False)

    # ---- a queued delivery's turn ----------------------------------------------------------

    async def claimed(self, job: DeliveryJob, then: Then) -> Then | None:
        """Before a `deliver` job's attempt: its next step, releasing its lane when it ends;
        None when it is not its turn (it was parked, or waits: back in the queue, in the
        same script)."""
        lane, project = self.lane(job), job.emitter or job.project_id
        job_id, stamp = job.job_id, now_ms()

        head = Head.of(
            self.keys,
            lane,
            project,
            job_id,
            recheck_ms=recheck_at(job, stamp),
            held_ms=stamp + int(HELD_RECHECK_S * 1000),
            body=None if job.body_of is None else body_key(self.keys, job),
            now_ms=stamp,
        )
        (verdict,) = await self.writer.commit(head.queue_on)
        return self.releasing(job, then) if verdict == 1 else None

    # ---- a delivery's end ------------------------------------------------------------------

    def releasing(self, job: DeliveryJob, then: Then, *, then_at_end: bool = False) -> Then:
        """The step after an ordered delivery's attempt: when it ended, its lane's release
        (queued after its record; it ends the delivery's job too, so `then` follows only
        with `then_at_end`: a fan-out's attempt, whose `then` may end the fan-out's job;
        when that is all it does, the release ends the fan-out's job instead: one script),
        else `then` (a retry, a deferral), which marks the lane blocked; run under the
        lease of the job the task runs (`fence.running`: a fan-out's, or its own)."""
        return LaneStep(self, job, then, then_at_end, running.get())

    def release(
        self, pipe: Pipeline, job: DeliveryJob, *, take: bool, end: JobEnd | None = None
    ) -> None:
        """Queue the end of `job`'s turn in its lane, with the end of its job (or of the
        job `end` names); `take`: the next one is this worker's (see `landed`)."""
        self.release_script(job, take=take, end=end).queue_on(pipe)

    def release_script(
        self, job: DeliveryJob, *, take: bool, end: JobEnd | None = None, under: str | None = None
    ) -> Release:
        """`release`, as the script to run (it counts as released now)."""
        self.released += 1
        stamp = now_ms()
        return Release.of(
            self.keys,
            self.lane(job),
            job.emitter or job.project_id,
            job.job_id,
            token=self.adopt.token if take and self.adopt is not None else "",
            lease_ms=self.lease_ms,
            now_ms=stamp,
            recheck_ms=stamp + int(RECHECK_S * 1000),
            progress_ttl=self.progress_ttl,
            end=end,
            body=None if job.body_of is None or end is not None else body_key(self.keys, job),
            under=under,
        )

    def landed(self, answer: list[Any]) -> None:
        """After a write: each next delivery a release in it took starts now; those it
        dropped, their job gone (`lane_lua.FIRST_THERE`), are counted."""
        for item in answer:
            if isinstance(item, list) and item and item[0] in (NEXT_TAG, SKIPPED_TAG):
                if item[-1]:
                    metrics.DROPPED.labels(reason="job").inc(int(item[-1]))
                if item[0] == NEXT_TAG:
                    self._take(item)

    def _take(self, taken: list[Any]) -> None:
        _, job_id, raw, progress, waiting, pairs, _ = taken
        adopt = self.adopt
        try:
            job = DeliveryJob.from_wire(decode(raw).payload, job_id.decode())
        except BadJob:  # left to its lease: claimed again, it is recorded as poison
            return
        if adopt is None:
            return
        row = dict(zip(pairs[::2], pairs[1::2], strict=True))  # the callback's hash
        fields = [row.get(name) for name in _FIELDS]
        target = None
        if fields[0] is not None and fields[1] == b"1":
            target = self._target(job.callback_id, fields, row[b"projectId"])
        then = LaneStep(self, job, adopt.step_of(job.job_id), False, job.job_id)  # its own lease

        async def work() -> None:
            if progress == b"done":  # it ended, its release was lost (a crash mid-write)
                self.landed(await self.writer.commit(lambda pipe: then(pipe, None)))
            elif target is None:
                await self.gone(job, then, there=fields[0] is not None)
            elif (found := await read(self.writer.redis, self.keys, job, 0)) is None:
                await self.sending.drop(job, BODY_GONE, then, "body")  # never sent empty
            else:
                number, state = int(progress or 0) + 1, waiting or None  # ('': none)
                await self.sending.attempt(found, target, number, then, state)

        adopt.spawn(job.job_id, work)

    async def gone(self, job: DeliveryJob, then: Then, *, there: bool | None = None) -> None:
        """A delivery whose callback is not there to send it (`there`: its hash is; read when
        None): dropped on record; an ordered one whose callback is disabled, not deleted, is
        deferred `DISABLED_RECHECK_S`, its lane held, its members parked: sent once the
        callback is enabled again (its lane going on in order), dropped once it is deleted."""
        if job.lane is not None and there is None:
            there = bool(await self.writer.redis.exists(self.keys.callback(job.callback_id)))
        if job.lane is not None and there:
            await self.sending.defer(job, then, DISABLED_RECHECK_S, "disabled")
        else:
            await self.sending.drop(job, GONE, then, "callback")

    def _target(self, callback_id: int, fields: list[bytes | None], owner: bytes) -> CallbackTarget:
        """The target of a lane's next delivery, from its callback's hash: kept while the
        hash's fields stay the same (its secrets, URL and options read once, not once per
        delivery); one whose rotated token still signs is not (its overlap ends by the
        clock, as `Matches` has it)."""
        key = (callback_id, owner, *fields)
        target = self._targets.get(key)
        if target is None:
            decrypt = self.sending.decrypt
            target = CallbackTarget.from_fields(callback_id, fields, decrypt, owner=owner.decode())
            if not target.previous_token:
                if len(self._targets) >= KEPT_TARGETS:  # (many callbacks' lanes: start over)
                    self._targets.clear()
                self._targets[key] = target
        return target


def _unused(job: DeliveryJob) -> Then:
    raise AssertionError("no delivery to step on")  # (`Lanes.ready` enters none)


def _in_lane(job: DeliveryJob, target: CallbackTarget, path: str, key: str) -> DeliveryJob:
    """`job` in its lane: the deliveries to its callback's URL (every event it is
    registered for there with the same `orderBy`) of its project's events with `key`. A
    body its event's deliveries share is kept apart for the lanes (`bodies.body_key`). The
    job and its records carry the key as the lane names it (its id's last part: past
    `lane_ids.LANE_KEY_MAX` characters, `#` and its hash), not whole in each of them."""
    lane = lane_id(target.project_id, target.url, path, job.event_project, key)
    return dataclasses.replace(job, order_key=lane.split(SEP, 2)[2], lane=lane)


def _kept(keys: Keys, jobs: list[DeliveryJob]) -> tuple[str, bytes] | None:
    """Where an event's body is kept for its parked deliveries, and its bytes, when any
    refers to it (a re-run's delivery under its old id does not: `worker.marks`)."""
    job = next((job for job in jobs if job.body_of is not None), None)
    return None if job is None else (body_key(keys, job), job.body)
