"""`tracing`: what carrying a W3C trace context costs a worker with no exporter (the
default): 1 worker over events that each carry a `traceparent` (stored with the job, sent
with the request, kept in the history record), against the same worker over events that
carry none; and, timed in this process, what an attempt of an untraced event spends in
`dispatcher.tracing` (its fast path). For the record, not a target: the same traced run
with spans exported over OTLP/HTTP (`OTEL_EXPORTER_OTLP_ENDPOINT`) to a sink process."""

from __future__ import annotations

import timeit
from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, WorkerSpec, median_run, summary
from dispatcher import tracing

if TYPE_CHECKING:
    from bench.harness import Bench

TRACED = WorkerSpec("throughput_traced", traced=True)
EXPORTED = WorkerSpec("throughput_exported", traced=True, export=True)
FAST_PATH_CALLS = 200_000


def fast_path_ns() -> float:
    """Nanoseconds an attempt of an event without a context spends in tracing when no span
    is recorded: the `attempt(...)` call, its `with`, and `end(...)`."""

    def one() -> None:
        with tracing.attempt(None, url="http://127.0.0.1/hook", number=1, delivery_id="d",
                             event_id="e", project_id="p", callback_id=1) as traced:  # fmt: skip
            traced.end("success", 200, None)

    return min(timeit.repeat(one, number=FAST_PATH_CALLS, repeat=5)) / FAST_PATH_CALLS * 1e9


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    traced, plain = median_run(bench.runs(TRACED)), median_run(bench.runs(THROUGHPUT))
    traced_cpu = traced.per_delivery()["worker_cpu_us"]
    plain_cpu = plain.per_delivery()["worker_cpu_us"]
    exported = median_run(bench.runs(EXPORTED))
    fast = fast_path_ns()
    details = {"traced": summary(bench.runs(TRACED)), "untraced": summary(bench.runs(THROUGHPUT)),
               "fast_path_ns_per_attempt": round(fast, 1),
               "fast_path_share_of_worker_cpu": round(fast / 1000 / plain_cpu, 5),
               "exported": summary(bench.runs(EXPORTED))}  # fmt: skip
    return [
        ratio_row(
            "tracing: propagate", "deliveries/s, 1 worker, every event with a traceparent, "
            "no exporter", traced.rate, "/s", "the same, events without one", plain.rate,
            minimum=0.95, details=details,
        ),
        ratio_row(
            "tracing: worker CPU", "µs per delivery (the run above)", traced_cpu, "µs",
            "events without a traceparent", plain_cpu, maximum=1.05,
        ),
        ratio_row(
            "tracing: export", "deliveries/s, the same with spans exported over OTLP/HTTP",
            exported.rate, "/s", "events without a traceparent, no exporter", plain.rate,
        ),
        ratio_row(
            "tracing: export CPU", "µs per delivery (the run above)",
            exported.per_delivery()["worker_cpu_us"], "µs", "the same, no exporter", plain_cpu,
        ),
        Row(
            "tracing: fast path", "ns per attempt in dispatcher.tracing, no context, no "
            "exporter (timed in-process)", fast, "ns", "worker CPU per delivery (untraced)",
            plain_cpu * 1000, fast / (plain_cpu * 1000), "report", None,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("tracing", run, worker_runs=(THROUGHPUT, TRACED, EXPORTED))
