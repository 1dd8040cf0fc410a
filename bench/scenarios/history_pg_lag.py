"""`history-pg-lag`: one worker with PostgreSQL history at 200 events/s (open loop): from
each attempt's record time to the moment a poller (every 20 ms) finds it in PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from typing import TYPE_CHECKING

import asyncpg

from bench.harness import Scenario
from bench.postgres import create_databases
from bench.procs import BenchError, WorkerProcess, run_loadgen
from bench.report import Row
from dispatcher.clock import now_ms

if TYPE_CHECKING:
    from bench.harness import Bench

RATE = 200  # events/s
LAG_TARGET_MS = 2000
POLL_S = 0.02


class Poller:
    """Finds new records in PostgreSQL every POLL_S and notes how old each one was."""

    def __init__(self, conn: asyncpg.Connection, wanted: int) -> None:
        self.conn = conn
        self.wanted = wanted  # records to find (set to the events sent once known)
        self.lags: list[float] = []

    async def poll(self) -> None:
        """Until `wanted` records were found (bounded by the caller)."""
        last = 0
        while len(self.lags) < self.wanted:
            rows = await self.conn.fetch(
                "SELECT id, created_ms FROM history_attempts WHERE id > $1", last
            )
            seen = now_ms()
            for row in rows:
                self.lags.append(seen - row["created_ms"])
                last = max(last, row["id"])
            await asyncio.sleep(POLL_S)


async def _measure(bench: Bench, worker: WorkerProcess, poller: Poller) -> int:
    """Start the worker, send events for `lag_s` seconds, wait for their records; returns
    how many events were sent."""
    worker.go()
    await asyncio.sleep(1.0)  # start-up, schema check and election are not lag
    duration = bench.sizes.lag_s
    task = asyncio.create_task(poller.poll())
    sent = await run_loadgen(
        "latency",
        ["--redis-url", bench.url, "--rate", str(RATE), "--duration", str(duration)],
        within=duration + 60,
    )
    poller.wanted = sent["sent"]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 30)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    worker.stop()
    await worker.finish(within=30)
    return int(sent["sent"])


async def run(bench: Bench) -> list[Row]:
    assert bench.pg_url is not None
    (url,) = await create_databases(bench.pg_url, ("lag",))
    await bench.prepare(callbacks=1, events=0)
    worker = await WorkerProcess.start(
        bench.url, burst=False, log_path=bench.logs / "history-pg-lag.log",
        extra=["--history-url", url],
    )  # fmt: skip
    conn = await asyncpg.connect(url)
    poller = Poller(conn, wanted=int(RATE * bench.sizes.lag_s))
    try:
        sent = await _measure(bench, worker, poller)
    finally:
        await worker.kill()
        await conn.close()
    lags = sorted(poller.lags)
    if len(lags) < sent:
        raise BenchError(f"history-pg-lag: {len(lags)} of {sent} records were stored")
    p50, p99 = statistics.median(lags), lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    return [
        Row(
            "history pg: queryable", f"attempt -> record found in PostgreSQL, {RATE} events/s",
            p99, "ms", target=f"p99 <= {LAG_TARGET_MS} ms", ok=p99 <= LAG_TARGET_MS,
            shown=f"p50 {p50:.0f} ms / p99 {p99:.0f} ms",
            details={"p50_ms": p50, "p99_ms": p99, "max_ms": lags[-1], "records": len(lags)},
        )
    ]  # fmt: skip


SCENARIO = Scenario("history-pg-lag", run, postgres=True)
