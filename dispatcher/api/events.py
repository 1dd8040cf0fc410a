"""Emitting events over HTTP, for producers that are not Python: one event a request, or a
batch of them (a JSON array, or NDJSON streamed one event a line) queued in one round trip.

Both answer with bytes encoded here (orjson) rather than through FastAPI's response
serialisation: the route's model still documents the answer, which is all it is for here.
A batch is decoded with pydantic-core's parser, which keeps integers beyond 64 bits as they
are (orjson would turn them into floats, changing the producer's data), so such data is
refused by the queue's check like on the single route; it also bounds the nesting depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic_core import from_json

from dispatcher import tracing
from dispatcher.api.callbacks import V4
from dispatcher.api.deps import Admin, ProjectPath, RouterDep, apigw
from dispatcher.errors import DispatcherError, InvalidInput, PayloadTooLarge
from dispatcher.models import EmitBatchResult, EmitRequest, EmitResult, Result

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["BATCH_PATH", "NDJSON", "read_events", "router"]

BATCH_PATH = f"{V4}/events/batch"
NDJSON = "application/x-ndjson"


def answer(data: dict[str, Any], message: str | None = None) -> Response:
    """The seeds' envelope around `data` (camelCase keys already)."""
    body = orjson.dumps({"data": data, "message": message, "status": 0})
    return Response(body, media_type="application/json")


async def emit_event(
    request: Request, router: RouterDep, project_id: ProjectPath, uid: Admin, body: EmitRequest
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
    request: Request, router: RouterDep, project_id: ProjectPath, uid: Admin
) -> Response:
    """Emit many events in one request, queued in one round trip: a JSON array of
    `{"event", "data", "eventId"?}`, or the same objects one a line with `Content-Type:
    application/x-ndjson`. An entry that cannot be queued (an unknown event, a `data` that
    is not an object, a line that is not JSON, an `eventId` that names another event still
    queued) is refused alone, with its reason; the others are queued all the same.
    `data.results` has one outcome per event, in order. A W3C `traceparent` (and
    `tracestate`) header goes with every event of the batch."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    ndjson = media_type == NDJSON
    entries = read_events(
        await request.body(), ndjson=ndjson, limit=router.settings.emit_batch_max_events
    )
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
    holds no event is a 400; one with more than `limit` a 413."""
    if ndjson:  # counted before any line is parsed
        lines = [(n, line) for n, line in enumerate(body.split(b"\n"), start=1) if line.strip()]
        _check_count(len(lines), limit)
        return [(f"line {n}", _json_line(line)) for n, line in lines]
    try:
        events = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidInput(f"body is not JSON: {exc}", param="body") from None
    if not isinstance(events, list):
        raise InvalidInput(
            f"body must be a JSON array of events (or NDJSON, with Content-Type: {NDJSON})",
            param="body",
        )
    _check_count(len(events), limit)
    return [(f"events[{i}]", event) for i, event in enumerate(events)]


def _check_count(count: int, limit: int) -> None:
    if not count:
        raise InvalidInput("body holds no event", param="body")
    if count > limit:
        raise PayloadTooLarge(
            f"batch of {count} events; at most {limit} per request (send several)"
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
