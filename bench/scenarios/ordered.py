"""`ordered`: what ordered delivery (`orderBy`) costs. Three rows, each against a baseline
of the same run:

- 100 keys: 1 worker, 1 callback per event ordered by `lane`, the events spread over 100
  lane values in turn (100 builds going on at once), against the same callback unordered
  (the throughput run), interleaved rep by rep: deliveries/s (target >= 0.8x);
- the same two runs' Redis commands per delivery (`INFO commandstats`, whose count includes
  the commands a script runs), the extra ones ordered delivery adds, and the extra script
  calls (`EVALSHA`) alone: what a worker sends (target: <= 2 extra commands);
- one key (`*`: strict FIFO), a receiver holding every answer 10 ms: deliveries/s once the
  pre-filled queue's fan-outs are done, against 1 / the attempts' mean HTTP exchange (their
  records' `durationMs`, ~12 ms: the receiver's timer and HTTP on top of its 10 ms), the
  most one-at-a-time delivery can reach (target >= 0.8x); the details give the whole run's
  rate and the ratio to 1 / 10 ms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.common import EVENT, PROJECT, event_data
from bench.harness import Scenario, register_callbacks
from bench.procs import BenchError, Receiver, WorkerProcess
from bench.report import Row, ratio_row
from bench.workers import THROUGHPUT, WorkerRun, WorkerSpec, median_run, summary
from dispatcher.clock import now_ms
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.producer import Producer
from dispatcher.registry import Options

if TYPE_CHECKING:
    from bench.harness import Bench

LANES = 100
ORDERED = WorkerSpec("ordered_100", options=Options(order_by="lane"), lanes=LANES)
RECEIVER_MS = 10
FIFO_EVENTS = 450  # about 5 s one after another


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
            "ordered: one key", f"deliveries/s, one lane, receiver waiting {RECEIVER_MS} ms",
            fifo["rate"], "/s", "1 / the attempts' mean HTTP exchange",
            1000 / fifo["attempt_ms_mean"], minimum=0.8,
            details={**fifo, "vs_nominal": fifo["rate"] / (1000 / RECEIVER_MS)},
        ),
    ]  # fmt: skip


def _commands(run: WorkerRun) -> float:
    return run.per_delivery()["redis_commands"]


def _scripts(run: WorkerRun) -> float:
    """Script calls (`EVALSHA`) per delivery: what the worker sends, not what scripts run."""
    return run.redis_by_command.get("evalsha", (0, 0))[0] / run.deliveries


async def _fifo(bench: Bench) -> dict[str, float]:
    """`FIFO_EVENTS` events on one lane to a receiver answering `RECEIVER_MS` late, one
    burst worker: deliveries/s once the pre-filled queue's fan-outs are done (from the
    third of the events on: the fan-outs of all of them compete with the lane's first
    deliveries for the worker), and over the whole run."""
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
        worker.go()
        within = 60 + FIFO_EVENTS * RECEIVER_MS / 100
        early = await slow.wait_count(FIFO_EVENTS // 3, within=within)
        await worker.finish(within=within)
        stats = await slow.stats()
        if stats["count"] != FIFO_EVENTS:
            raise BenchError(f"ordered fifo: receiver saw {stats['count']} of {FIFO_EVENTS}")
        durations = await _durations(bench, f"{slow.base}/hook/0")
        return {
            "rate": (FIFO_EVENTS - early["count"]) / (stats["last"] - early["last"]),
            "attempt_ms_mean": sum(durations) / len(durations),
            "whole_run_rate": (FIFO_EVENTS - 1) / (stats["last"] - stats["first"]),
            "seconds": round(stats["last"] - stats["first"], 3),
            "events": FIFO_EVENTS,
            "from_request": early["count"],
        }
    finally:
        await slow.stop()


async def _durations(bench: Bench, url: str) -> list[int]:
    """The HTTP exchange of each attempt to `url` (its records' `durationMs`), ms."""
    history, found, page = RedisHistory(bench.r, bench.settings, Keys()), [], 1
    end = now_ms() + 60_000
    while True:
        got = await history.query(PROJECT, url, EVENT, start_ms=end - 3_600_000, end_ms=end,
                                  page=page, page_size=100)  # fmt: skip
        found += [r.duration_ms or 0 for r in got.records]
        if page >= got.total_pages:
            return found
        page += 1


SCENARIO = Scenario("ordered", run, worker_runs=(THROUGHPUT, ORDERED))
