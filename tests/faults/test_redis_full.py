"""A full Redis (`maxmemory`, `noeviction`) is an outage, not a bug: a private redis-server
given little memory fills up under load, then is given more (`CONFIG SET maxmemory`)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import Unavailable
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, app_client, make_settings, start_worker, until
from tests.helpers import all_records as records_of

keys = Keys()  # today's key names (one shard)

MAX_EVENTS = 5000
BATCH = 50
HEADROOM = 1_000_000  # bytes above what Redis holds before the load: some hundred records


@pytest.fixture
async def small_redis(tmp_path: Path) -> AsyncIterator[tuple[Settings, Redis]]:
    """A private redis-server (noeviction, Redis's default policy) and a pool on it."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False)
    server.start()
    settings = make_settings(server.url, emit_wait=1)
    redis = connect(settings)
    try:
        yield settings, redis
    finally:
        await redis.aclose()
        server.stop()


async def fill(redis: Redis, headroom: int) -> None:
    """Give Redis `headroom` bytes beyond what it holds now."""
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used + headroom)


async def test_a_full_redis_is_waited_out_and_every_delivery_keeps_its_record(
    small_redis: tuple[Settings, Redis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Two workers, and a producer emitting events (two deliveries each) into a Redis with
    room for a few hundred records until it is full. The producer is told Redis is full
    and emits the same ids again; the workers' writes wait; once Redis gets memory back,
    every delivery ends with one SUCCESS record and reached its receiver once."""
    settings, redis = small_redis
    urls = [receiver.url("/a"), receiver.url("/b")]
    for url in urls:
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    log = tmp_path / "workers.log"
    workers += [start_worker(settings.redis_url or "", log) for _ in range(2)]

    async def both_alive() -> bool:
        return len(await redis.keys(keys.WORKERS_PREFIX + "*")) == 2

    await until(both_alive, 20, "two workers up")
    await fill(redis, HEADROOM)
    producer = Producer(settings, redis)
    refusals: list[str] = []
    full_since: float | None = None
    emitted = 0
    while emitted < MAX_EVENTS and not (refusals and full_since is None):
        batch = [("demo", "BUILD_END", {"n": n}, f"e-{n}") for n in range(emitted, emitted + BATCH)]
        try:
            await producer.emit_many(batch)
            emitted += BATCH
            continue
        except Unavailable as exc:  # what a careful producer does: the same ids, later
            refusals.append(str(exc))
        full_since = full_since or time.monotonic()
        text = log.read_text()
        if ('"redis_full":true' in text and "writes_waiting" in text) or (
            time.monotonic() - full_since > 20
        ):
            await redis.config_set("maxmemory", 0)  # the operator makes room
            full_since = None
    info = await redis.info("memory")
    assert refusals, (emitted, info["used_memory"], info["maxmemory"])
    assert all("Redis is full" in r and "same event ids is safe" in r for r in refusals)
    stuck = log.read_text()
    assert "writes_waiting" in stuck and '"redis_full":true' in stuck, stuck[-2000:]
    total = 2 * emitted

    async def all_recorded() -> bool:
        return sum([len(await records_of(redis, settings, url)) for url in urls]) >= total

    await until(all_recorded, 60, "a record for every delivery")
    await asyncio.sleep(0.5)  # anything sent twice would arrive by now
    sent = Counter(s.headers["webhook-id"] for s in receiver.seen)
    assert len(sent) == total and max(sent.values()) == 1, sent.most_common(3)
    for url in urls:
        found = await records_of(redis, settings, url)
        assert len(found) == emitted and {r.status.value for r in found} == {"SUCCESS"}
        assert {r.delivery_id for r in found} == {
            s.headers["webhook-id"] for s in receiver.seen if s.path == url[-2:]
        }
    assert all(w.poll() is None for w in workers), log.read_text()[-3000:]
    text = log.read_text()
    for symptom in ("never retrieved", "write_refused", "Traceback", "job.dropped"):
        assert symptom not in text, text[text.find(symptom) - 1500 :][:3000]


async def test_producers_and_the_emit_routes_say_redis_is_full(
    small_redis: tuple[Settings, Redis],
) -> None:
    """503 in the envelope from both emit routes and the callback routes, `Unavailable`
    from Python, each saying Redis is full; the same ids again once there is room."""
    settings, redis = small_redis
    await fill(redis, 200_000)
    n = 0
    while True:  # fill it up
        try:
            await redis.set(f"ballast:{n}", b"x" * 10_000)
        except Exception:
            break
        n += 1
    events = "/apigw/v4/projects/demo/events"
    async with app_client(settings, redis) as api:
        single = await api.post(events, json={"event": "BUILD_END", "eventId": "f-1"}, headers=UID)
        batch = await api.post(f"{events}/batch", json=[{"event": "BUILD_END"}], headers=UID)
        callback = await api.post(
            "/apigw/v4/projects/demo/callbacks",
            params={"event": "BUILD_END", "url": "http://127.0.0.1:9/h", "region": "DEVNET"},
            headers=UID,
        )
        for response in (single, batch, callback):
            assert response.status_code == 503, response.text
            body = response.json()
            assert (body["status"], body["data"]) == (503, None)
            assert "Redis" in body["message"] and "full" in body["message"], body
        assert "same event ids is safe" in single.json()["message"]
        with pytest.raises(Unavailable, match=r"Redis is full .* same event ids is safe"):
            await Producer(settings, redis).emit("demo", "BUILD_END", {}, event_id="f-2")
        await redis.config_set("maxmemory", 0)
        again = await api.post(events, json={"event": "BUILD_END", "eventId": "f-1"}, headers=UID)
        assert again.json()["data"] == {"eventId": "f-1", "queued": True}
    assert await redis.zrange(settings.queue_name, 0, -1) == [b"demo:f-1"]
