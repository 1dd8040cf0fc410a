"""`ceiling`: the throughput figure against a raw aiohttp POST loop to the same receiver,
as many requests in flight as a worker runs jobs (what HTTP alone could do here)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.common import MAX_JOBS
from bench.harness import Scenario
from bench.procs import BenchError, run_loadgen
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, median_run

if TYPE_CHECKING:
    from bench.harness import Bench


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    rates = []
    for _ in range(bench.sizes.repeats):
        await bench.receiver.reset()
        result = await run_loadgen(
            "ceiling",
            [
                "--url", f"{bench.receiver.base}/hook/0", "--n", str(bench.sizes.ceiling),
                "--concurrency", str(MAX_JOBS),
            ],
            within=120,
        )  # fmt: skip
        stats = await bench.receiver.stats()
        if stats["count"] != bench.sizes.ceiling:
            raise BenchError(f"ceiling: receiver saw {stats['count']} requests")
        rates.append(result["rate"])
    disp = median_run(bench.runs(THROUGHPUT))
    return [
        ratio_row(
            "ceiling", "deliveries/s (throughput above)", disp.rate, "/s",
            "raw aiohttp POST loop", statistics.median(rates),
            details={"ceiling_rates": rates, "concurrency": MAX_JOBS},
        )
    ]  # fmt: skip


SCENARIO = Scenario("ceiling", run, worker_runs=(THROUGHPUT,))
