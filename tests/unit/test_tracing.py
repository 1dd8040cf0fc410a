"""dispatcher.tracing without servers: what a stored context may hold, what a span's URL
shows, which exporters the `OTEL_*` variables ask for, and the attempt's fast path."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from structlog.testing import capture_logs

from dispatcher import tracing
from dispatcher.jobs import DeliveryJob, EventJob, decode, encode
from dispatcher.tracing import TraceContext

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "stored",
    [
        {},
        {"traceparent": None},
        {"traceparent": ["x"]},
        {"traceparent": PARENT.upper()},
        {"traceparent": PARENT + "\r\nX-Evil: 1"},
        {"traceparent": "01" + PARENT[2:]},  # only the version we write is read back
        {"traceparent": "00-" + "0" * 32 + PARENT[35:]},
        {"traceparent": PARENT[:36] + "0" * 16 + "-01"},
    ],
)
def test_a_malformed_stored_context_reads_as_none(stored: dict[str, object]) -> None:
    assert TraceContext.read(stored) is None


def test_a_stored_context_keeps_a_sendable_tracestate_only() -> None:
    assert TraceContext.read({"traceparent": PARENT, "tracestate": "a=1"}) == TraceContext(
        PARENT, "a=1"
    )
    for bad in ("a=\r\n", "a=\u00e9", "a=" + "x" * 600, 7):
        assert TraceContext.read({"traceparent": PARENT, "tracestate": bad}) == TraceContext(PARENT)


def test_jobs_carry_a_context_only_when_they_have_one() -> None:
    event = EventJob("evt_1", "demo", "BUILD_END", trace=TraceContext(PARENT, "a=1"))
    assert decode(encode(event)).payload["traceparent"] == PARENT
    assert EventJob.from_wire(decode(encode(event)).payload).continued(5).trace == event.trace
    delivery = DeliveryJob.first(event, 3, b"{}", trace=event.trace)
    assert DeliveryJob.from_wire(decode(encode(delivery)).payload) == delivery
    assert delivery.redelivery(9).trace == event.trace
    plain = EventJob("evt_2", "demo", "BUILD_END")
    assert b"trace" not in encode(plain) and b"trace" not in encode(
        DeliveryJob.first(plain, 1, b"")
    )


@pytest.mark.parametrize(
    ("url", "full"),
    [
        ("https://hooks.example.com/ci", "https://hooks.example.com/ci"),
        ("https://u:pw@example.com/h?token=t0k&x=1#frag",
         "https://REDACTED:REDACTED@example.com/h?token=REDACTED&x=REDACTED"),
        ("http://127.0.0.1:8080/h?flag", "http://127.0.0.1:8080/h?flag=REDACTED"),
    ],
)  # fmt: skip
def test_a_spans_url_holds_no_credential_or_query_value(url: str, full: str) -> None:
    span = tracing.url_attributes(url)
    assert span["url.full"] == full
    assert span["server.port"] == (8080 if ":8080" in url else 443)


@pytest.mark.parametrize(
    ("env", "chosen"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp http://c:4318"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1/t"}, ["otlp http://c/v1/t"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ],
)
def test_the_otel_variables_choose_the_exporters(env: dict[str, str], chosen: list[str]) -> None:
    assert [name for name, _ in tracing.exporters(env)] == chosen


def test_an_otlp_protocol_without_an_exporter_is_said_and_not_fatal() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with capture_logs() as logs:
        assert tracing.exporters(env) == []
    assert logs[0]["event"] == "tracing.exporter_unavailable" and "grpc" in logs[0]["reason"]


def test_propagation_follows_otel_propagators() -> None:
    assert tracing.propagates({})
    assert tracing.propagates({"OTEL_PROPAGATORS": "tracecontext,baggage"})
    assert not tracing.propagates({"OTEL_PROPAGATORS": "none"})
    assert not tracing.propagates({"OTEL_PROPAGATORS": "b3"})


def attempt(carried: TraceContext | None) -> tracing.Attempt:
    return tracing.attempt(carried, url="http://h/x", number=1, delivery_id="d", event_id="e",
                           project_id="p", callback_id=1)  # fmt: skip


def test_an_attempt_without_context_or_recording_makes_nothing() -> None:
    untraced = attempt(None)
    assert untraced is attempt(None) and untraced.headers == {} and untraced.span is None
    carried = TraceContext(PARENT, "a=1")
    assert attempt(carried).headers == carried.fields()  # sent as it came: no span here
    with tracing.recording(TracerProvider()):
        traced = attempt(carried)
        assert traced.span is not None and traced.headers["traceparent"][3:35] == PARENT[3:35]
        assert traced.headers["traceparent"] != PARENT  # the attempt span's id
        traced.end("success", 200, None)


def test_an_emit_outside_any_span_carries_nothing() -> None:
    with tracing.emitting() as emission:
        assert emission.trace is None and emission.span is None
