"""Tracing: an event's W3C trace context, from its emitter to every attempt's request.

What travels is `traceparent` and `tracestate` (W3C Trace Context), nothing else (no
baggage: it would hand one project's data to every receiver). The emit routes read them
from the request, a Python producer from its current OpenTelemetry context, `dispatcher
emit` from `TRACEPARENT`/`TRACESTATE` in its environment. The event's job stores them
(`TraceContext`, absent when there is none), and so does every delivery job and history
record made from it; each attempt's request carries a `traceparent` of that trace.

Two modes, chosen once per process by `setup()` from the standard `OTEL_*` variables:

- exporting (an OTLP endpoint is set, or `OTEL_TRACES_EXPORTER=console`): spans are
  recorded and exported: `emit` (PRODUCER) around an emit, `fan_out` (CONSUMER) around a
  chunk of a fan-out, `POST` (CLIENT) around an attempt, whose span id is the request's
  `traceparent` parent id;
- not exporting (the default): no span is made. A stored context goes out as it came in,
  so the receiver's spans hang under the emitter's own span; an event without a context
  costs an attempt one attribute test.

A malformed `traceparent` or `tracestate`, wherever it comes from, is dropped: never an
error. Process state is module-level, as OpenTelemetry's own is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

__all__ = [
    "SERVICE_NAME",
    "TRACEPARENT",
    "TRACESTATE",
    "Attempt",
    "Emission",
    "TraceContext",
    "attempt",
    "emitting",
    "exporters",
    "fanning_out",
    "from_environment",
    "propagates",
    "received",
    "recording",
    "setup",
    "url_attributes",
]

log = structlog.get_logger("dispatcher.tracing")

SERVICE_NAME = "callback-dispatcher"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512  # W3C: 32 members; longer ones may be dropped by anyone on the way
# version 00, as we write it: anything else read from a job or a record is dropped
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_W3C = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The W3C trace context an event carries: `traceparent` (version 00) and, when the
    emitter had one, `tracestate`. Only ever built checked (`read`, `of`)."""

    traceparent: str
    tracestate: str = ""

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    def fields(self) -> dict[str, str]:
        """As a job or a history record stores it (also the request headers it makes)."""
        if self.tracestate:
            return {TRACEPARENT: self.traceparent, TRACESTATE: self.tracestate}
        return {TRACEPARENT: self.traceparent}

    @classmethod
    def read(cls, fields: Mapping[str, Any]) -> TraceContext | None:
        """The context stored in `fields` (a job's payload, a record), or None when there is
        none or it is malformed (a tracestate that is not sendable is left out)."""
        traceparent = fields.get(TRACEPARENT)
        if not isinstance(traceparent, str) or not _TRACEPARENT.fullmatch(traceparent):
            return None
        tracestate = fields.get(TRACESTATE)
        if not isinstance(tracestate, str) or not _sendable(tracestate):
            tracestate = ""
        return cls(traceparent, tracestate)

    @classmethod
    def of(cls, span_context: SpanContext) -> TraceContext | None:
        """The context that makes `span_context`'s span the parent; None when invalid."""
        if not span_context.is_valid:
            return None
        traceparent = (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
            f"-{span_context.trace_flags:02x}"
        )
        tracestate = span_context.trace_state.to_header()
        return cls(traceparent, tracestate if _sendable(tracestate) else "")

    def parent(self) -> otel_context.Context:
        """An OpenTelemetry context whose current span is the one this context names."""
        return _W3C.extract(self.fields())


def _sendable(tracestate: str) -> bool:
    return len(tracestate) <= MAX_TRACESTATE and tracestate.isascii() and tracestate.isprintable()


@dataclass(slots=True)
class _State:
    tracer: Tracer | None = None  # ours, recording: None when nothing is exported
    propagate: bool = True  # False with OTEL_PROPAGATORS naming no `tracecontext`
    mode: str = ""  # what `setup()` chose ('' before it ran)


_state = _State()


# ---- set-up -----------------------------------------------------------------------------


def setup() -> str:
    """Once per process, at start: export spans as the `OTEL_*` variables say, and say how
    (`otlp <endpoint>`, `console`, `off`; the same answer on later calls). Never raises:
    a setting that cannot be honoured is logged, and the process propagates traces without
    exporting them."""
    if _state.mode:
        return _state.mode
    _state.propagate = propagates(os.environ)
    made = exporters(os.environ)
    _state.mode = ", ".join(name for name, _ in made) or "off"
    if made:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=_resource())
        for _, exporter in made:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _state.tracer = provider.get_tracer(SERVICE_NAME)
    log.info("tracing.configured", export=_state.mode, propagate=_state.propagate)
    return _state.mode


def propagates(env: Mapping[str, str]) -> bool:
    """Whether trace contexts are read and passed on: unless `OTEL_PROPAGATORS` is set
    without `tracecontext` (`none`, say)."""
    propagators = env.get("OTEL_PROPAGATORS")
    return propagators is None or "tracecontext" in _names(propagators)


