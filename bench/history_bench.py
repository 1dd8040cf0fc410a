"""The history store at scale: fill it fast through `History.record` on pipelines, then
time `History.query` (page 1, and the page at offset 10,000) against one Redis GET, and
against the same query on a store of ~10k records (another database of the same server,
timed in the same rounds)."""

from __future__ import annotations

import asyncio
import inspect
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from bench.common import PROJECT, TOKEN, event_data
from dispatcher import keys
from dispatcher.delivery import encode_body, mask_headers, request_headers
from dispatcher.history import redis as history_module
from dispatcher.history.redis import RedisHistory

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.settings import Settings

EVENTS = ("BUILD_END", "BUILD_START", "BUILD_STAGE_END", "BUILD_TASK_END")
URLS = tuple(f"http://127.0.0.1:9/hook/{i}" for i in range(25))
PAIRS = tuple((url, event) for url in URLS for event in EVENTS)  # 100 (url, event) pairs
QUERIED = PAIRS[0]
QUERIED_RECORDS = 10_020  # the page at offset 10,000 (page 501 of 20) is full
PAGE_SIZE = 20
DEEP_PAGE = 10_000 // PAGE_SIZE + 1
PIPELINE_RECORDS = 2_000
PIPELINES_IN_FLIGHT = 2


def _template() -> dict[str, Any]:
    """A record as the worker writes it (dispatcher/worker.py Engine._record)."""
    body = encode_body("BUILD_END", event_data(1))
    headers = request_headers(
        event="BUILD_END", delivery_id="evt_0.1", body=body, token=TOKEN, user_agent="bench"
    )
    return {
        "projectId": PROJECT,
        "callBackUrl": "",
        "events": "",
        "status": "SUCCESS",
        "errorMsg": None,
        "requestHeaders": mask_headers(headers),
        "requestBody": body.decode(),
        "responseCode": 200,
        "responseBody": "ok",
        "startTime": 0,
        "endTime": 0,
        "createdTime": 0,
        "attempt": 1,
        "deliveryId": "",
        "eventId": "",
        "callbackId": 1,
        "durationMs": 2,
        "final": True,
        "requestBodyTruncated": False,
        "redeliveryOf": None,
    }


async def write_records(redis: Redis, history: Any, records: list[dict[str, Any]]) -> None:
    """`History.record` of every record queued on one pipeline, run in one round trip.
    (Older stores queued a redis-py Script with an awaitable `record`; both work.)"""
    if inspect.iscoroutinefunction(history.record):
        async with redis.pipeline(transaction=False) as pipe:
            for record in records:
                await history.record(pipe, record)
            await pipe.execute()
        return
    from dispatcher.lua import run_pipeline

    def queue(pipe: Pipeline) -> None:
        for record in records:
            history.record(pipe, record)

    await run_pipeline(redis, queue)


def bare_query(redis: Redis, history: Any) -> Callable[[list[str], list[Any]], Awaitable[Any]]:
    """The store's own query script, called without History.query's decoding. Private
    names of dispatcher/history.py: a module-level `Lua` script, or (older) a redis-py
    Script registered on the History object."""
    script = getattr(history_module, "_QUERY", None)
    if script is not None and not isinstance(script, str):
        return lambda keys_, args: script(redis, keys_, args)
    return lambda keys_, args: history._query(keys=keys_, args=args)


