"""The spans: `emit` (producer side), `fan_out` (a chunk), `POST` (an attempt), and the
trace headers of an attempt's request. Each is nothing at all when spans are not recorded
and no context came with the event."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from dispatcher.models import PLATFORM_PROJECT
from dispatcher.redaction import REDACTED, redacted_url
from dispatcher.tracing.context import SERVICE_NAME, TraceContext, state

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.trace import Span

__all__ = ["Attempt", "Emission", "attempt", "emitting", "fanning_out", "url_attributes"]


class Emission:
    """An emit in progress: the context its events carry (None: none)."""

    __slots__ = ("span", "trace")

    def __init__(self, span: Span | None, context: TraceContext | None) -> None:
        self.span = span
        self.trace = context

    def emitted(self, project_id: str, event_ids: Sequence[str]) -> None:
        """Name what was emitted on the span (its project: when one emitted it all)."""
        if self.span is None or not self.span.is_recording():
            return
        if project_id:
            self.span.set_attribute("dispatcher.project_id", project_id)
        self.span.set_attribute("messaging.batch.message_count", len(event_ids))
        if len(event_ids) == 1:
            self.span.set_attribute("dispatcher.event_id", event_ids[0])


_NOTHING_EMITTED = Emission(None, None)


@contextlib.contextmanager
def emitting() -> Iterator[Emission]:
    """An emit (one event or a batch) under the current context: an `emit` span, child of
    it, when spans are recorded here (ours, or the application's own provider for a
    producer inside one); its events carry that span's context, or the current one. With
    neither a recording tracer of ours nor a current span: nothing at all."""
    if not state.propagate:
        yield _NOTHING_EMITTED
        return
    tracer = state.tracer
    if tracer is None:
        if not trace.get_current_span().get_span_context().is_valid:
            yield _NOTHING_EMITTED
            return
        tracer = trace.get_tracer(SERVICE_NAME)  # the application's provider, if any
    with tracer.start_as_current_span("emit", kind=SpanKind.PRODUCER) as span:
        yield Emission(span, TraceContext.of(span.get_span_context()))


@contextlib.contextmanager
def fanning_out(
    carried: TraceContext | None, *, event_id: str, project_id: str, event: str
) -> Iterator[TraceContext | None]:
    """A chunk of a fan-out; gives the context its deliveries carry: a `fan_out` span's
    when spans are recorded (so an event that came without one still gets a trace), else
    the event's own."""
    tracer = state.tracer
    if tracer is None:
        yield carried
        return
    parent = None if carried is None else carried.parent()
    attributes = {
        "dispatcher.event_id": event_id,
        "dispatcher.project_id": project_id,
        "dispatcher.event": event,
    }
    with tracer.start_as_current_span(
        "fan_out", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield TraceContext.of(span.get_span_context())


class Attempt:
    """The trace of one attempt: the headers its request carries, and (when spans are
    recorded) its span, ended by `end()` or by leaving the `with` block."""

    __slots__ = ("headers", "span")

    def __init__(self, headers: dict[str, str], span: Span | None = None) -> None:
        self.headers = headers
        self.span = span

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.span is not None:
            self.span.end()  # a second end() is ignored (and only logged by the SDK)

    def end(self, outcome: str, status_code: int | None, error: str | None) -> None:
        """What came of the attempt, on its span; then the span ends."""
        span = self.span
        if span is None:
            return
        self.span = None
        if span.is_recording():
            span.set_attribute("dispatcher.outcome", outcome)
            if status_code is not None:
                span.set_attribute("http.response.status_code", status_code)
            if outcome != "success":
                span.set_attribute("error.type", _error_type(status_code, error))
                span.set_status(Status(StatusCode.ERROR, error))
        span.end()


_UNTRACED = Attempt({})
# low-cardinality error types for attempts that got no answer, by how their error reads
_ERROR_TYPES = (
    ("timed out", "timeout"),
    ("refused", "refused"),
    ("could not resolve", "dns"),
    ("could not connect", "connection"),
)


def _error_type(status_code: int | None, error: str | None) -> str:
    if status_code is not None:
        return str(status_code)
    for start, kind in _ERROR_TYPES:
        if error and error.startswith(start):
            return kind
    return "_OTHER"


def attempt(
    carried: TraceContext | None,
    *,
    url: str,
    number: int,
    delivery_id: str,
    event_id: str,
    project_id: str,
    callback_id: int,
    owner: str = "",
) -> Attempt:
    """The trace of attempt `number` of a delivery that carries `carried` to `url`, a
    callback of project `owner`. A platform-wide callback's receiver (the operator's, which
    every project's events reach) is never put in the emitter's trace: it gets no
    context when no span is recorded, else a new trace, its span linked to the emitter's
    (never the emitter's `tracestate`, nor its sampling decision)."""
    tracer = state.tracer
    platform = owner == PLATFORM_PROJECT
    if tracer is None:  # no span: the stored context goes out as it is
        if carried is None or platform or not state.propagate:
            return _UNTRACED
        return Attempt(carried.fields())
    attributes: dict[str, str | int] = {
        **url_attributes(url),
        "http.request.method": "POST",
        "dispatcher.delivery_id": delivery_id,
        "dispatcher.event_id": event_id,
        "dispatcher.project_id": project_id,
        "dispatcher.callback_id": callback_id,
        "dispatcher.attempt": number,
    }
    if number > 1:
        attributes["http.request.resend_count"] = number - 1
    parent, links = _parent(carried, platform=platform)
    span = tracer.start_span(
        "POST", context=parent, kind=SpanKind.CLIENT, attributes=attributes, links=links
    )
    sent = TraceContext.of(span.get_span_context())
    return Attempt(sent.fields() if sent is not None and state.propagate else {}, span)


def _parent(
    carried: TraceContext | None, *, platform: bool
) -> tuple[otel_context.Context, list[Link]]:
    """An attempt span's parent and links. Without a context of its own, a new trace (never
    the current one of whatever runs it); a platform-wide callback's, a new trace linked
    to the one carried."""
    if carried is None:
        return otel_context.Context(), []
    if not platform:
        return carried.parent(), []
    emitter = trace.get_current_span(carried.parent()).get_span_context()
    return otel_context.Context(), [Link(emitter)]


_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=4096)
def url_attributes(url: str) -> Mapping[str, str | int]:
    """A callback URL as span attributes (`url.full`, `url.scheme`, `server.address`,
    `server.port`): `url.full` as a log line shows it (`redacted_url`: credentials and
    every query value replaced by `REDACTED`, no fragment)."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return {"url.full": REDACTED}
    return {
        "url.full": redacted_url(url) or REDACTED,
        "url.scheme": parts.scheme,
        "server.address": parts.hostname or "",
        "server.port": port,
    }
