"""The W3C trace context an event carries (`TraceContext`), where it comes in (`received`,
`from_environment`), and the process's tracing state (what `setup()` chose)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext, Tracer

__all__ = [
    "SERVICE_NAME",
    "TRACEPARENT",
    "TRACESTATE",
    "TraceContext",
    "from_environment",
    "received",
    "state",
]

SERVICE_NAME = "callback-dispatcher"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512  # W3C: 32 members; longer ones may be dropped by anyone on the way
MAX_MEMBER = 128  # W3C: a tracestate cut to size loses its members longer than this first
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
            f"-{span_context.trace_flags & 0xFF:02x}"
        )
        tracestate = _cut(span_context.trace_state.to_header())
        return cls(traceparent, tracestate if _sendable(tracestate) else "")

    def parent(self) -> otel_context.Context:
        """An OpenTelemetry context whose current span is the one this context names."""
        return _W3C.extract(self.fields())


def _sendable(tracestate: str) -> bool:
    return len(tracestate) <= MAX_TRACESTATE and tracestate.isascii() and tracestate.isprintable()


def _cut(tracestate: str) -> str:
    """A tracestate cut to `MAX_TRACESTATE` as W3C says: its members longer than
    `MAX_MEMBER` dropped first (the last first), then members from the end, each only
    while it is too long (it was dropped whole; review)."""
    if len(tracestate) <= MAX_TRACESTATE:
        return tracestate
    members = [m for m in (m.strip(" \t") for m in tracestate.split(",")) if m]
    while len(",".join(members)) > MAX_TRACESTATE:
        long = [i for i, member in enumerate(members) if len(member) > MAX_MEMBER]
        members.pop(long[-1] if long else -1)
    return ",".join(members)


class _QuietMembers(logging.Filter):
    """OpenTelemetry logs a malformed tracestate member as it came, at WARNING: up to 8 KB
    of an emitter's text per request in the operators' logs (review). The tracestate is
    ignored all the same; only that line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Member doesn't match")


logging.getLogger("opentelemetry.trace.span").addFilter(_QuietMembers())


@dataclass(slots=True)
class _State:
    tracer: Tracer | None = None  # ours, recording: None when nothing is exported
    propagate: bool = True  # False with OTEL_PROPAGATORS naming no `tracecontext`
    mode: str = ""  # what `setup()` chose ('' before it ran)


state = _State()


@contextlib.contextmanager
def received(carrier: Mapping[str, str]) -> Iterator[None]:
    """The trace context of an incoming request's headers (or of `from_environment()`) as
    the current context for the block; nothing when there is none or it is malformed.
    Headers that repeat (`getlist`, Starlette's) are read as W3C says: two traceparents
    are no context, several tracestates are one list (the first alone was read; review)."""
    carrier = _one(carrier)
    if not state.propagate or not carrier.get(TRACEPARENT):
        yield
        return
    token = otel_context.attach(_W3C.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


def _one(headers: Mapping[str, str]) -> Mapping[str, str]:
    """`headers`' trace context as one value of each (`received`)."""
    getlist = getattr(headers, "getlist", None)
    if getlist is None:
        return headers
    parents, states = getlist(TRACEPARENT), getlist(TRACESTATE)
    if len(parents) != 1:
        return {}
    return {TRACEPARENT: parents[0], TRACESTATE: ",".join(states)} if states else headers


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`TRACEPARENT` and `TRACESTATE` of the environment (how a CI job hands its trace to
    a command it runs), as request headers would carry them."""
    env = os.environ if environ is None else environ
    found = {TRACEPARENT: env.get("TRACEPARENT", ""), TRACESTATE: env.get("TRACESTATE", "")}
    return {name: value for name, value in found.items() if value}
