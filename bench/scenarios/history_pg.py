"""`history-pg`: the PostgreSQL history at scale, on the bench's private PostgreSQL.

- Fill: rows straight into `history_attempts` with COPY (not through the service): `total`
  records over 7 days and 1,000 (url, event) pairs, the queried pair holding `hot` of them,
  each row a record shaped like the worker's (~1.3 KB of JSON); the per-minute and per-hour
  counts derived from the same rows. A second database holds the small table (100,000).
- Queries: `PostgresHistory.query` page 1 and the page at offset 10,000 (page 501 of 20),
  records decoded, on both tables, against one primary-key SELECT of a random record
  through the same pool, all interleaved round by round (medians).
- Shipping: `records` appended to the stream as workers do (XADD on pipelines), then one
  `Shipper` drains them: records/s into PostgreSQL, durably committed, against a worker's
  deliveries/s with PostgreSQL history in this run.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from bench.common import record_template
from bench.harness import Scenario
from bench.postgres import create_databases
from bench.report import Row, ratio_row
from bench.timing import Op, interleaved, median_us
from bench.workers import THROUGHPUT_PG, median_run
from dispatcher.clock import now_ms
from dispatcher.history.postgres import PostgresHistory
from dispatcher.history.schema import DAY_MS, ensure_partitions, upgrade
from dispatcher.history.shipper import Shipper
from dispatcher.history.stream import stream_fields
from dispatcher.keys import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bench.harness import Bench
    from dispatcher.settings import Settings


keys = Keys()  # today's key names (one shard)
EVENTS = ("BUILD_END", "BUILD_START", "BUILD_STAGE_END", "BUILD_TASK_END")
URLS = tuple(f"http://127.0.0.1:9/hook/{i}" for i in range(250))
PAIRS = tuple((url, event) for url in URLS for event in EVENTS)  # 1,000 (url, event) pairs
QUERIED = PAIRS[0]
PAGE_SIZE = 20
DEEP_PAGE = 10_000 // PAGE_SIZE + 1
WEEK_MS = 7 * DAY_MS
COPY_ROWS = 20_000
COLUMNS = ("id", "created_ms", "pair_id", "project_id", "delivery_id", "dead", "doc")


def _doc_parts() -> tuple[str, str]:
    """A worker's record as JSON, split where the per-row fields go (cheap formatting)."""
    rest = {k: v for k, v in record_template().items() if k not in ("callBackUrl", "events")}
    rest.pop("createdTime"), rest.pop("deliveryId"), rest.pop("eventId")
    body = orjson.dumps(rest).decode()[1:]  # without its "{"
    return '{"id":%d,"createdTime":%d,"callBackUrl":"%s","events":"%s","deliveryId":"%s",', body


