"""The history backlog's byte bound (PostgreSQL history) with a real worker, a real
receiver and a real PostgreSQL: past it the worker stops claiming, and it resumes once
the records are shipped, nothing lost (`dispatcher/worker/backlog_bytes.py`); an idle
worker checks it seldom, and still stops at once when it starts work past the bound
(`dispatcher/worker/shipping.py`). In the fault tier: it waits out a worker held back for
seconds, and idle ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history import open_history
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.worker import Worker, backlog_bytes, create_worker, shipping
from tests.helpers import Receiver, hang, make_settings, ship_all, until
from tests.service.test_history_postgres import record

keys = Keys()  # today's key names (one shard)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker running (not in burst mode) for the block, then stopped and closed."""
    worker = create_worker(settings, poll_delay=0.01, handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
        await worker.close()


async def shipped_until_delivered(
    settings: Settings, redis: Redis, receiver: Receiver, count: int, *, within: float
) -> None:
    """Ship the records until the receiver has `count` requests (the worker resumed)."""

    async def everything_delivered() -> bool:
        await ship_all(settings, redis)
        return len(receiver.requests()) == count

    await until(everything_delivered, within, "the worker resumed once the records were shipped")


async def stored(settings: Settings, redis: Redis, url: str) -> int:
    """demo's BUILD_END records to `url` of the last minute, once all are shipped."""
    await ship_all(settings, redis)
    history = open_history(settings, redis, keys)
    now = now_ms()
    page = await history.query("demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    await history.close()
    return page.count


async def test_past_a_byte_bound_workers_wait_whatever_the_records_count(
    redis_server: EmbeddedRedis,
    pg_url: str,
    redis: Redis,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backlog bound counted records: 1,000,000 of ~1.3 KB, but a record of a big body
    of backslashes and a 20 KB answer of quotes takes ~130 KB on the stream, so one
    tenant's records filled Redis long before the count (every project's emits refused
    then: review). Shipping off, a bound of 2 MB (a share of maxmemory; this Redis has
    none): the worker stops claiming once the stream holds it, overshooting by what was
    under way (two jobs at a time, each answered after 0.25 s), and resumes, losing
    nothing, once the records are shipped."""
    monkeypatch.setattr(backlog_bytes, "NO_MAXMEMORY_BYTES", 2_000_000)
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False,
                             worker_max_jobs=2)  # fmt: skip

    async def big_and_slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.25)
        return web.Response(text='"' * 10_000)

    url = receiver.script("/hook", big_and_slow)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    events = [("demo", "BUILD_END", {"x": "\\" * 30_000, "n": i}) for i in range(40)]
    await Producer(settings, redis).emit_many(events)
    async with running_worker(settings) as worker:

        async def stopped_or_done() -> bool:
            return worker.shipping.full or len(receiver.requests()) == 40

        await until(stopped_or_done, 60, "the worker stopped claiming or delivered everything")
        await asyncio.sleep(2)  # what was under way is written, the bound checked again
        held, count = (
            await redis.memory_usage(keys.HISTORY_STREAM, samples=0),
            await redis.xlen(keys.HISTORY_STREAM),
        )
        assert worker.shipping.full and count < 40, (held, count)
        assert held < 2_000_000 + 12 * held // count, (held, count)  # a second's and two more
        await shipped_until_delivered(settings, redis, receiver, 40, within=60)
    assert await stored(settings, redis, url) == 40


async def test_past_the_backlog_limit_workers_wait_and_nothing_is_lost(
    redis_server: EmbeddedRedis, pg_url: str, redis: Redis, receiver: Receiver
) -> None:
    """Shipping off, a limit of 5 waiting records: the worker stops claiming once the
    backlog reaches it, and resumes, losing nothing, once the records are shipped."""
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False,
                             history_backlog_limit=5, worker_max_jobs=2)  # fmt: skip
    url = receiver.script("/hook", hang(0.1))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(20)])
    async with running_worker(settings) as worker:
        await receiver.wait_for(6, within=10)
        await asyncio.sleep(1.5)  # 20 deliveries take 1 s at this pace, unpaused
        assert worker.shipping.full and len(receiver.requests()) < 20
        assert await redis.zcard(settings.queue_name) > 0  # the rest waits in the queue
        await shipped_until_delivered(settings, redis, receiver, 20, within=30)
    assert await stored(settings, redis, url) == 20


@contextlib.asynccontextmanager
async def monitored(url: str) -> AsyncIterator[Callable[[], list[str]]]:
    """The commands Redis runs during the block (MONITOR), those of the history backlog's
    check: naming the history stream's keys, or INFO and MEMORY."""
    seen: list[str] = []
    client = Redis.from_url(url)
    async with client.monitor() as monitor:

        async def listen() -> None:
            async for command in monitor.listen():
                said = str(command["command"])
                if keys.HISTORY_STREAM in said or said.split()[0] in ("INFO", "MEMORY"):
                    seen.append(said)

        listening = asyncio.create_task(listen())
        try:
            yield lambda: list(seen)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
    await client.aclose()


async def test_an_idle_worker_reads_its_backlog_seldom(
    redis_server: EmbeddedRedis, pg_url: str, redis: Redis
) -> None:
    """Every worker read the backlog every second, idle or not: XLEN and XRANGE, the
    bytes' GET, INFO memory, and the walk (SET NX, MEMORY USAGE, SET, DEL) each time the
    fleet's 1 s read had lapsed: 8 commands a second per worker and shard, for an empty
    stream (review). An empty stream is no byte read now, and an idle worker's checks come
    twice as far apart each time, up to 8 s: over 8 s of a worker idle for 8 s, one or
    two checks' XLEN and XRANGE (and a check there is: the watch goes on)."""
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False)
    async with running_worker(settings):
        await asyncio.sleep(8)  # idle long enough to wait its longest (1 + 2 + 4 s)
        async with monitored(redis_server.url) as seen:
            await asyncio.sleep(8)
            commands = seen()
    assert len(commands) <= 4, commands
    assert all(c.split()[0] in ("XLEN", "XRANGE") for c in commands), commands
    assert any(c.split()[0] == "XLEN" for c in commands), commands


async def test_a_worker_idle_for_long_stops_at_the_bound_once_it_starts_work(
    redis_server: EmbeddedRedis, pg_url: str, redis: Redis, receiver: Receiver
) -> None:
    """A worker idle long enough to check every 8 s, while another's records fill the
    backlog to its limit (5), then 20 events come: its answer may be 8 s old, so its claim
    takes one job, whose start wakes the check, and its next claim waits for that check's
    answer: it stops there, having sent at most that one delivery. Its first claim took
    as many as it had room for (200 by default): all 20 events, each answered after 0.5 s,
    delivered past the bound (review). Once the records are shipped it resumes, nothing
    lost."""
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False,
                             history_backlog_limit=5)  # fmt: skip
    url = receiver.script("/hook", hang(0.5))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    async with running_worker(settings) as worker:

        async def waits_longest() -> bool:
            return worker.shipping.wait == shipping.BACKLOG_IDLE_MAX_S

        await until(waits_longest, 30, "the idle worker checks its backlog every 8 s")
        history = open_history(settings, redis, keys)
        for n in range(5):  # another worker's records, PostgreSQL away
            await history.add(record(now_ms() - 100, n))
        await history.close()
        await Producer(settings, redis).emit_many(
            [("demo", "BUILD_END", {"n": i}) for i in range(20)]
        )

        async def stopped_or_done() -> bool:
            return worker.shipping.full or len(receiver.requests()) == 20

        await until(stopped_or_done, 30, "the worker stopped claiming or delivered everything")
        assert worker.shipping.full and len(receiver.requests()) <= 1, receiver.requests()
        await shipped_until_delivered(settings, redis, receiver, 20, within=30)
    assert await stored(settings, redis, url) == 20
