"""`history`: the Redis history store at scale. Fill it fast through `History.record` on
pipelines, then time `History.query` (page 1, and the page at offset 10,000, records
decoded) against one Redis GET of 2 KB, and against the same query on a store of ~10k
records (another database of the same server), all timed in the same rounds."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from bench.common import PROJECT, record_template
from bench.harness import Scenario
from bench.report import Row, ratio_row
from bench.timing import Op, interleaved, median_us
from dispatcher.clock import now_ms
from dispatcher.connections import connect
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from bench.harness import Bench
    from dispatcher.settings import Settings

keys = Keys()  # today's key names (one shard)

EVENTS = ("BUILD_END", "BUILD_START", "BUILD_STAGE_END", "BUILD_TASK_END")
URLS = tuple(f"http://127.0.0.1:9/hook/{i}" for i in range(25))
PAIRS = tuple((url, event) for url in URLS for event in EVENTS)  # 100 (url, event) pairs
QUERIED = PAIRS[0]
QUERIED_RECORDS = 10_020  # the page at offset 10,000 (page 501 of 20) is full
PAGE_SIZE = 20
DEEP_PAGE = 10_000 // PAGE_SIZE + 1
PIPELINE_RECORDS = 2_000
PIPELINES_IN_FLIGHT = 2
DAY_MS = 86_400_000


class Filler:
    """Writes records through History.record, PIPELINE_RECORDS per pipeline execute."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.history = RedisHistory(redis, settings, keys)
        self.template = record_template()
        self.base_ms = now_ms() - 3_600_000  # an hour ago: in the window
        self.written = 0

    def _record(self, pair: tuple[str, str], n: int) -> AttemptRecord:
        created = self.base_ms + n // 10
        return {
            **self.template,
            "callBackUrl": pair[0],
            "events": pair[1],
            "startTime": created - 2,
            "endTime": created,
            "createdTime": created,
            "deliveryId": f"evt_{n}.1",
            "eventId": f"evt_{n}",
        }

    async def _write(self, pairs: list[tuple[str, str]]) -> None:
        records = [self._record(pair, self.written + i) for i, pair in enumerate(pairs)]
        self.written += len(records)
        await self.history.assign_ids(records)  # the store takes records with their ids

        def queue(pipe: Pipeline) -> None:
            for record in records:
                self.history.record(pipe, record)

        await run_pipeline(self.redis, queue)

    async def fill(self, plan: list[tuple[tuple[str, str], int]]) -> float:
        """Write `count` records for each (pair, count) of `plan`; returns seconds taken."""
        todo = [pair for pair, count in plan for _ in range(count)]
        started = time.perf_counter()
        chunks = [todo[i : i + PIPELINE_RECORDS] for i in range(0, len(todo), PIPELINE_RECORDS)]
        for i in range(0, len(chunks), PIPELINES_IN_FLIGHT):
            await asyncio.gather(*(self._write(c) for c in chunks[i : i + PIPELINES_IN_FLIGHT]))
        return time.perf_counter() - started


def _window(now_ms: int) -> dict[str, int]:
    return {"start_ms": now_ms - DAY_MS, "end_ms": now_ms + 60_000}


def _ops(redis: Redis, settings: Settings, now_ms: int, prefix: str) -> dict[str, Op]:
    """The timed operations on one store: History.query of page 1 and of the page at
    offset 10,000 (records decoded)."""
    history = RedisHistory(redis, settings, keys)
    url, event = QUERIED

    def query(page: int) -> Op:
        return lambda: history.query(
            PROJECT, url, event, page=page, page_size=PAGE_SIZE, **_window(now_ms)
        )

    return {f"{prefix}page_1": query(1), f"{prefix}page_offset_10000": query(DEEP_PAGE)}


async def _check(redis: Redis, settings: Settings, now_ms: int) -> int:
    """The queried pair's record count; raises unless the deep page is full."""
    url, event = QUERIED
    page = await RedisHistory(redis, settings, keys).query(
        PROJECT, url, event, page=DEEP_PAGE, page_size=PAGE_SIZE, **_window(now_ms)
    )
    if len(page.records) != PAGE_SIZE:
        raise RuntimeError(f"offset-10,000 page holds {len(page.records)} records")
    return page.count


