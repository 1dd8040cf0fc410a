"""`history-pg-delivery`: 1 worker with PostgreSQL history (it ships too) against 1 with
Redis history, interleaved; and what each leaves in Redis per attempt once done (the
PostgreSQL one: shipped)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, THROUGHPUT_PG, median_run, summary

if TYPE_CHECKING:
    from bench.harness import Bench

MEMORY_TARGET_B = 200


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    pg_runs, redis_runs = bench.runs(THROUGHPUT_PG), bench.runs(THROUGHPUT)
    pg, rd = median_run(pg_runs), median_run(redis_runs)
    pg_bytes = statistics.median(r.redis_bytes / r.deliveries for r in pg_runs)
    rd_bytes = statistics.median(r.redis_bytes / r.deliveries for r in redis_runs)
    return [
        ratio_row(
            "history pg: delivery", "deliveries/s, 1 worker, PostgreSQL history", pg.rate, "/s",
            "the same, Redis history", rd.rate, minimum=0.95,
            details={"postgres": summary(pg_runs), "redis": summary(redis_runs)},
        ),
        Row(
            "history pg: Redis memory", "Redis bytes per delivered attempt, shipped", pg_bytes,
            "B", "Redis history", rd_bytes, pg_bytes / rd_bytes if rd_bytes else None,
            f"< {MEMORY_TARGET_B} B", pg_bytes < MEMORY_TARGET_B,
            details={"postgres": [r.redis_bytes for r in pg_runs],
                     "redis": [r.redis_bytes for r in redis_runs]},
        ),
    ]  # fmt: skip


SCENARIO = Scenario(
    "history-pg-delivery", run, worker_runs=(THROUGHPUT, THROUGHPUT_PG), postgres=True
)
