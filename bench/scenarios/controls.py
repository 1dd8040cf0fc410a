"""`controls`: what a callback's receiver controls cost per delivery, each against the
same run without them (the throughput run: 1 worker, 1 callback per event): a filter that
lets every event through (evaluated on each), and limits that never bind (`maxPerSecond`
and `maxInFlight` at their largest: every delivery admitted in Redis, its slot given back
with its write). The cost is the CPU of the worker and of Redis per delivery."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, WorkerRun, WorkerSpec, median_run, summary
from dispatcher.registry import Options
from dispatcher.registry.options import MAX_IN_FLIGHT, MAX_PER_SECOND

if TYPE_CHECKING:
    from bench.harness import Bench

FILTER = "event == 'BUILD_END' && data.status == 'SUCCEED' && data.buildNum >= `0`"
FILTERED = WorkerSpec("controls_filter", options=Options(filter=FILTER))
LIMITED = WorkerSpec(
    "controls_limits", options=Options(max_per_second=MAX_PER_SECOND, max_in_flight=MAX_IN_FLIGHT)
)
MAXIMUM = 1.1  # at most 10% more per delivery


def _cpu_us(run: WorkerRun) -> float:
    """Worker and Redis CPU per delivery (µs)."""
    per = run.per_delivery()
    return per["worker_cpu_us"] + per["redis_cpu_us"]


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    plain = median_run(bench.runs(THROUGHPUT))
    rows = []
    for spec, name, figure in (
        (FILTERED, "controls: filter", "CPU µs per delivery (worker + Redis), with a filter"),
        (LIMITED, "controls: limits", "the same, with limits (never reached)"),
    ):
        runs = bench.runs(spec)
        measured = median_run(runs)
        details = {
            spec.label: summary(runs),
            "plain": summary(bench.runs(THROUGHPUT)),
            "rate_vs_plain": measured.rate / plain.rate,
            "redis_commands_per_delivery": measured.per_delivery()["redis_commands"],
            "plain_redis_commands_per_delivery": plain.per_delivery()["redis_commands"],
        }
        row = ratio_row(
            name,
            figure,
            _cpu_us(measured),
            "µs",
            "without (the throughput run)",
            _cpu_us(plain),
            maximum=MAXIMUM,
            details=details,
        )
        rows.append(row)
    return rows


SCENARIO = Scenario("controls", run, worker_runs=(THROUGHPUT, FILTERED, LIMITED))