async def measure(large: Redis, small: Redis, settings: Settings, rounds: int) -> dict[str, Any]:
    """Median latency (µs) of a GET of a 2 KB value and of every query operation on both
    stores, interleaved round by round so that all of them share the machine's noise."""
    blob_key = "bench:blob"
    await large.set(blob_key, b"x" * 2048)
    now = now_ms()
    ops: dict[str, Op] = {"get_2kb": lambda: large.get(blob_key)}
    ops |= _ops(large, settings, now, "")
    ops |= _ops(small, settings, now, "small_")
    counts = [await _check(large, settings, now), await _check(small, settings, now)]
    samples = await interleaved(ops, rounds)
    result: dict[str, Any] = {name: median_us(values) for name, values in samples.items()}
    result["p90"] = {
        name: round(statistics.quantiles(values, n=10)[-1] / 1000, 1)
        for name, values in samples.items()
    }
    result["queried_pair_records"] = counts
    result["record_bytes"] = len(orjson.dumps(record_template()))
    return result


@dataclass
class HistoryResult:
    """The timings (µs, see `measure`) and how the stores were filled."""

    timings: dict[str, Any]
    small_total: int
    large_total: int
    fill_seconds: float
    fill_rate: float


async def fill_and_measure(
    large: Redis, small: Redis, settings: Settings, total: int, rounds: int
) -> HistoryResult:
    """Two stores in two Redis databases of one server: `small` with ~10k records (the
    queried pair's 10,020 and 10 for each other pair), `large` with the same plus more for
    the other pairs, up to `total`. Both are timed in the same rounds."""
    await large.flushdb()
    await small.flushdb()
    others = PAIRS[1:]
    small_plan = [(QUERIED, QUERIED_RECORDS)] + [(pair, 10) for pair in others]
    small_filler = Filler(small, settings)
    seconds = await small_filler.fill(small_plan)
    large_filler = Filler(large, settings)
    seconds += await large_filler.fill(small_plan)
    per_pair, extra = divmod(total - large_filler.written, len(others))
    large_plan = [(pair, per_pair + (1 if i < extra else 0)) for i, pair in enumerate(others)]
    seconds += await large_filler.fill(large_plan)
    await asyncio.sleep(1.0)  # let Redis finish rehashing its grown keyspace
    timings = await measure(large, small, settings, rounds)
    written = small_filler.written + large_filler.written
    return HistoryResult(
        timings=timings,
        small_total=small_filler.written,
        large_total=large_filler.written,
        fill_seconds=seconds,
        fill_rate=written / seconds,
    )


async def run(bench: Bench) -> list[Row]:
    small = connect(bench.settings, bench.url.rsplit("/", 1)[0] + "/1")
    try:
        result = await fill_and_measure(
            bench.r, small, bench.settings, bench.sizes.history_total, bench.sizes.history_rounds
        )
        await small.flushdb()
    finally:
        await small.aclose()
    await bench.r.flushdb()
    t = result.timings
    total, few = f"{result.large_total:,}", f"{result.small_total:,}"
    details = {
        "timings_us": t, "small_total": result.small_total,
        "large_total": result.large_total, "fill_rate": result.fill_rate,
        "page_size": PAGE_SIZE,
    }  # fmt: skip
    return [
        ratio_row(
            "history query", f"query page 1, {total} records", t["page_1"], "µs",
            "Redis GET of 2 KB", t["get_2kb"], maximum=5.0, details=details,
        ),
        ratio_row(
            "history query", f"query at offset 10,000, {total} records",
            t["page_offset_10000"], "µs", "Redis GET of 2 KB", t["get_2kb"], maximum=5.0,
        ),
        ratio_row(
            "history scale", f"query page 1, {total} records", t["page_1"], "µs",
            f"same at {few} records", t["small_page_1"], maximum=1.5,
        ),
        ratio_row(
            "history scale", f"query at offset 10,000, {total} records",
            t["page_offset_10000"], "µs", f"same at {few} records",
            t["small_page_offset_10000"], maximum=1.5,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("history", run)
