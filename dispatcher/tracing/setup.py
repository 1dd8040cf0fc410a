"""Export, once per process at start: what the standard `OTEL_*` variables ask for."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace

from dispatcher.tracing.context import SERVICE_NAME, state

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["exporters", "propagates", "recording", "setup"]

log = structlog.get_logger("dispatcher.tracing")


def setup() -> str:
    """Once per process, at start: export spans as the `OTEL_*` variables say, and say how
    (`otlp <endpoint>`, `console`, `off`; the same answer on later calls). Never raises:
    a setting that cannot be honoured is logged, and the process propagates traces without
    exporting them."""
    if state.mode:
        return state.mode
    state.propagate = propagates(os.environ)
    made = exporters(os.environ)
    state.mode = ", ".join(name for name, _ in made) or "off"
    if made:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=_resource())
        for _, exporter in made:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        state.tracer = provider.get_tracer(SERVICE_NAME)
    log.info("tracing.configured", export=state.mode, propagate=state.propagate)
    return state.mode


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
    before = state.tracer
    state.tracer = None if provider is None else provider.get_tracer(SERVICE_NAME)
    try:
        yield
    finally:
        state.tracer = before
