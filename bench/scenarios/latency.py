"""`latency`: emit -> receiver at 200 events/s (open loop), one worker with default
settings: p50 and p99 of (arrival time at the receiver - emit time in the event data)."""

from __future__ import annotations

import asyncio
import statistics
from typing import TYPE_CHECKING, Any

from bench.common import MAX_JOBS, POLL_DELAY
from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess, run_loadgen
from bench.report import Row

if TYPE_CHECKING:
    from bench.harness import Bench

RATE = 200  # events/s
TARGET_P99_MS = 150


async def measure(bench: Bench, rate: float, duration: float) -> tuple[list[float], Any]:
    """Open-loop `emit()` at `rate` events/s for `duration` s to the running worker: each
    event's emit -> receiver time in ms, sorted, and what the load generator reported."""
    await asyncio.sleep(0.5)  # the worker's start-up is not part of any event's latency
    await bench.receiver.reset(latency=True)
    sent = await run_loadgen(
        "latency",
        ["--redis-url", bench.url, "--rate", str(rate), "--duration", str(duration)],
        within=duration + 60,
    )
    stats = await bench.receiver.wait_count(sent["sent"], within=30)
    pairs = (await bench.receiver.control("/_latency"))["pairs"]
    lat = sorted((arrival - emitted) * 1000 for emitted, arrival in pairs)
    if not lat or stats["count"] != sent["sent"]:
        raise BenchError(f"latency: {stats['count']} of {sent['sent']} arrived")
    return lat, sent


def p99(lat: list[float]) -> float:
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))]


async def run(bench: Bench) -> list[Row]:
    await bench.prepare(callbacks=1, events=0)
    worker = await WorkerProcess.start(bench.url, burst=False, log_path=bench.logs / "latency.log")
    try:
        worker.go()
        lat, sent = await measure(bench, RATE, bench.sizes.latency_s)
        worker.stop()
        await worker.finish(within=30)
    finally:
        await worker.kill()
    p50 = statistics.median(lat)
    slowest = p99(lat)
    details = {
        "p50_ms": p50, "p90_ms": lat[int(0.9 * len(lat))], "p99_ms": slowest, "max_ms": lat[-1],
        "events": len(lat), "emit": sent,
        "settings": {"max_jobs": MAX_JOBS, "poll_delay": POLL_DELAY},
    }  # fmt: skip
    return [
        Row(
            "latency", f"emit -> receiver, {RATE} events/s", slowest, "ms",
            target=f"p99 <= {TARGET_P99_MS} ms", ok=slowest <= TARGET_P99_MS,
            shown=f"p50 {p50:.1f} ms / p99 {slowest:.1f} ms", details=details,
        )
    ]  # fmt: skip


SCENARIO = Scenario("latency", run)
