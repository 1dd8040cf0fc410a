"""`fan-out`: 10 callbacks per event (as many deliveries in all) against 1 callback per
event; then one event to 10,000 callbacks (one receiver, a path each): its rate against
the 10-callback rate, the worker's memory growth meanwhile, and the crash run: a worker
SIGKILLed half-way through the event, then a second worker that finishes it, and how many
requests the receiver got beyond one per callback (what the crash made us send again)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING, Any

from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row
from bench.workers import FAN_OUT, THROUGHPUT, WorkerSpec, median_run, summary
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from bench.harness import Bench

WIDE = 10_000  # callbacks of the one event
LEASE_S = 2.0  # the crash run's lease: the second worker takes over within it
CHUNK: int = Settings().fan_out_chunk  # the environment's (DISPATCHER_FAN_OUT_CHUNK) too
MAX_GROWTH_MIB = 50

FAN_OUT_WIDE = WorkerSpec("fan_out_wide", callbacks=WIDE, events=1)


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    fan = median_run(bench.runs(FAN_OUT))
    one = median_run(bench.runs(THROUGHPUT))
    return [
        ratio_row(
            "fan-out", "deliveries/s, 10 callbacks/event", fan.rate, "/s",
            "1 callback/event", one.rate, minimum=2.0,
            details={
                "fan_out": summary(bench.runs(FAN_OUT)),
                "events": FAN_OUT.event_count(bench.sizes.deliveries),
            },
        ),
        *await _wide_rows(bench, fan.rate),
    ]  # fmt: skip


async def _wide_rows(bench: Bench, ten_rate: float) -> list[Row]:
    """The wide fan-out's rate against the 10-callback rate, the worker's memory growth
    during those runs, and the crash run's figure."""
    wide = summary(bench.runs(FAN_OUT_WIDE))
    results = [r for run in bench.runs(FAN_OUT_WIDE) for r in run.results]
    growth = max(r["hwm_kb"] - r["rss_start_kb"] for r in results) / 1024
    await bench.prepare(callbacks=WIDE, events=1)
    # at INFO, so that a run that fails leaves each attempt on record (bench/results/logs-*)
    crash = await crash_run(bench, log_level="INFO")
    return [
        ratio_row(
            "fan-out 10k", f"deliveries/s, 1 event to {WIDE:,} callbacks",
            wide["median_rate"], "/s", "10 callbacks/event", ten_rate, minimum=1.0,
            details={"wide": wide, "chunk": CHUNK},
        ),
        Row(
            "fan-out 10k", "worker RSS growth during it (peak - at start)", growth, "MiB",
            target=f"<= {MAX_GROWTH_MIB} MiB", ok=growth <= MAX_GROWTH_MIB,
            details={"peak_kb": [r["hwm_kb"] for r in results],
                     "start_kb": [r["rss_start_kb"] for r in results]},
        ),
        ratio_row(
            "fan-out 10k", "requests sent again after a SIGKILL half-way", crash["resent"],
            "requests", "one chunk", CHUNK, maximum=1.0, details=crash,
        ),
    ]  # fmt: skip


async def crash_run(bench: Bench, log_level: str = "WARNING") -> dict[str, Any]:
    """SIGKILL a worker half-way, once the receiver has half of the event's requests and
    half a chunk more (so that a chunk is in flight, not between two); a second worker
    finishes. Returns the counts (the callbacks and event are already in Redis)."""
    kill_at = WIDE // 2 + CHUNK // 2
    args = ["--lease-seconds", str(LEASE_S)]
    receiver = bench.receiver
    first = await WorkerProcess.start(
        bench.url, burst=False, log_level=log_level, log_path=bench.logs / "wide-crash-1.log",
        extra=args,
    )  # fmt: skip
    try:
        await receiver.reset()
        first.go()
        before = await receiver.wait_count(kill_at, within=120)
        if before["count"] < kill_at:
            raise BenchError(f"wide crash: {before['count']} of {kill_at} before the kill")
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGKILL)
        await first.process.wait()
        at_kill = (await receiver.stats())["count"]
    finally:
        await first.kill()
    if at_kill >= WIDE:
        raise BenchError("wide crash: the worker finished before it was killed")
    second = await WorkerProcess.start(
        bench.url, log_level=log_level, log_path=bench.logs / "wide-crash-2.log", extra=args
    )
    second.go()
    await second.finish(within=180)
    total = (await receiver.stats())["count"]
    if total < WIDE:
        raise BenchError(f"wide crash: the receiver saw {total} of {WIDE} after the restart")
    return {"at_kill": at_kill, "received": total, "resent": total - WIDE}


SCENARIO = Scenario("fan-out", run, worker_runs=(THROUGHPUT, FAN_OUT, FAN_OUT_WIDE))
