"""Span export from a real `dispatcher worker` process, configured by the standard `OTEL_*`
variables alone, to an OTLP/HTTP collector stub on 127.0.0.1 that decodes the protobuf it
receives (the opentelemetry-proto package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from redis.asyncio import Redis

from dispatcher import tracing
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import Receiver, serving, start_worker, until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Collector:
    """What an OpenTelemetry collector's OTLP/HTTP receiver would get: span batches."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.paths: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.add(request.path)
        export = ExportTraceServiceRequest.FromString(await request.read())
        for batch in export.resource_spans:
            resource = values(batch.resource.attributes)
            self.spans += [(resource, s) for scoped in batch.scope_spans for s in scoped.spans]
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")


def values(attributes: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for pair in attributes:
        assert isinstance(pair, KeyValue)
        found[pair.key] = getattr(pair.value, pair.value.WhichOneof("value") or "string_value")
    return found


async def test_a_worker_process_exports_its_spans_over_otlp_http(
    settings: Settings,
    redis_server: Any,
    redis: Redis,
    receiver: Receiver,
    tmp_path: Path,
    workers: list[Any],
) -> None:
    collector = Collector()
    url = receiver.url()
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "s3cret-token")
    with tracing.received({"traceparent": PARENT}):
        await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
    async with serving(collector.handle) as endpoint:
        workers.append(start_worker(
            redis_server.url, tmp_path / "worker.log", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="50", OTEL_SERVICE_NAME="", OTEL_TRACES_EXPORTER="",
        ))  # fmt: skip

        async def exported() -> bool:
            return {span.name for _, span in collector.spans} >= {"fan_out", "POST"}

        await until(exported, 20, "the worker's spans at the collector")
    assert collector.paths == {"/v1/traces"}
    [seen] = receiver.requests()
    [(resource, attempt)] = [(r, s) for r, s in collector.spans if s.name == "POST"]
    [fan_out] = [s for _, s in collector.spans if s.name == "fan_out"]
    assert resource["service.name"] == "callback-dispatcher"
    assert attempt.trace_id.hex() == fan_out.trace_id.hex() == TRACE_ID
    assert fan_out.parent_span_id.hex() == PARENT.split("-")[2]
    assert attempt.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert attempt.parent_span_id == fan_out.span_id
    assert seen.headers["traceparent"] == f"00-{TRACE_ID}-{attempt.span_id.hex()}-01"
    attributes = values(attempt.attributes)
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.full"] == url and attributes["dispatcher.outcome"] == "success"
    assert "s3cret-token" not in repr(collector.spans)
