"""What the status page, `dispatcher status` and the metrics read of the fleet, on a real
Redis: the workers' attempt statistics (a minute and a 10-minute resolution, each with its
TTL), the index of live workers, and the fleet's gauges at `/metrics`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_py
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher import metrics
from dispatcher.api import create_app
from dispatcher.clock import now_ms
from dispatcher.connections import REDIS_ERRORS, connect
from dispatcher.delivery import Outcome, send
from dispatcher.egress import Client
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards import gauges
from dispatcher.shards.router import Router
from dispatcher.stats import DAY, HOUR, RESEND_WITHIN_S, AttemptStats, add_counts, read_series
from dispatcher.status import count_live_workers, live_workers, write_heartbeat
from dispatcher.worker import duties as duties_module
from dispatcher.worker.duties import Counts, Duties
from tests.helpers import Receiver, RunWorker, app_client, make_settings, until

keys = Keys()  # today's key names (one shard)


def gauge(text: str, name: str) -> float:
    values = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, f"{name} not exported once"
    return float(values[0])


async def away_from_a_minute_boundary() -> None:
    """So that what a test counts lands in the minute it then reads."""
    second = time.time() % 60
    if second > 58.5:
        await asyncio.sleep(60.05 - second)


async def test_attempt_counts_reach_the_hour_and_the_day_with_their_ttls(redis: Redis) -> None:
    await away_from_a_minute_boundary()
    stats = AttemptStats()
    for outcome, ms in [("success", 12)] * 4 + [("failed", 700)]:
        stats.count(outcome, ms)
    await stats.flush(redis, keys)
    now = now_ms()
    minute, slot = now // 60_000, now // 600_000
    expected = {b"success": b"4", b"failed": b"1", b"ms:15": b"4", b"ms:700": b"1"}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.stats(minute))
        pipe.hgetall(keys.stats_slot(600, slot))
        assert await pipe.execute() == [expected, expected]
    assert 7000 < await redis.ttl(keys.stats(minute)) <= HOUR.ttl_s
    assert 24 * 3600 < await redis.ttl(keys.stats_slot(600, slot)) <= DAY.ttl_s

    stats.count("success", 12)  # a second flush adds to the same buckets
    await stats.flush(redis, keys)
    await stats.flush(redis, keys)  # nothing new: nothing written
    hour, day = await read_series(redis, keys, now)
    assert len(hour.points) == 60 and len(day.points) == 144
    for found in (hour, day):
        assert found.points[-1].outcomes == {"success": 5, "failed": 1} == found.totals
        assert found.p50_ms is not None and 10 < found.p50_ms <= 15


async def test_statistics_survive_a_flush_that_fails(redis: Redis) -> None:
    await away_from_a_minute_boundary()
    stats = AttemptStats()
    stats.count("retry", 5)
    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    with pytest.raises(REDIS_ERRORS):
        await stats.flush(nowhere, keys)
    await nowhere.aclose()
    await stats.flush(redis, keys)
    (hour,) = await read_series(redis, keys, now_ms(), [HOUR])
    assert hour.totals == {"retry": 1}


async def test_a_flush_that_ran_though_it_failed_is_not_counted_twice(tmp_path: Path) -> None:
    """A flush sent to a paused Redis times out (its counts kept for the next flush), and
    Redis runs it once it resumes; redis-py also sends a pipeline again when its answer
    timed out, and both run. Each flush's token, which Redis keeps a while, makes the next
    add nothing of it again (it counted 2 for 1)."""
    await away_from_a_minute_boundary()
    server = EmbeddedRedis(tmp_path, persist=False)
    redis = connect(make_settings(server.start(), redis_timeout=0.3))  # retries, timeouts
    try:
        stats = AttemptStats()
        stats.count("retry", 5)
        await stats.flush(redis, keys)  # a connection in the pool; the script loaded
        stats.count("success", 12)
        hour = keys.stats(now_ms() // 60_000)  # the minute it is counted in
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(REDIS_ERRORS):
                await stats.flush(redis, keys)
        finally:
            os.kill(server.pid, signal.SIGCONT)

        async def ran() -> bool:
            return await redis.hget(hour, "success") is not None  # type: ignore[misc]

        await until(ran, 10, "the paused flush run once Redis resumed")
        await stats.flush(redis, keys)
        assert await redis.hget(hour, "success") == b"1"  # type: ignore[misc]
        assert stats.unsent == []
    finally:
        await redis.aclose()
        server.stop()


async def test_a_flush_unconfirmed_past_the_marks_life_is_given_up_not_sent_twice(
    redis: Redis,
) -> None:
    """A flush whose answer never came is sent again with the next, and its mark makes
    that add nothing twice; but the mark lasts `FLUSH_MARK_S`. One unconfirmed for longer
    (Redis away 10 minutes) is given up, on record: sent again once its mark was gone, it
    counted 2 for 1 (review). Within the time it is sent again and counted once."""
    await away_from_a_minute_boundary()
    clock = [1000.0]
    stats = AttemptStats(clock=lambda: clock[0])
    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    minute = keys.stats(now_ms() // 60_000)
    stats.count("success", 12)
    with pytest.raises(REDIS_ERRORS):
        await stats.flush(nowhere, keys)  # it may have run: its answer never came
    # it did run: its mark is set and its counts added (as a paused Redis would have)
    token, counts, _ = stats.unsent[0]
    await add_counts(keys, token, counts).run(redis)
    assert await redis.hget(minute, "success") == b"1"  # type: ignore[misc]
    await redis.delete(keys.stats_flush(token))  # ... and its mark has lapsed since
    clock[0] += RESEND_WITHIN_S
    with capture_logs() as said:
        await stats.flush(redis, keys)
    assert await redis.hget(minute, "success") == b"1"  # type: ignore[misc]
    assert stats.unsent == []
    given_up = [e for e in said if e["event"] == "stats.flush_given_up"]
    assert [(e["flushes"], e["attempts"]) for e in given_up] == [(1, 1)]
    stats.count("failed", 700)  # a flush unconfirmed for less is sent again
    with pytest.raises(REDIS_ERRORS):
        await stats.flush(nowhere, keys)
    clock[0] += RESEND_WITHIN_S - 1
    await stats.flush(redis, keys)
    assert await redis.hget(minute, "failed") == b"1"  # type: ignore[misc]
    await nowhere.aclose()


async def beat(redis: Redis, host: str, pid: int, ago_ms: int = 0) -> None:
    """A heartbeat of worker `host`/`pid`, its index entry moved `ago_ms` into the past."""
    key = keys.worker(host, pid)
    await run_pipeline(
        redis, lambda pipe: write_heartbeat(pipe, keys, key, {"host": host, "pid": pid})
    )
    if ago_ms:
        score = await redis.zscore(keys.WORKERS_LIVE, key)
        assert score is not None
        await redis.zadd(keys.WORKERS_LIVE, {key: score - ago_ms})


async def test_live_workers_come_from_the_heartbeat_index(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beat(redis, "a", 1)
    await beat(redis, "b", 2, ago_ms=45_000)  # its key outlived its TTL here; the index names it
    assert [w["pid"] for w in await live_workers(redis, keys)] == [1]
    assert await count_live_workers(redis, keys) == 1
    assert await live_workers(redis, keys, "b") == []

    # a real worker's duties, its host's clock 10 minutes behind (the index is scored by
    # Redis's: review): a beat, then gone with its last words
    monkeypatch.setattr(duties_module, "now_ms", lambda: now_ms() - 600_000)
    home = Services(settings, redis)
    duties = Duties(settings, home, [home], AttemptStats(), "t", lambda: Counts(0, 0, 0))
    await duties.heartbeat()
    assert await count_live_workers(redis, keys) == 2
    # what the worker's own /metrics says of the fleet and of itself
    assert REGISTRY.get_sample_value("dispatcher_workers_live") == 2
    assert REGISTRY.get_sample_value("dispatcher_redis_up") == 1
    beat_s = REGISTRY.get_sample_value("dispatcher_worker_heartbeat_timestamp_seconds")
    assert beat_s is not None and abs(beat_s - (time.time() - 600)) < 5
    await duties.last_words()
    assert await count_live_workers(redis, keys) == 1
    assert await redis.zscore(keys.WORKERS_LIVE, duties.heartbeat_key) is None
    # the index forgets a worker that never said goodbye an hour later
    await beat(redis, "c", 3)
    await beat(redis, "d", 4, ago_ms=3_600_001)
    await beat(redis, "e", 5)  # its beat drops what is older than an hour
    assert sorted(await redis.zrange(keys.WORKERS_LIVE, 0, -1)) == [
        keys.worker(h, p).encode() for h, p in (("a", 1), ("b", 2), ("c", 3), ("e", 5))
    ]


async def test_the_fullest_redis_is_measured_alone_not_in_the_fleets_sum(
    settings: Settings, tmp_path: Path
) -> None:
    """Two shards: one with a limit twice its use, one with a limit far above it. The fullest
    is ~0.5; the fleet's sums (what the alert divided) read ~0 and never fired. A third
    shard between them does not answer: the others' gauges are set all the same, and
    `dispatcher_redis_up` is 0 (one shard away froze every gauge: review)."""
    with (
        EmbeddedRedis(tmp_path / "a", persist=False) as roomy,
        EmbeddedRedis(tmp_path / "b", persist=False) as tight,
    ):
        for server, limit in ((roomy, lambda used: 100 * 2**30), (tight, lambda used: 2 * used)):
            node = redis_py.Redis.from_url(server.url)
            used = int(node.info("memory")["used_memory"])  # type: ignore[index]  # sync|async
            node.config_set("maxmemory", limit(used))
            node.close()
        shards = [roomy.url, "redis://127.0.0.1:1/0", tight.url]
        sharded = settings.model_copy(
            update={"redis_url": roomy.url, "redis_shards": shards, "redis_timeout": 0.5}
        )
        metrics.REDIS_FULLEST.set(-1)  # what a scrape that sets nothing would leave
        app = create_app(sharded)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
                text = (await client.get("/metrics")).text
    summed = gauge(text, "dispatcher_redis_used_memory_bytes") / gauge(
        text, "dispatcher_redis_maxmemory_bytes"
    )
    assert summed < 0.01
    assert 0.3 < gauge(text, "dispatcher_redis_memory_fullest_ratio") < 0.8
    assert gauge(text, "dispatcher_redis_up") == 0


async def test_metrics_carry_the_fleets_gauges_and_answer_without_redis(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    text = (await api.get("/metrics")).text
    assert gauge(text, "dispatcher_redis_up") == 1
    assert gauge(text, "dispatcher_workers_live") == 0
    assert gauge(text, "dispatcher_redis_used_memory_bytes") > 100_000
    assert gauge(text, "dispatcher_redis_maxmemory_bytes") >= 0

    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    async with app_client(settings, nowhere) as down:
        answer = await down.get("/metrics")
        assert answer.status_code == 200 and gauge(answer.text, "dispatcher_redis_up") == 0
    await nowhere.aclose()


async def test_attempts_that_sent_nothing_stay_out_of_the_attempt_times(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A project whose callbacks its region's policy refuses makes attempts that send
    nothing, in no time: they count as attempts, never in the fleet's attempt times (the
    status page's percentiles and `dispatcher_delivery_attempt_seconds`), which are the
    HTTP exchanges' (review: 20 such attempts made the fleet's p50 0.6 ms, against 200)."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(text="ok")

    registry = Registry(redis)
    await registry.create("victim", receiver.script("/slow", slow), "BUILD_END", Region.DEVNET, "t")
    await registry.create("hostile", receiver.url("/refused"), "BUILD_END", Region.OSS, "t")
    producer = Producer(settings, redis)
    for i in range(5):
        await producer.emit("victim", "BUILD_END", {"buildId": f"v{i}"})
    for i in range(20):
        await producer.emit("hostile", "BUILD_END", {"buildId": f"h{i}"})
    timed_before = _attempt_seconds_count()
    worker = make_settings(
        settings.redis_url or "", allow_internal_regions=["DEVNET"], retry_schedule=()
    )
    await run_worker(worker)
    assert [r.path for r in receiver.seen].count("/slow") == 5
    assert "/refused" not in [r.path for r in receiver.seen]
    (hour,) = await read_series(redis, keys, now_ms(), [HOUR])
    assert hour.totals == {"success": 5, "failed": 20}  # every attempt counted
    assert hour.p50_ms is not None and hour.p50_ms >= 150, hour.p50_ms  # only the exchanges'
    assert _attempt_seconds_count() - timed_before == 5


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("http://localhost:8080/h", False),  # refused by the policy once resolved
        ("http://no-such-host.invalid/h", False),  # its name does not resolve
        ("ftp://h.example/h", False),  # a URL the client never sends
        ("http://127.0.0.1:1/h", True),  # a connection tried, and refused: an exchange
    ],
)
async def test_what_the_client_itself_never_sent_is_not_sent(url: str, sent: bool) -> None:
    """The policy's resolver, the name lookup and the client's URL checks fail an attempt
    before any connection, inside the client: those attempts sent nothing either (they
    came back as sent, and counted in the attempt times; review)."""
    internal = ["DEVNET"] if sent else []
    client = Client(make_settings("redis://127.0.0.1:1/0", allow_internal_regions=internal),
                    Region.DEVNET)  # fmt: skip
    try:
        result = await send(client, url, b"{}", {}, connect_timeout=2, total_timeout=5,
                            max_response_body=100)  # fmt: skip
    finally:
        await client.aclose()
    assert result.outcome is not Outcome.SUCCESS and result.status_code is None
    assert result.sent is sent, result.error


def _attempt_seconds_count() -> float:
    value = REGISTRY.get_sample_value("dispatcher_delivery_attempt_seconds_count")
    return value or 0.0


async def test_a_scrape_asks_every_shard_and_server_at_once(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/metrics`' reads of the fleet (each shard's queue, lanes and backlog; each server's
    memory; the home shard's workers and lateness) all start before the first one gives up
    at the Redis timeout: a frozen Redis costs a scrape one timeout. They went one after
    another, each within the timeout: 10 s with one Redis, Prometheus's own scrape timeout,
    so the scrape failed and `dispatcher_redis_up` went stale (review)."""
    began: list[str] = []
    at_first_give_up: list[int] = []

    async def hung(name: str) -> None:
        began.append(name)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            at_first_give_up.append(len(began))
            raise

    monkeypatch.setattr(gauges, "_shard", lambda services: hung("shard"))
    monkeypatch.setattr(gauges, "_memory", lambda services: hung("memory"))
    monkeypatch.setattr(gauges, "_home", lambda redis, keys: hung("home"))
    async with Router.open(settings.model_copy(update={"redis_timeout": 0.2}), redis) as router:
        with pytest.raises(TimeoutError):
            await gauges.fleet_gauges(router)
    assert sorted(began) == ["home", "memory", "shard"]
    assert at_first_give_up[0] == 3, at_first_give_up  # every read under way by then
