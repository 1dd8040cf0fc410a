"""The history backlog's byte bound (PostgreSQL history) with a real worker, a real
receiver and a real PostgreSQL: past it the worker stops claiming, and it resumes once
the records are shipped, nothing lost (`dispatcher/worker/backlog_bytes.py`). In the
fault tier: it waits out a worker held back for seconds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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
from dispatcher.worker import Worker, backlog_bytes, create_worker
from tests.helpers import Receiver, hang, make_settings, ship_all, until

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
