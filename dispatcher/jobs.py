"""Jobs on the queue: their names, and typed payloads to and from the wire (the queue that
holds them: `dispatcher.queue`).

The wire format is arq's, so any arq client can enqueue and arq's tools can read the
queue: `arq:job:{id}` holds `{"t", "f", "a", "k", "et"}` (encoded as JSON, never pickle)
and the queue's sorted set scores each job id by when it is due (epoch ms). Two jobs exist:

- `fan_out(EventJob)`: one per emitted event, job id = `{project}:{event id}`. It delivers
  a chunk of the event's callbacks (those after its cursor, `after`), then moves on: the
  same job, its cursor the last callback id done, is due again for the next chunk.
- `deliver(DeliveryJob)`: a retry or a redelivery of one delivery, job id = its progress id
  (for retries `{delivery id}@{emittedAt}`: one emission's, so that an event id emitted
  again once its event ended starts over under ids of its own; a fresh id per redelivery of
  one record, and one id per delivery and newest attempt for a window's: `redelivery`).

Either carries the W3C trace context its attempts continue (`traceparent`, `tracestate`:
see `dispatcher.tracing`), absent when there is none.

Ids are scoped by the emitting project (event ids are the producers' own, so two projects
may use the same): a delivery id is `{project}:{event id}.{callback id}`, the same on every
retry and redelivery (the receiver's `webhook-id`). An event job queued by a version before
scoped ids (its payload has no `"ids": "project"`) keeps its unscoped ids to its end, so
that what such a job already recorded is found again.

A job whose bytes are not such an object is *poison*: the worker records it and removes it,
never retries it.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.clock import now_ms
from dispatcher.keys import project_scoped
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.tracing import TraceContext

if TYPE_CHECKING:
    pass

__all__ = [
    "DELIVER",
    "DIGEST_LEAD",
    "FAN_OUT",
    "REDELIVERY",
    "BadJob",
    "DeliveryJob",
    "EventJob",
    "WireJob",
    "decode",
    "delivery_of",
    "encode",
    "job_deserializer",
    "job_serializer",
    "new_event_id",
    "retry_project",
]

FAN_OUT = "fan_out"
DELIVER = "deliver"
SCOPED = "project"  # an event job's `ids`: its job and delivery ids are scoped by project
# What a redelivery's progress id (its job id) holds after its delivery id; no event id may
# hold it (`dispatcher.events`), or a fan-out's job id could be a redelivery's
REDELIVERY = ":redeliver:"
_WIRE_FIELDS = ("f", "a", "k", "et")
_RETRY_ID = re.compile(r"([^:]+):.+\.\d+@\d+", re.DOTALL)  # see `retry_project`


class BadJob(ValueError):
    """A job that cannot be read: not JSON, not an arq job, or a payload of the wrong shape."""


def new_event_id() -> str:
    return "evt_" + uuid.uuid4().hex


def delivery_of(progress_id: str) -> str:
    """The delivery id a first delivery's progress id (`{delivery id}@{emittedAt}`) names;
    one without the emission (a version before's) is its delivery id already."""
    delivery_id, at, emitted = progress_id.rpartition("@")
    return delivery_id if at and emitted.isdigit() else progress_id


def retry_project(job_id: str) -> str | None:
    """The project a retry's job id of today names (`{project}:{event id}.{callback
    id}@{emittedAt}`: `_RETRY_ID`), else None. A version before scoped ids named a job by
    its event id alone, which may hold `:` (event `victim:x`'s fan-out `victim:x`, its
    retry `victim:x.5`, redeliveries `….5:redeliver:…`), so its ids look like today's
    fan-out and redelivery ids; none of its ids ended with `@{emittedAt}`. (An event job
    it queued that this version runs makes retries `{event id}.{callback id}@{emittedAt}`:
    one of them whose event id holds `:`, its data expired, is taken for today's.)"""
    found = _RETRY_ID.fullmatch(job_id)
    return found[1] if found else None


def _text(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise BadJob(f"payload has no string {name!r}")
    return value


@dataclass(frozen=True, slots=True)
class EventJob:
    """An emitted event, waiting to be fanned out to its callbacks: those after callback id
    `after` (0: from the first). `rerun`: a chunk after a re-run, which reads what was
    recorded before (the run that died may have drawn other chunk bounds)."""

    id: str
    project_id: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    emitted_at: int = 0
    after: int = 0
    trace: TraceContext | None = None  # the emitter's, when it had one
    scoped: bool = True  # False: queued by a version whose ids were the event id alone
    rerun: bool = False
    # `data` as JSON when the producer has it already (it checked the data by encoding
    # it): the job's bytes embed it rather than encoding the data again
    data_json: bytes | None = field(default=None, compare=False, repr=False)
    # what tells this event from another under its id (`dispatcher.events`): it leads the
    # job's bytes (`DIGEST_LEAD`), where the queue's script reads it; '' for none (a job
    # of a version before, or built by hand)
    digest: str = ""

    function = FAN_OUT

    @property
    def job_id(self) -> str:
        """`{project}:{event id}` (the event id alone for a job of an older version)."""
        return project_scoped(self.project_id, self.id) if self.scoped else self.id

    @property
    def pipeline_id(self) -> object:
        """What the producer's data names as the pipeline (checked by the registry)."""
        return self.data.get("pipelineId")

    def continued(self, after: int, *, rerun: bool = False) -> EventJob:
        """The same event, from the callback after `after` on (`rerun`: see the class)."""
        return dataclasses.replace(self, after=after, rerun=rerun)

    def to_wire(self) -> dict[str, Any]:
        data = self.data if self.data_json is None else orjson.Fragment(self.data_json)
        if self.digest:  # first, where the queue's script reads it
            wire = {"digest": self.digest, "id": self.id, "projectId": self.project_id,
                    "event": self.event, "data": data, "emittedAt": self.emitted_at}  # fmt: skip
        else:
            wire = {"id": self.id, "projectId": self.project_id, "event": self.event,
                    "data": data, "emittedAt": self.emitted_at}  # fmt: skip
        if self.after:
            wire["after"] = self.after
        if self.trace is not None:
            wire.update(self.trace.fields())
        if self.scoped:
            wire["ids"] = SCOPED
        if self.rerun:
            wire["rerun"] = True
        return wire

    @classmethod
    def from_wire(cls, payload: Any, enqueued_ms: int = 0) -> EventJob:
        """`enqueued_ms`: the job's, standing for when it was emitted when the payload does
        not say (an event queued by another arq client): its emission's progress ids."""
        if not isinstance(payload, dict):
            raise BadJob("event payload is not an object")
        data = payload.get("data", {})
        if not isinstance(data, dict):
            raise BadJob("event payload's `data` is not an object")
        return cls(
            id=_text(payload, "id"),
            project_id=_text(payload, "projectId"),
            event=_text(payload, "event"),
            data=data,
            emitted_at=int(payload.get("emittedAt") or enqueued_ms),
            after=int(payload.get("after") or 0),
            trace=TraceContext.read(payload) if "traceparent" in payload else None,
            scoped=payload.get("ids") == SCOPED,
            rerun=payload.get("rerun") is True,
            digest=digest if isinstance(digest := payload.get("digest"), str) else "",
        )


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One event going to one callback: a retry, or a redelivery of a recorded request."""

    delivery_id: str
    progress_id: str  # whose attempt count this is: the delivery, or one redelivery of it
    event_id: str
    project_id: str  # the callback's project (its history's), the platform's for its own
    event: str
    body: bytes
    callback_id: int
    redelivery_of: int | None = None
    emitter: str = ""  # the project that emitted the event ('' when unknown)
    trace: TraceContext | None = None  # what its attempts continue (see dispatcher.tracing)
    # ordered delivery (see dispatcher.worker.lanes): its lane, its key (a long one by its
    # hash: `lane_ids.lane_id`), or why it has none
    order_key: str | None = None
    order_note: str | None = None
    lane: str | None = None
    # its event's body kept once for the event's retries (`dispatcher.bodies`): the key's
    # scope, `{project}:{event id}@{emittedAt}`; the job's bytes then hold no body
    body_of: str | None = None

    function = DELIVER

    @property
    def job_id(self) -> str:
        return self.progress_id

    @property
    def event_project(self) -> str:
        """The project whose event it delivers: its emitter; unknown (a platform-wide
        callback's job of a version that did not name it), its callback's project. Its
        lane is of that project, and its drops are filed under it (`record.keep_drop`)."""
        return self.emitter or self.project_id

    @classmethod
    def first(
        cls,
        event: EventJob,
        callback_id: int,
        body: bytes,
        owner: str | None = None,
        trace: TraceContext | None = None,
        *,
        shared: bool = False,
    ) -> DeliveryJob:
        """The delivery of `event` to one callback (delivery id `{event's job id}.{callback
        id}`: `{project}:{event id}.{callback id}`; progress id, that `@{emittedAt}`: its
        marks and retry are this emission's). `owner` is the callback's project, where its
        history goes, when not the event's (a platform-wide callback's); `trace`, what its
        attempts continue; `shared`: its retry refers to the body the event's other
        retries share (an emission's: an event job that does not say when it was emitted
        keeps its body in its retries)."""
        delivery_id = f"{event.job_id}.{callback_id}"
        progress_id = f"{delivery_id}@{event.emitted_at}" if event.emitted_at else delivery_id
        body_of = None
        if shared and event.emitted_at:
            body_of = _body_of(event.project_id, event.id, progress_id)
        return cls(delivery_id, progress_id, event.id, owner or event.project_id, event.event,
                   body, callback_id, emitter=event.project_id, trace=trace,
                   body_of=body_of)  # fmt: skip

    def redelivery(self, record_id: int, *, after: int | None = None) -> DeliveryJob:
        """The same request again (same delivery id) under a fresh progress id, or, `after`
        the delivery's attempt of that record id, under the one id of the redelivery that
        follows it (queued once: `Queue.push_many`)."""
        if self.body_of is not None and not self.body:  # read back, its body never read
            raise ValueError(f"{self.job_id}: a redelivery of a job without its kept body")
        mark = uuid.uuid4().hex[:12] if after is None else f"after-{after}"
        progress_id = f"{self.delivery_id}{REDELIVERY}{mark}"
        return DeliveryJob(self.delivery_id, progress_id, self.event_id, self.project_id,
                           self.event, self.body, self.callback_id, record_id,
                           self.emitter, self.trace)  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "deliveryId": self.delivery_id,
            "progressId": self.progress_id,
            "eventId": self.event_id,
            "projectId": self.project_id,
            "event": self.event,
            "callbackId": self.callback_id,
            "redeliveryOf": self.redelivery_of,
            "emitter": self.emitter,
        }
        if self.body_of is None:
            wire["body"] = self.body.decode()
        else:
            wire["bodyOf"] = self.body_of
        if self.trace is not None:
            wire.update(self.trace.fields())
        if self.order_key is not None:
            wire["orderKey"] = self.order_key
        if self.order_note is not None:
            wire["orderNote"] = self.order_note
        if self.lane is not None:
            wire["lane"] = self.lane
        return wire

    @classmethod
    def from_wire(cls, payload: Any, job_id: str = "") -> DeliveryJob:
        if not isinstance(payload, dict):
            raise BadJob("delivery payload is not an object")
        try:
            callback_id = int(payload["callbackId"])
            project_id = _text(payload, "projectId")
            body_of = _optional_text(payload, "bodyOf")
            body = "" if body_of is not None else payload["body"]
            emitter = _emitter(payload.get("emitter"), project_id)
            progress_id = payload.get("progressId") or job_id or payload["deliveryId"]
            if body_of is not None and body_of != _body_of(
                emitter, payload.get("eventId") or "", progress_id
            ):  # its own emission's body, never another's
                raise ValueError(f"bodyOf {body_of!r} is not its emission's")
            if not isinstance(body, str):
                raise TypeError("body is not a string")
            redelivery_of = payload.get("redeliveryOf")
            return cls(
                delivery_id=_text(payload, "deliveryId"),
                progress_id=progress_id,
                event_id=payload.get("eventId") or "",
                project_id=project_id,
                event=_text(payload, "event"),
                body=body.encode(),
                callback_id=callback_id,
                redelivery_of=None if redelivery_of is None else int(redelivery_of),
                emitter=emitter,
                trace=TraceContext.read(payload) if "traceparent" in payload else None,
                order_key=_optional_text(payload, "orderKey"),
                order_note=_optional_text(payload, "orderNote"),
                lane=_optional_text(payload, "lane"),
                body_of=body_of,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadJob(f"delivery payload is malformed: {exc!r}") from None


def _body_of(emitter: str, event_id: str, progress_id: str) -> str:
    """The scope of the body an emission's retries share (`dispatcher.bodies`):
    `{emitter}:{event id}@{emittedAt}`, the emission's as its progress id ends."""
    return f"{project_scoped(emitter, event_id)}@{progress_id.rpartition('@')[2]}"


def _optional_text(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{name} is not a string")


def _emitter(value: object, owner: str) -> str:
    """A delivery's emitting project; for a job queued before jobs named it, its callback's
    project (the emitter, but for a platform-wide callback's delivery: then unknown)."""
    if isinstance(value, str):
        return value
    return "" if owner == PLATFORM_PROJECT else owner


Job = EventJob | DeliveryJob


@dataclass(frozen=True, slots=True)
class WireJob:
    """A job as stored: its function, its one argument, when it was enqueued."""

    function: str
    payload: Any
    enqueued_ms: int


# How an event job's bytes begin when it has a digest (`EventJob.digest`), which follows
DIGEST_LEAD = '{"t":null,"f":"fan_out","a":[{"digest":"'


def encode(job: Job, enqueued_ms: int | None = None) -> bytes:
    """arq's job format, JSON-encoded (an event's digest first: `DIGEST_LEAD`)."""
    et = now_ms() if enqueued_ms is None else enqueued_ms
    return orjson.dumps({"t": None, "f": job.function, "a": [job.to_wire()], "k": {}, "et": et})


def decode(raw: bytes) -> WireJob:
    """The stored bytes of a job; BadJob for anything that is not an arq job of ours."""
    try:
        wire = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJob(f"not JSON: {exc}") from None
    if not isinstance(wire, dict) or not all(name in wire for name in _WIRE_FIELDS):
        raise BadJob("not an arq job object")
    args = wire["a"]
    if not isinstance(args, list) or len(args) != 1 or wire["k"]:
        raise BadJob("a job takes exactly one positional argument")
    if wire["f"] not in (FAN_OUT, DELIVER):
        raise BadJob(f"unknown job function {wire['f']!r}")
    return WireJob(wire["f"], args[0], int(wire["et"] or 0))


def job_serializer(value: dict[str, Any]) -> bytes:
    """For arq clients and tools on this queue (`create_pool(..., job_serializer=...)`):
    jobs are JSON, never pickle."""
    return orjson.dumps(value)


def job_deserializer(value: bytes) -> dict[str, Any]:
    """The other half of `job_serializer`, for arq's tools (`Job.info()`, the CLI)."""
    decoded: dict[str, Any] = orjson.loads(value)
    return decoded
