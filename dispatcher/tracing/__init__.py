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

from dispatcher.tracing.context import (
    SERVICE_NAME,
    TRACEPARENT,
    TRACESTATE,
    TraceContext,
    from_environment,
    received,
)
from dispatcher.tracing.setup import exporters, propagates, recording, setup
from dispatcher.tracing.spans import (
    Attempt,
    Emission,
    attempt,
    emitting,
    fanning_out,
    url_attributes,
)

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