def exporters(env: Mapping[str, str]) -> list[tuple[str, Any]]:
    """The span exporters the variables ask for, each with how to say it: OTLP/HTTP when an
    OTLP endpoint is set (and `OTEL_TRACES_EXPORTER`, default `otlp`, names it), `console`
    when named; none with `OTEL_SDK_DISABLED=true`. The OTLP exporter reads its other
    settings (`OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, `_COMPRESSION`, ...) itself."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = _names(env.get("OTEL_TRACES_EXPORTER") or "otlp")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    made = []
    if "otlp" in names and endpoint:
        made += [(f"otlp {endpoint}", exporter) for exporter in _otlp_exporter(env)]
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        made.append(("console", ConsoleSpanExporter()))
    return made


def _names(value: str) -> set[str]:
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def _otlp_exporter(env: Mapping[str, str]) -> list[Any]:
    """The OTLP/HTTP span exporter (it reads the other `OTEL_EXPORTER_OTLP_*` variables
    itself), or none, said why, when it cannot be had."""
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() != "http/protobuf":
        why = f"OTLP over {protocol} is not supported (http/protobuf is): spans are not exported"
        log.error("tracing.exporter_unavailable", reason=why)
        return []
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        why = "the OTLP exporter is not installed (pip install 'callback-dispatcher[otlp]')"
        log.error("tracing.exporter_unavailable", reason=why + ": spans are not exported")
        return []
    return [OTLPSpanExporter()]


def _resource() -> Any:
    """`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, the service named
    `callback-dispatcher` when they do not name it."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


@contextlib.contextmanager
def recording(provider: TracerProvider | None) -> Iterator[None]:
    """Record spans with `provider` (None: record none) for the time of the block; for
    tests and benchmarks, which build their own provider (an in-memory exporter)."""
    before = _state.tracer
    _state.tracer = None if provider is None else provider.get_tracer(SERVICE_NAME)
    try:
        yield
    finally:
        _state.tracer = before


# ---- where a context comes in -------------------------------------------------------------


@contextlib.contextmanager
def received(carrier: Mapping[str, str]) -> Iterator[None]:
    """The trace context of an incoming request's headers (or of `from_environment()`) as
    the current context for the block; nothing when there is none or it is malformed."""
    if not _state.propagate or not carrier.get(TRACEPARENT):
        yield
        return
    token = otel_context.attach(_W3C.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`TRACEPARENT` and `TRACESTATE` of the environment (how a CI job hands its trace to
    a command it runs), as request headers would carry them."""
    env = os.environ if environ is None else environ
    found = {TRACEPARENT: env.get("TRACEPARENT", ""), TRACESTATE: env.get("TRACESTATE", "")}
    return {name: value for name, value in found.items() if value}


class Emission:
    """An emit in progress: the context its events carry (None: none)."""

    __slots__ = ("span", "trace")

    def __init__(self, span: Span | None, context: TraceContext | None) -> None:
        self.span = span
        self.trace = context

    def emitted(self, project_id: str, event_ids: Sequence[str]) -> None:
        """Name what was emitted on the span."""
        if self.span is None or not self.span.is_recording():
            return
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
    if not _state.propagate:
        yield _NOTHING_EMITTED
        return
    tracer = _state.tracer
    if tracer is None:
        if not trace.get_current_span().get_span_context().is_valid:
            yield _NOTHING_EMITTED
            return
        tracer = trace.get_tracer(SERVICE_NAME)  # the application's provider, if any
    with tracer.start_as_current_span("emit", kind=SpanKind.PRODUCER) as span:
        yield Emission(span, TraceContext.of(span.get_span_context()))


# ---- the worker ---------------------------------------------------------------------------


@contextlib.contextmanager
def fanning_out(
    carried: TraceContext | None, *, event_id: str, project_id: str, event: str
) -> Iterator[TraceContext | None]:
    """A chunk of a fan-out; gives the context its deliveries carry: a `fan_out` span's
    when spans are recorded (so an event that came without one still gets a trace), else
    the event's own."""
    tracer = _state.tracer
    if tracer is None:
        yield carried
        return
    parent = None if carried is None else carried.parent()
    attributes = {"dispatcher.event_id": event_id, "dispatcher.project_id": project_id,
                  "dispatcher.event": event}  # fmt: skip
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
_ERROR_TYPES = (("timed out", "timeout"), ("refused", "refused"),
                ("could not resolve", "dns"), ("could not connect", "connection"))  # fmt: skip


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
) -> Attempt:
    """The trace of attempt `number` of a delivery that carries `carried` to `url`."""
    tracer = _state.tracer
    if tracer is None:  # no span: the stored context goes out as it is
        if carried is None or not _state.propagate:
            return _UNTRACED
        return Attempt(carried.fields())
    attributes: dict[str, str | int] = {
        **url_attributes(url), "http.request.method": "POST",
        "dispatcher.delivery_id": delivery_id, "dispatcher.event_id": event_id,
        "dispatcher.project_id": project_id, "dispatcher.callback_id": callback_id,
        "dispatcher.attempt": number,
    }  # fmt: skip
    if number > 1:
        attributes["http.request.resend_count"] = number - 1
    # without a context of its own, a new trace (never the current one of whatever runs it)
    parent = otel_context.Context() if carried is None else carried.parent()
    span = tracer.start_span("POST", context=parent, kind=SpanKind.CLIENT, attributes=attributes)
    sent = TraceContext.of(span.get_span_context())
    return Attempt(sent.fields() if sent is not None and _state.propagate else {}, span)


_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=4096)
def url_attributes(url: str) -> Mapping[str, str | int]:
    """A callback URL as span attributes (`url.full`, `url.scheme`, `server.address`,
    `server.port`): credentials and every query value replaced by `REDACTED` (a token in a
    query string stays out of traces), no fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return {"url.full": "REDACTED"}
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = "REDACTED:REDACTED@" + netloc
    query = "&".join(
        item.partition("=")[0] + "=REDACTED" for item in parts.query.split("&") if item
    )
    full = parts._replace(netloc=netloc, query=query, fragment="").geturl()
    return {"url.full": full, "url.scheme": parts.scheme, "server.address": parts.hostname or "",
            "server.port": port}  # fmt: skip
