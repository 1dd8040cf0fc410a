"""The wide fan-out: one event to 10,000 callbacks (one receiver, a path each).

Its rate runs go in the interleaved worker block (`scenarios.Bench.worker_block`, label
`fan_out_wide`); here are the registration of many callbacks and the crash run: a worker
SIGKILLed half-way through the event, then a second worker that finishes it, and how many
requests the receiver got beyond one per callback (what the crash made us send again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bench.common import EVENT, PROJECT, TOKEN
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bench.procs import Receiver

WIDE = 10_000  # callbacks of the one event
LEASE_S = 2.0  # the crash run's lease: the second worker takes over within it
CONCURRENT_CREATES = 200
CHUNK: int = Settings.model_fields["fan_out_chunk"].default
MAX_GROWTH_MIB = 50


class WideBench(Protocol):
    """What the wide fan-out's rows need of the bench (bench.scenarios.Bench)."""

    url: str
    receiver: Receiver
    logs: Path
    worker_runs: dict[str, list[Any]]

    async def prepare(self, callbacks: int, events: int) -> None: ...


async def rows(bench: WideBench, ten_rate: float, summary: dict[str, Any]) -> list[Row]:
    """The wide fan-out's rate (its runs are in `summary`) against the 10-callback rate,
    the worker's memory growth during those runs, and the crash run's figure."""
    results = [r for run in bench.worker_runs["fan_out_wide"] for r in run.results]
    growth = max(r["hwm_kb"] - r["rss_start_kb"] for r in results) / 1024
    await bench.prepare(callbacks=WIDE, events=1)
    # at INFO, so that a run that fails leaves each attempt on record (bench/results/logs-*)
    crash = await crash_run(bench.url, bench.receiver, bench.logs, log_level="INFO")
    return [
        ratio_row(
            "fan-out 10k", f"deliveries/s, 1 event to {WIDE:,} callbacks",
            summary["median_rate"], "/s", "10 callbacks/event", ten_rate, minimum=1.0,
            details={"wide": summary, "chunk": CHUNK},
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


async def register(redis: Redis, base: str, callbacks: int) -> None:
    """`callbacks` callbacks on (PROJECT, EVENT), `{base}/hook/{i}`, a few hundred at once."""
    registry = Registry(redis)
    for start in range(0, callbacks, CONCURRENT_CREATES):
        await asyncio.gather(*(
            registry.create(PROJECT, f"{base}/hook/{i}", Event(EVENT), Region.DEVNET, TOKEN)
            for i in range(start, min(callbacks, start + CONCURRENT_CREATES))
        ))  # fmt: skip


async def crash_run(
    url: str, receiver: Receiver, log_dir: Any, log_level: str = "WARNING"
) -> dict[str, Any]:
    """SIGKILL a worker half-way, once the receiver has half of the event's requests and
    half a chunk more (so that a chunk is in flight, not between two); a second worker
    finishes. Returns the counts (the callbacks and event are already in Redis)."""
    kill_at = WIDE // 2 + CHUNK // 2
    args = ["--lease-seconds", str(LEASE_S)]
    first = await WorkerProcess.start(
        url, burst=False, log_level=log_level, log_path=log_dir / "wide-crash-1.log", extra=args
    )
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
        url, log_level=log_level, log_path=log_dir / "wide-crash-2.log", extra=args
    )
    second.go()
    await second.finish(within=180)
    total = (await receiver.stats())["count"]
    if total < WIDE:
        raise BenchError(f"wide crash: the receiver saw {total} of {WIDE} after the restart")
    return {"at_kill": at_kill, "received": total, "resent": total - WIDE}
