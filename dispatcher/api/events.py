"""Emitting events over HTTP, for producers that are not Python: one event a request, or a
batch of them (a JSON array, or NDJSON streamed one event a line) queued in one round trip.

Both answer with bytes encoded here (orjson) rather than through FastAPI's response
serialisation: the route's model still documents the answer, which is all it is for here.
A batch is decoded with pydantic-core's parser, which keeps integers beyond 64 bits as they
are (orjson would turn them into floats, changing the producer's data), so such data is
refused by the queue's check like on the single route; it also bounds the nesting depth.
Its entries are counted before they are read: an NDJSON body's lines are found by a search
(blank runs skipped whole), one past the limit at most; a JSON array that may hold many more
values than the events it may carry is counted entry by entry by the standard library's
scanner, one past the limit at most, then, within the limit, read whole by the same parser
as any other (the scanner takes what it refuses: the same body is answered alike, however
many values it holds). An 8 MiB body of `{}` entries cost ~470 ms of the event loop and
+429 MiB before it was refused.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic_core import from_json

from dispatcher import tracing
from dispatcher.api.callbacks import V4
from dispatcher.api.deps import Admin, ProjectPath, RouterDep, apigw
from dispatcher.api.pacing import Paced, pace_events
from dispatcher.errors import DispatcherError, InvalidInput, PayloadTooLarge
from dispatcher.models import (
    EmitBatchResult,
    EmitRequest,
    EmitResult,
    Result,
    check_project_id,
)

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["BATCH_PATH", "NDJSON", "read_events", "router"]

BATCH_PATH = f"{V4}/events/batch"
NDJSON = "application/x-ndjson"
# a byte that is not whitespace (what `bytes.strip` strips): a line holding one is not blank
_VISIBLE = re.compile(rb"\S")
_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
# A JSON array is read whole when it holds at most this many values and keys a permitted
# event (its commas and opening brackets, counted in its bytes, bound them): a batch of CI
# events has ~30; past it, counted entry by entry first (`_counted`)
_VALUES_PER_EVENT = 100


def answer(data: dict[str, Any], message: str | None = None) -> Response:
    """The seeds' envelope around `data` (camelCase keys already)."""
    body = orjson.dumps({"data": data, "message": message, "status": 0})
    return Response(body, media_type="application/json")


async def emit_event(
    request: Request,
    router: RouterDep,
    project_id: ProjectPath,
    uid: Admin,
    paced: Paced,
    body: EmitRequest,
) -> Response:
    """Emit an event; returns at once with its id (delivery happens later). An `eventId`
    of your own makes the call idempotent while that event is queued: the same event again
    is answered as queued, another event (name or data) under that id is a 409. A W3C
    `traceparent` (and `tracestate`) header goes with the event to every delivery request."""
    with tracing.received(request.headers):
        event_id = await router.of(project_id).producer.emit(
            project_id, body.event.value, body.data, event_id=body.event_id
        )
    return answer({"eventId": event_id, "queued": True})


async def emit_batch(
    request: Request, router: RouterDep, project_id: ProjectPath, uid: Admin, paced: Paced
) -> Response:
    """Emit many events in one request, queued in one round trip: a JSON array of
    `{"event", "data", "eventId"?}`, or the same objects one a line with `Content-Type:
    application/x-ndjson`. An entry that cannot be queued (an unknown event, a `data` that
    is not an object, a line that is not JSON, an `eventId` that names another event still
    queued) is refused alone, with its reason; the others are queued all the same.
    `data.results` has one outcome per event, in order. A W3C `traceparent` (and
    `tracestate`) header goes with every event of the batch. A project id that cannot emit
    is a 400, as on the single route, before the body is read."""
    check_project_id(project_id)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    ndjson = media_type == NDJSON
    entries = read_events(
        await request.body(), ndjson=ndjson, limit=router.settings.emit_batch_max_events
    )
    pace_events(request, project_id, len(entries))
    producer = router.of(project_id).producer
    with tracing.received(request.headers):
        outcomes = await producer.emit_each(project_id, [value for _, value in entries])
    results: list[dict[str, str | None]] = []
    for (where, _), outcome in zip(entries, outcomes, strict=True):
        if isinstance(outcome, DispatcherError):
            results.append({"eventId": None, "error": f"{where}: {outcome.message}"})
        else:
            results.append({"eventId": outcome, "error": None})
    failed = sum(isinstance(outcome, DispatcherError) for outcome in outcomes)
    message = f"{failed} of {len(outcomes)} events refused; see data.results" if failed else None
    data = {"accepted": len(outcomes) - failed, "failed": failed, "results": results}
    return answer(data, message)