class Filler:
    """Writes records through History.record, PIPELINE_RECORDS per pipeline execute."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.history = RedisHistory(redis, settings)
        self.template = _template()
        self.base_ms = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago: in the window
        self.written = 0

    def _record(self, pair: tuple[str, str], n: int) -> dict[str, Any]:
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
        await write_records(self.redis, self.history, records)

    async def fill(self, plan: list[tuple[tuple[str, str], int]]) -> float:
        """Write `count` records for each (pair, count) of `plan`; returns seconds taken."""
        todo = [pair for pair, count in plan for _ in range(count)]
        started = time.perf_counter()
        chunks = [todo[i : i + PIPELINE_RECORDS] for i in range(0, len(todo), PIPELINE_RECORDS)]
        for i in range(0, len(chunks), PIPELINES_IN_FLIGHT):
            await asyncio.gather(*(self._write(c) for c in chunks[i : i + PIPELINES_IN_FLIGHT]))
        return time.perf_counter() - started


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000


async def _timed(op: Callable[[], Awaitable[Any]]) -> int:
    started = time.perf_counter_ns()
    await op()
    return time.perf_counter_ns() - started


async def interleaved(
    ops: dict[str, Callable[[], Awaitable[Any]]], rounds: int
) -> dict[str, list[int]]:
    """Nanoseconds of every op, round by round (after 20 rounds of warm-up), so that all
    of them share the machine's noise."""
    for _ in range(20):
        for op in ops.values():
            await op()
    samples: dict[str, list[int]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            samples[name].append(await _timed(op))
    return samples


def _ops(
    redis: Redis, settings: Settings, now_ms: int, prefix: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """The timed operations on one store: History.query of page 1 and of the page at
    offset 10,000 (records decoded), and the store's bare Lua script for each."""
    history = RedisHistory(redis, settings)
    url, event = QUERIED
    window = {"start_ms": now_ms - 86_400_000, "end_ms": now_ms + 60_000}
    index = keys.history_index(PROJECT, event, url)

    def query(page: int) -> Callable[[], Awaitable[Any]]:
        return lambda: history.query(PROJECT, url, event, page=page, page_size=PAGE_SIZE, **window)

    run_script = bare_query(redis, history)

    def script(page: int) -> Callable[[], Awaitable[Any]]:
        args = [window["start_ms"], window["end_ms"], (page - 1) * PAGE_SIZE, PAGE_SIZE]
        return lambda: run_script([index], [*args, keys.HISTORY_RECORD_PREFIX])

    return {
        f"{prefix}page_1": query(1),
        f"{prefix}page_offset_10000": query(DEEP_PAGE),
        f"{prefix}script_page_1": script(1),
        f"{prefix}script_offset_10000": script(DEEP_PAGE),
    }


async def _check(redis: Redis, settings: Settings, now_ms: int) -> int:
    url, event = QUERIED
    page = await RedisHistory(redis, settings).query(
        PROJECT, url, event, start_ms=now_ms - 86_400_000, end_ms=now_ms + 60_000,
        page=DEEP_PAGE, page_size=PAGE_SIZE,
    )  # fmt: skip
    if len(page.records) != PAGE_SIZE:
        raise RuntimeError(f"offset-10,000 page holds {len(page.records)} records")
    return page.count


async def measure(large: Redis, small: Redis, settings: Settings, rounds: int) -> dict[str, Any]:
    """Median latency (µs) of a GET of a 2 KB value and of every query operation on both
    stores, interleaved round by round so that all of them share the machine's noise."""
    blob_key = "bench:blob"
    await large.set(blob_key, b"x" * 2048)
    now = time.time_ns() // 1_000_000
    ops: dict[str, Callable[[], Awaitable[Any]]] = {"get_2kb": lambda: large.get(blob_key)}
    ops |= _ops(large, settings, now, "")
    ops |= _ops(small, settings, now, "small_")
    counts = [await _check(large, settings, now), await _check(small, settings, now)]
    samples = await interleaved(ops, rounds)
    result: dict[str, Any] = {name: _median_us(values) for name, values in samples.items()}
    result["p90"] = {
        name: round(statistics.quantiles(values, n=10)[-1] / 1000, 1)
        for name, values in samples.items()
    }
    result["queried_pair_records"] = counts
    result["record_bytes"] = len(orjson.dumps(_template()))
    return result


@dataclass
class HistoryResult:
    timings: dict[str, Any]
    small_total: int
    large_total: int
    fill_seconds: float
    fill_rate: float


async def run(
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