async def fill(url: str, total: int, hot: int, end_ms: int, seed: int = 7) -> float:
    """`total` rows in the database at `url` (migrated here), `hot` of them in QUERIED;
    returns the rows written per second."""
    rng = random.Random(seed)
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    try:
        await upgrade(conn)
        await conn.execute("SET synchronous_commit = off")  # a bulk load; the rows are made up
        start_ms = end_ms - WEEK_MS
        await ensure_partitions(conn, start_ms, end_ms)
        await conn.executemany(
            "INSERT INTO history_pairs (project_id, event, url) VALUES ('bench', $1, $2)",
            [(event, url) for url, event in PAIRS],
        )
        pair_ids = {
            (r["url"], r["event"]): r["pair_id"]
            for r in await conn.fetch("SELECT pair_id, url, event FROM history_pairs")
        }
        head, tail = _doc_parts()
        counts: Counter[tuple[int, int, int]] = Counter()
        others = PAIRS[1:]
        written = 0
        while written < total:
            chunk = []
            for _ in range(min(COPY_ROWS, total - written)):
                written += 1
                pair = QUERIED if written <= hot else others[written % len(others)]
                created = start_ms + 1 + rng.randrange(WEEK_MS - 2)
                pid = pair_ids[pair]
                delivery = f"evt_{written}.1"
                doc = head % (written, created, pair[0], pair[1], delivery) + tail
                chunk.append((written, created, pid, "bench", delivery, False, doc))
                counts[(pid, 60_000, created - created % 60_000)] += 1
                counts[(pid, 3_600_000, created - created % 3_600_000)] += 1
            await conn.copy_records_to_table("history_attempts", records=chunk, columns=COLUMNS)
        rows = [(p, s, b, n) for (p, s, b), n in counts.items()]
        await conn.copy_records_to_table(
            "history_counts", records=rows, columns=("pair_id", "span", "bucket_ms", "n")
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return total / (time.perf_counter() - started)


@dataclass
class QueryResult:
    """Median µs of each timed operation; the queried pair's records in each table."""

    timings_us: dict[str, float]
    counts: list[int]


async def measure(
    big: PostgresHistory, small: PostgresHistory, totals: tuple[int, int], end_ms: int,
    rounds: int,
) -> QueryResult:  # fmt: skip
    """Median µs of every operation, interleaved round by round."""
    url, event = QUERIED
    window = {"start_ms": end_ms - WEEK_MS + 1, "end_ms": end_ms, "now_ms": end_ms}
    pool = await big.pool()
    rng = random.Random(3)

    async def pk_select() -> Any:
        return await pool.fetchrow(
            "SELECT doc FROM history_attempts WHERE id = $1", rng.randrange(1, totals[0])
        )

    def page(history: PostgresHistory, n: int) -> Op:
        return lambda: history.query("bench", url, event, page=n, page_size=PAGE_SIZE, **window)

    ops: dict[str, Op] = {
        "pk_select": pk_select,
        "page_1": page(big, 1),
        "page_offset_10000": page(big, DEEP_PAGE),
        "small_page_1": page(small, 1),
        "small_page_offset_10000": page(small, DEEP_PAGE),
    }
    counts = []
    for history in (big, small):
        found = await history.query("bench", url, event, page=DEEP_PAGE, page_size=PAGE_SIZE,
                                    **window)  # fmt: skip
        if len(found.records) != PAGE_SIZE:
            raise RuntimeError(f"offset-10,000 page holds {len(found.records)} records")
        counts.append(found.count)
    samples = await interleaved(ops, rounds)
    return QueryResult({name: median_us(values) for name, values in samples.items()}, counts)


async def ship_rate(redis: Redis, settings: Settings, records: int) -> dict[str, float]:
    """`records` XADDed as workers do, then drained by one shipper: records/s stored."""
    await redis.delete(keys.HISTORY_STREAM)
    template = record_template()
    now = now_ms()
    for start in range(0, records, 2_000):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(records, start + 2_000)):
                record = {**template, "id": 10**9 + n, "callBackUrl": PAIRS[n % 1000][0],
                          "events": PAIRS[n % 1000][1], "createdTime": now - records + n,
                          "deliveryId": f"evt_s{n}.1"}  # fmt: skip
                pipe.xadd(keys.HISTORY_STREAM, stream_fields(record, False))  # type: ignore[arg-type]  # redis-py wants a dict of its own unions
            await pipe.execute()
    shipper = Shipper(redis, settings, elect=False)
    await shipper.open()
    try:
        started = time.perf_counter()
        stored = await shipper.drain()
        seconds = time.perf_counter() - started
    finally:
        await shipper.close()
    if stored != records:
        raise RuntimeError(f"shipped {stored} of {records} records")
    left = int(await redis.xlen(keys.HISTORY_STREAM))
    return {"rate": records / seconds, "seconds": seconds, "records": records, "left": left}


async def fill_and_measure(
    redis: Redis, settings: Settings, urls: tuple[str, ...], sizes: tuple[int, int, int],
    rounds: int, ship_records: int,
) -> dict[str, Any]:  # fmt: skip
    """Fill both tables, time the queries, then the shipping (into the big table)."""
    total, hot, small_total = sizes
    end_ms = now_ms()
    big_rate = await fill(urls[0], total, hot, end_ms)
    await fill(urls[1], small_total, 20_000, end_ms)
    big = PostgresHistory(redis, settings.model_copy(update={"history_url": urls[0]}), keys)
    small = PostgresHistory(redis, settings.model_copy(update={"history_url": urls[1]}), keys)
    try:
        queries = await measure(big, small, (total, small_total), end_ms, rounds)
    finally:
        await big.close()
        await small.close()
    shipping = await ship_rate(
        redis, settings.model_copy(update={"history_url": urls[0]}), ship_records
    )
    return {"queries": queries, "shipping": shipping, "fill_rate": big_rate}


async def run(bench: Bench) -> list[Row]:
    """The seed query on a big and a 100,000-record table vs a primary-key SELECT; the
    shipping rate vs a worker's delivery rate with PostgreSQL history (this run's)."""
    assert bench.pg_url is not None
    await bench.worker_block()  # the delivery rate the shipping is measured against
    sizes = bench.sizes
    urls = await create_databases(bench.pg_url, ("big", "small"))
    result = await fill_and_measure(
        bench.r, bench.settings, urls,
        (sizes.history_pg_total, sizes.history_pg_hot, 100_000), sizes.history_rounds,
        sizes.ship_records,
    )  # fmt: skip
    await create_databases(bench.pg_url, ("big", "small"))  # the disk back
    t = result["queries"].timings_us
    hot, small_hot = result["queries"].counts
    total = f"{sizes.history_pg_total:,}"
    details = {
        "timings_us": t,
        "queried_pair_records": [hot, small_hot],
        "fill_rate": result["fill_rate"],
        "page_size": PAGE_SIZE,
    }
    worker_rate = median_run(bench.runs(THROUGHPUT_PG)).rate
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


SCENARIO = Scenario("history-pg", run, worker_runs=(THROUGHPUT_PG,), postgres=True)
