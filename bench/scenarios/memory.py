"""`memory`: a worker's RSS after `memory_late` deliveries against after `memory_early`
(it must stay flat), sampled at checkpoints on the way."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row

if TYPE_CHECKING:
    from bench.harness import Bench


async def run(bench: Bench) -> list[Row]:
    early, late = bench.sizes.memory_early, bench.sizes.memory_late
    checkpoints = sorted({early, late // 4, late // 2, 3 * late // 4, late})
    worker, _ = await asyncio.gather(
        WorkerProcess.start(bench.url, burst=False, log_path=bench.logs / "memory.log"),
        bench.prepare(callbacks=1, events=late),
    )
    samples: dict[int, int] = {}
    try:
        await bench.receiver.reset()
        worker.go()
        for mark in checkpoints:
            stats = await bench.receiver.wait_count(mark, within=30 + mark / 100)
            if stats["count"] < mark:
                raise BenchError(f"memory: {stats['count']} of {mark} deliveries")
            samples[mark] = worker.rss_kb()
        worker.stop()
        await worker.finish(within=30)
    finally:
        await worker.kill()
    return [
        ratio_row(
            "memory", f"worker RSS after {late:,} deliveries", samples[late] / 1024, "MiB",
            f"RSS after {early:,}", samples[early] / 1024, maximum=1.2,
            details={"rss_kb_at": samples},
        )
    ]  # fmt: skip


SCENARIO = Scenario("memory", run)
