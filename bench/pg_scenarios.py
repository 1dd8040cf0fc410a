"""The PostgreSQL history's scenarios (the bench's private PostgreSQL must be running):
deliveries with it against deliveries with the Redis history, Redis memory per attempt,
how soon a record is queryable, the seed query at scale, and the shipping rate."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import asyncpg

from bench import history_pg_bench
from bench.procs import BenchError, WorkerProcess, run_loadgen
from bench.report import Row, ratio_row
from bench.scenarios import Bench, _median_run, _summary

__all__ = ["history_pg", "history_pg_delivery", "history_pg_lag"]

MEMORY_TARGET_B = 200
LAG_TARGET_MS = 2000


async def history_pg_delivery(bench: Bench) -> list[Row]:
    """1 worker with PostgreSQL history (it ships too) vs 1 with Redis history, interleaved;
    and what each leaves in Redis per attempt once done (the PostgreSQL one: shipped)."""
    await bench.worker_block()
    pg_runs, redis_runs = bench.worker_runs["throughput_pg"], bench.worker_runs["throughput"]
    pg, rd = _median_run(pg_runs), _median_run(redis_runs)
    pg_bytes = statistics.median(r.redis_bytes / r.deliveries for r in pg_runs)
    rd_bytes = statistics.median(r.redis_bytes / r.deliveries for r in redis_runs)
    return [
        ratio_row(
            "history pg: delivery", "deliveries/s, 1 worker, PostgreSQL history", pg.rate, "/s",
            "the same, Redis history", rd.rate, minimum=0.95,
            details={"postgres": _summary(pg_runs), "redis": _summary(redis_runs)},
        ),
        Row(
            "history pg: Redis memory", "Redis bytes per delivered attempt, shipped", pg_bytes,
            "B", "Redis history", rd_bytes, pg_bytes / rd_bytes if rd_bytes else None,
            f"< {MEMORY_TARGET_B} B", pg_bytes < MEMORY_TARGET_B,
            details={"postgres": [r.redis_bytes for r in pg_runs],
                     "redis": [r.redis_bytes for r in redis_runs]},
        ),
    ]  # fmt: skip


async def history_pg_lag(bench: Bench) -> list[Row]:
    """One worker with PostgreSQL history at 200 events/s: from each attempt's record time
    to the moment a poller (every 20 ms) finds it in PostgreSQL."""
    assert bench.pg_url is not None
    (url,) = await history_pg_bench.create_databases(bench.pg_url, ("lag",))
    await bench.prepare(callbacks=1, events=0)
    worker = await WorkerProcess.start(
        bench.url, burst=False, log_path=bench.logs / "history-pg-lag.log",
        extra=["--history-url", url],
    )  # fmt: skip
    conn = await asyncpg.connect(url)
    lags: list[float] = []

    wanted = [int(200 * bench.sizes.lag_s)]  # the records to find: the events sent

    async def poll() -> None:
        """Until every record was found (bounded by the caller)."""
        last = 0
        while len(lags) < wanted[0]:
            rows = await conn.fetch(
                "SELECT id, created_ms FROM history_attempts WHERE id > $1", last
            )
            seen = time.time() * 1000
            for row in rows:
                lags.append(seen - row["created_ms"])
                last = max(last, row["id"])
            await asyncio.sleep(0.02)

    try:
        worker.go()
        await asyncio.sleep(1.0)  # start-up, schema check and election are not lag
        rate, duration = 200, bench.sizes.lag_s
        poller = asyncio.create_task(poll())
        sent = await run_loadgen(
            "latency",
            ["--redis-url", bench.url, "--rate", str(rate), "--duration", str(duration)],
            within=duration + 60,
        )
        wanted[0] = sent["sent"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(poller), 30)
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        worker.stop()
        await worker.finish(within=30)
    finally:
        await worker.kill()
        await conn.close()
    if len(lags) < sent["sent"]:
        raise BenchError(f"history-pg-lag: {len(lags)} of {sent['sent']} records were stored")
    lags.sort()
    p50, p99 = statistics.median(lags), lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    return [
        Row(
            "history pg: queryable", "attempt -> record found in PostgreSQL, 200 events/s", p99,
            "ms", target=f"p99 <= {LAG_TARGET_MS} ms", ok=p99 <= LAG_TARGET_MS,
            shown=f"p50 {p50:.0f} ms / p99 {p99:.0f} ms",
            details={"p50_ms": p50, "p99_ms": p99, "max_ms": lags[-1], "records": len(lags)},
        )
    ]  # fmt: skip


async def history_pg(bench: Bench) -> list[Row]:
    """The seed query on a big and a 100,000-record table vs a primary-key SELECT; the
    shipping rate vs a worker's delivery rate (this run's, else the last full table's)."""
    assert bench.pg_url is not None
    await bench.worker_block()  # the delivery rate the shipping is measured against
    sizes = bench.sizes
    big_url, small_url = await history_pg_bench.create_databases(bench.pg_url, ("big", "small"))
    result = await history_pg_bench.run(
        bench.r, bench.settings, (big_url, small_url),
        (sizes.history_pg_total, sizes.history_pg_hot, 100_000), sizes.history_rounds,
        sizes.ship_records,
    )  # fmt: skip
    await history_pg_bench.create_databases(bench.pg_url, ("big", "small"))  # the disk back
    t = result["queries"].timings_us
    hot, small_hot = result["queries"].counts
    total = f"{sizes.history_pg_total:,}"
    details = {
        "timings_us": t,
        "queried_pair_records": [hot, small_hot],
        "fill_rate": result["fill_rate"],
        "page_size": history_pg_bench.PAGE_SIZE,
    }
    worker_rate = _median_run(bench.worker_runs["throughput_pg"]).rate
    shipping = result["shipping"]
    return [
        ratio_row(
            "history pg query", f"page 1, {total} records ({hot:,} in the window)",
            t["page_1"], "µs", "primary-key SELECT", t["pk_select"], maximum=10.0,
            details=details,
        ),
        ratio_row(
            "history pg query", f"offset 10,000, {total} records", t["page_offset_10000"], "µs",
            "primary-key SELECT", t["pk_select"], maximum=10.0,
        ),
        ratio_row(
            "history pg scale", f"page 1, {total} records", t["page_1"], "µs",
            "same at 100,000 records", t["small_page_1"], maximum=1.5,
        ),
        ratio_row(
            "history pg scale", f"offset 10,000, {total} records", t["page_offset_10000"],
            "µs", "same at 100,000 records", t["small_page_offset_10000"], maximum=1.5,
        ),
        ratio_row(
            "history pg shipping", f"records/s into PostgreSQL (durable), {shipping['records']:,}",
            shipping["rate"], "/s", "a worker's deliveries/s (this run)", worker_rate,
            minimum=5.0, details=shipping,
        ),
    ]  # fmt: skip
