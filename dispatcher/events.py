"""An emitted event, checked: what `emit()`, the CLI and the HTTP routes accept, made into
the job the queue holds (`dispatcher.jobs.EventJob`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.clock import now_ms
from dispatcher.errors import DispatcherError, InvalidInput
from dispatcher.jobs import REDELIVERY, EventJob, new_event_id
from dispatcher.models import EVENT_ID, check_project_id, parse_event

if TYPE_CHECKING:
    from dispatcher.tracing import TraceContext

__all__ = ["MAX_DATA_DEPTH", "EventIdReused", "event_job", "wire_event_job"]

# How deep `data` may nest objects and arrays (`data` itself is the first level). orjson
# writes at most 254 (`_ORJSON_MAX_DEPTH`), and the worker sends `data` inside its envelope,
# one level more: data accepted at 254 levels was queued, then never sent (the fan-out's
# body failed to encode: a poison job, no delivery, no record). 128 leaves room for that
# and more, and is below what the batch route's parser reads (200 with the array and the
# event), so every route gives the same answer.
MAX_DATA_DEPTH = 128
_ORJSON_MAX_DEPTH = 254
_SPARE_DEPTH = _ORJSON_MAX_DEPTH - MAX_DATA_DEPTH


class EventIdReused(DispatcherError):
    """Events whose ids name other events of their projects still queued (another event
    name, or other data): not queued (`event_ids`, in order). The same event again (a
    producer's retry) is not this: it is the event queued, answered as such. A 409.

    `outcomes` has one entry per event of the call, in its order: the id of each event
    queued (or queued already, the same event), None for each refused; `refused` has the
    places of those. From `emit_many`, which raises it once the others are queued, it is
    the only way to the ids it gave events emitted without one (emitting the list again
    would queue those again, under new ids); from `emit` and `emit_each`, `[None]`."""

    http_status = 409

    def __init__(
        self,
        refused: Sequence[EventJob],
        queued: int = 0,
        outcomes: Sequence[str | None] | None = None,
    ) -> None:
        named = ", ".join(f"'{job.id}'" for job in refused[:5])
        if len(refused) > 5:
            named += f" (and {len(refused) - 5} more)"
        projects = ", ".join(sorted({job.project_id for job in refused}))
        message = (
            f"eventId {named} {'names' if len(refused) == 1 else 'name'} another event of "
            f"{projects} still queued (another event name or other data): not queued. Give "
            "each event an id of its own; emitting the same event again is safe"
        )
        if queued:
            message += f"; the other {queued} event{'s are' if queued > 1 else ' is'} queued"
        super().__init__(message)
        self.param = "eventId"
        self.event_ids = [job.id for job in refused]
        self.outcomes: list[str | None] = (
            [None] * len(refused) if outcomes is None else list(outcomes)
        )
        self.refused = [place for place, outcome in enumerate(self.outcomes) if outcome is None]


def event_job(
    project_id: str,
    event: str,
    data: Mapping[str, Any] | None,
    event_id: str | None = None,
    *,
    trace: TraceContext | None = None,
    max_bytes: int | None = None,
) -> EventJob:
    """A checked event: a known name, a project id, a JSON object the queue can hold (no
    NaN or Infinity, which JSON has no words for; nested at most `MAX_DATA_DEPTH` levels)
    of at most `max_bytes` as JSON, an event
    id (when given) of 1-128 letters, digits and `_.:-`, each matched whole, without
    `:redeliver:`. `trace`: the trace it continues."""
    check_project_id(project_id)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InvalidInput("data must be a JSON object", param="data")
    if event_id is not None:
        _check_event_id(event_id)
    data = dict(data)
    encoded = _encoded(data)
    if max_bytes is not None and len(encoded) > max_bytes:
        raise InvalidInput(
            f"data is {len(encoded):,} bytes as JSON; at most {max_bytes:,} (an event's "
            "data travels in full in each of its retries, to each callback)",
            param="data",
        )
    # orjson writes NaN and Infinity as null: look for them only where a null was written
    if b"null" in encoded and _non_finite(data):
        raise InvalidInput(
            "data holds NaN or Infinity, which JSON cannot carry (a receiver would get null)",
            param="data",
        )
    name = parse_event(event).value
    return EventJob(
        id=event_id or new_event_id(),
        project_id=project_id,
        event=name,
        data=data,
        emitted_at=now_ms(),
        trace=trace,
        data_json=encoded,
        digest=_digest(name, data) if event_id else "",  # a fresh id names no other event
    )


def _check_event_id(event_id: str) -> None:
    if not EVENT_ID.fullmatch(event_id):
        raise InvalidInput(
            "eventId must be 1-128 letters, digits, '_', '.', ':' or '-'", param="eventId"
        )
    if REDELIVERY in event_id:  # its fan-out's job id could be a redelivery's
        raise InvalidInput(
            f"eventId must not hold '{REDELIVERY}': it names redeliveries' jobs",
            param="eventId",
        )


def _digest(event: str, data: dict[str, Any]) -> str:
    """What tells an event from another under one event id of the producer's: its name and
    data (their keys in any order), 128 bits of SHA-256 in hex (~1.2 µs for a CI event).
    The queue's script compares it with the queued event's (`dispatcher.sequence`). An event
    given a fresh id needs none: no other event has that id."""
    canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(event.encode() + b"\n" + canonical).hexdigest()[:32]


def _encoded(data: dict[str, Any]) -> bytes:
    """`data` as JSON, or InvalidInput for what the queue's JSON cannot hold (integers
    beyond 64 bits) or what the worker could not send: nested past `MAX_DATA_DEPTH`. Its
    depth is checked by the same encoding, inside the levels `data` may not use: orjson
    writes at most `_ORJSON_MAX_DEPTH` objects and arrays in one another."""
    wrapped: Any = data
    for _ in range(_SPARE_DEPTH):
        wrapped = [wrapped]
    try:
        return orjson.dumps(wrapped)[_SPARE_DEPTH:-_SPARE_DEPTH]
    except orjson.JSONEncodeError as exc:
        if "recursion" in str(exc).lower():
            raise InvalidInput(
                f"data is nested too deeply: at most {MAX_DATA_DEPTH} levels of objects and "
                "arrays in one another (data itself is the first)",
                param="data",
            ) from None
        raise InvalidInput(f"data cannot be queued: {exc}", param="data") from None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(item) for item in value)
    return False


def wire_event_job(
    project_id: str, entry: Any, trace: TraceContext | None = None, max_bytes: int | None = None
) -> EventJob:
    """`event_job` of an event as HTTP producers send it: `{"event", "data", "eventId"?}`
    decoded from JSON, so anything may be in it."""
    if not isinstance(entry, dict):
        raise InvalidInput('an event must be an object {"event", "data", "eventId"}')
    event, event_id = entry.get("event"), entry.get("eventId")
    if not isinstance(event, str):
        raise InvalidInput("'event' is required: an event name", param="event")
    if event_id is not None and not isinstance(event_id, str):
        raise InvalidInput("eventId must be a string", param="eventId")
    data = entry.get("data")
    return event_job(project_id, event, data, event_id, trace=trace, max_bytes=max_bytes)