def read_events(body: bytes, *, ndjson: bool, limit: int) -> list[tuple[str, Any]]:
    """The events of a batch body, each with where it stands (`events[3]`, `line 4`) for
    messages. A line that is not JSON becomes an `InvalidInput` in its place. A body that
    holds no event is a 400; one with more than `limit` a 413, found having read at most
    one entry past `limit`."""
    if ndjson:  # counted before any line is parsed
        lines = _lines(body, limit)
        _check_count(len(lines), limit)
        return [(f"line {n}", _json_line(line)) for n, line in lines]
    events = _array(body, limit)
    _check_count(len(events), limit)
    return [(f"events[{i}]", event) for i, event in enumerate(events)]


def _lines(body: bytes, limit: int) -> list[tuple[int, bytes]]:
    """The non-blank lines of `body`, each with its number, `limit` + 1 at most (enough to
    refuse it): found by searching for the next byte that is not whitespace, never by
    splitting the body into its lines."""
    lines: list[tuple[int, bytes]] = []
    start, number = 0, 1  # where the next line begins, and its number
    while len(lines) <= limit and (found := _VISIBLE.search(body, start)) is not None:
        newline = body.rfind(b"\n", start, found.start())
        begins = start if newline < 0 else newline + 1
        number += body.count(b"\n", start, begins)
        ends = body.find(b"\n", found.start())
        ends = len(body) if ends < 0 else ends
        lines.append((number, body[begins:ends]))
        start, number = ends + 1, number + 1
    return lines


def _array(body: bytes, limit: int) -> list[Any]:
    """The entries of a JSON array body (a 400 when it is not one), read whole. One that
    may hold many more values than `limit` events have is counted first (`_counted`):
    a 413 past `limit`; else it is read whole as any other, with the same answers."""
    many = body.count(b",") + body.count(b"[") + body.count(b"{") > _VALUES_PER_EVENT * limit
    if many and (count := _counted(body, limit)) > limit:
        _check_count(count, limit)
    try:
        events = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidInput(f"body is not JSON: {exc}", param="body") from None
    if not isinstance(events, list):
        raise _not_an_array()
    return events


_DECODER = json.JSONDecoder()


def _counted(body: bytes, limit: int) -> int:
    """How many entries the JSON array `body` holds, `limit` + 1 at most (enough to refuse
    it), read one by one by the standard library's scanner, each dropped once read, never
    one after the one past `limit`; 0 when that scanner finds it is not an array of JSON
    values (read whole then, the parser says why). The scanner takes what the parser
    refuses (a lone surrogate escape, ~1,000 levels of nesting): its entries only count."""
    try:
        text = body.decode(errors="replace")  # (a byte the parser refuses: it says so)
        at = _skip(text, 0)
        if text[at : at + 1] != "[":
            return 0
        count, at = 0, _skip(text, at + 1)
        while text[at : at + 1] != "]" and count <= limit:
            if count:
                if text[at : at + 1] != ",":
                    return 0
                at = _skip(text, at + 1)
            at = _skip(text, _DECODER.raw_decode(text, at)[1])
            count += 1
    except (ValueError, RecursionError):
        return 0
    return count


def _skip(text: str, at: int) -> int:
    """Where the JSON whitespace at `at` of `text` ends."""
    found = _SPACE.match(text, at)
    return at if found is None else found.end()


def _not_an_array() -> InvalidInput:
    return InvalidInput(
        f"body must be a JSON array of events (or NDJSON, with Content-Type: {NDJSON})",
        param="body",
    )


def _check_count(count: int, limit: int) -> None:
    if not count:
        raise InvalidInput("body holds no event", param="body")
    if count > limit:
        raise PayloadTooLarge(
            f"batch of more than {limit} events; at most {limit} per request (send several)"
        )


def _json_line(line: bytes) -> Any:
    try:
        return from_json(line, allow_inf_nan=False)
    except ValueError as exc:  # the parser counts lines too: it saw one
        return InvalidInput(f"not JSON: {str(exc).replace(' at line 1 column ', ' at column ')}")


def batch_body_doc(settings: Settings) -> dict[str, Any]:
    """The batch route's request body in the OpenAPI document (FastAPI cannot infer it:
    the route reads the raw body, so that one bad entry does not refuse the batch)."""
    events = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/EmitRequest"},
        "minItems": 1,
        "maxItems": settings.emit_batch_max_events,
    }
    return {
        "requestBody": {
            "required": True,
            "description": f"A JSON array of events, or ({NDJSON}) the same events one a line.",
            "content": {"application/json": {"schema": events}, NDJSON: {"schema": events}},
        }
    }


def router(settings: Settings) -> APIRouter:
    """The emit routes; the batch route's documented limits are `settings`'."""
    events = APIRouter(prefix=V4, dependencies=[Depends(apigw)], tags=["events"])
    events.add_api_route("/events", emit_event, methods=["POST"], response_model=Result[EmitResult])
    events.add_api_route(
        "/events/batch",
        emit_batch,
        methods=["POST"],
        response_model=Result[EmitBatchResult],
        openapi_extra=batch_body_doc(settings),
    )
    return events
