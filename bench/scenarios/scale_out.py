"""`scale-out`: 2 worker processes against 1, against the same ratio for arq no-op
workers: on 2 cores Redis and the receiver share the CPU, so only like against like says
whether the dispatcher scales as well as arq itself does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.workers import NOOP, THROUGHPUT, WorkerSpec, median_run, summary

if TYPE_CHECKING:
    from bench.harness import Bench

SCALE_OUT = WorkerSpec("scale_out", workers=2)
NOOP_SCALE_OUT = WorkerSpec("noop_scale_out", kind="noop", workers=2)


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    ours = median_run(bench.runs(SCALE_OUT)).rate / median_run(bench.runs(THROUGHPUT)).rate
    arqs = median_run(bench.runs(NOOP_SCALE_OUT)).rate / median_run(bench.runs(NOOP)).rate
    return [
        ratio_row(
            "scale-out", "deliveries/s, 2 workers / 1 worker", ours, "x",
            "arq no-op workers, 2 / 1", arqs, minimum=0.9,
            details={
                "two_workers": summary(bench.runs(SCALE_OUT)),
                "noop_two_workers": summary(bench.runs(NOOP_SCALE_OUT)),
            },
        )
    ]  # fmt: skip


SCENARIO = Scenario("scale-out", run, worker_runs=(NOOP, THROUGHPUT, SCALE_OUT, NOOP_SCALE_OUT))
