"""`ordered`: what ordered delivery (`orderBy`) costs. Three rows, each against a baseline
of the same run:

- 100 keys: 1 worker, 1 callback per event ordered by `lane`, the events spread over 100
  lane values in turn (100 builds going on at once), against the same callback unordered
  (the throughput run), interleaved rep by rep: deliveries/s (target >= 0.8x);
- the same two runs' Redis commands per delivery (`INFO commandstats`, whose count includes
  the commands a script runs), the extra ones ordered delivery adds, and the extra script
  calls (`EVALSHA`) alone: what a worker sends (target: <= 2 extra commands);
- one key (`*`: strict FIFO), a receiver answering every request 10 ms late: deliveries/s
  against 1 / 10 ms, the most one-at-a-time delivery can reach (target >= 0.8x).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bench.common import EVENT, PROJECT, event_data
from bench.harness import Scenario, register_callbacks
from bench.procs import BenchError, Receiver, WorkerProcess
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, WorkerRun, WorkerSpec, median_run, summary
from dispatcher.producer import Producer
from dispatcher.registry import Options

if TYPE_CHECKING:
    from bench.harness import Bench

LANES = 100
ORDERED = WorkerSpec("ordered_100", options=Options(order_by="lane"), lanes=LANES)
RECEIVER_MS = 10
FIFO_EVENTS = 300  # about 3.5 s one after another


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    ordered, plain = median_run(bench.runs(ORDERED)), median_run(bench.runs(THROUGHPUT))
    fifo = await _fifo(bench)
    extra = _commands(ordered) - _commands(plain)
    scripts = _scripts(ordered) - _scripts(plain)
    details = {"ordered": summary(bench.runs(ORDERED)), "plain": summary(bench.runs(THROUGHPUT))}
    return [
        ratio_row(
            "ordered: 100 keys", f"deliveries/s, 1 callback ordered by a key of {LANES} values",
            ordered.rate, "/s", "unordered (the throughput run)", plain.rate, minimum=0.8,
            details=details,
        ),
        Row(
            "ordered: commands", "extra Redis commands per ordered delivery (script calls)",
            round(scripts, 2), "commands", target="<= 2", ok=scripts <= 2,
            details={
                "commandstats_per_delivery": {"ordered": round(_commands(ordered), 2),
                                              "plain": round(_commands(plain), 2),
                                              "extra": round(extra, 2)},
                "evalsha_per_delivery": {"ordered": round(_scripts(ordered), 2),
                                         "plain": round(_scripts(plain), 2)},
            },
        ),
        ratio_row(
            "ordered: one key", f"deliveries/s, one lane, receiver answering in {RECEIVER_MS} ms",
            fifo["rate"], "/s", f"1 / {RECEIVER_MS} ms", 1000 / RECEIVER_MS, minimum=0.8,
            details=fifo,
        ),
    ]  # fmt: skip


def _commands(run: WorkerRun) -> float:
    return run.per_delivery()["redis_commands"]


def _scripts(run: WorkerRun) -> float:
    """Script calls (`EVALSHA`) per delivery: what the worker sends, not what scripts run."""
    return run.redis_calls.get("evalsha", 0) / run.deliveries


async def _fifo(bench: Bench) -> dict[str, float]:
    """`FIFO_EVENTS` events on one lane to a receiver answering `RECEIVER_MS` late, one
    burst worker: deliveries/s from its first to its last request."""
    slow = Receiver()
    await slow.start(delay_ms=RECEIVER_MS)
    try:
        await bench.r.flushdb()
        await register_callbacks(bench.r, slow.base, 1, Options(order_by="*"))
        await Producer(bench.settings, bench.r).emit_many(
            [(PROJECT, EVENT, event_data(i)) for i in range(FIFO_EVENTS)]
        )
        worker = await WorkerProcess.start(bench.url, log_path=bench.logs / "ordered-fifo.log")
        await slow.reset()
        started = time.monotonic()
        worker.go()
        await worker.finish(within=60 + FIFO_EVENTS * RECEIVER_MS / 100)
        stats = await slow.stats()
        if stats["count"] != FIFO_EVENTS:
            raise BenchError(f"ordered fifo: receiver saw {stats['count']} of {FIFO_EVENTS}")
        seconds = stats["last"] - stats["first"]
        return {
            "rate": (FIFO_EVENTS - 1) / seconds,
            "seconds": round(seconds, 3),
            "wall_s": round(time.monotonic() - started, 3),
            "events": FIFO_EVENTS,
        }
    finally:
        await slow.stop()


SCENARIO = Scenario("ordered", run, worker_runs=(THROUGHPUT, ORDERED))
