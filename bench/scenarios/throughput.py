"""`throughput`: deliveries/s of 1 worker, 1 callback per event, history on, against an
arq no-op worker over the same queue; its CPU per delivery; the same at log level INFO."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.common import MAX_JOBS, POLL_DELAY
from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.workers import NOOP, THROUGHPUT, WorkerSpec, median_run, summary

if TYPE_CHECKING:
    from bench.harness import Bench

THROUGHPUT_INFO = WorkerSpec("throughput_info", log_level="INFO")


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    noop = median_run(bench.runs(NOOP))
    disp = median_run(bench.runs(THROUGHPUT))
    info = median_run(bench.runs(THROUGHPUT_INFO))
    details = {
        "dispatcher": summary(bench.runs(THROUGHPUT)),
        "noop": summary(bench.runs(NOOP)),
        "settings": {"max_jobs": MAX_JOBS, "poll_delay": POLL_DELAY, "log_level": "WARNING"},
    }
    return [
        ratio_row(
            "throughput", "deliveries/s, 1 worker, 1 callback/event", disp.rate, "/s",
            "arq no-op worker", noop.rate, minimum=0.8, details=details,
        ),
        ratio_row(
            "worker CPU", "µs per delivery (throughput above)",
            disp.per_delivery()["worker_cpu_us"], "µs", "arq no-op worker, per job",
            noop.per_delivery()["worker_cpu_us"],
        ),
        ratio_row(
            "throughput (log INFO)", "the same, log level INFO", info.rate, "/s",
            "arq no-op worker", noop.rate, minimum=0.6,
            details={
                "info": summary(bench.runs(THROUGHPUT_INFO)),
                "vs_warning": info.rate / disp.rate,
            },
        ),
    ]  # fmt: skip


SCENARIO = Scenario("throughput", run, worker_runs=(NOOP, THROUGHPUT, THROUGHPUT_INFO))
