"""A worker keeps the chunks of callbacks it matched, under the registry version its claim
read (`registry.matches.Matches`): every write that changes what the match reads bumps the
version, so the very next event sees the change, while an unchanged registry is not read
again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.registry.copies import queue_put
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import create_worker
from dispatcher.worker.claims import Claims
from tests.helpers import Receiver, answer, until

keys = Keys()  # today's key names (one shard)
TOKEN_HEADER = "X-DEVOPS-WEBHOOK-TOKEN"


async def version(redis: Redis, project: str = "demo") -> int:
    return int(await redis.get(keys.registry_version(project)) or 0)


async def test_every_write_the_match_reads_bumps_its_projects_version(
    settings: Settings, redis: Redis
) -> None:
    services = Services(settings, redis)
    registry, health = services.registry, services.health
    seen = [await version(redis)]

    async def bumped(change: Awaitable[object], project: str = "demo") -> None:
        await change
        now = await version(redis, project)
        assert now > seen[-1], f"no bump: {seen[-1]} -> {now}"
        seen.append(now)

    cid, _ = await registry.create("demo", "https://example.com/a", Event.BUILD_END, Region.OSS)
    seen.append(await version(redis))
    assert seen[-1] > 0
    await bumped(registry.create("demo", "https://example.com/a", Event.BUILD_END, Region.OSS,
                                 "new"))  # fmt: skip
    await bumped(registry.rotate_secret(cid, "demo", "newer", 60))
    await bumped(health.failed(cid, "HTTP 500"))  # its `failing` mark set
    await health.failed(cid, "HTTP 500")  # no change of what the match reads: no bump
    assert await version(redis) == seen[-1]
    await bumped(run_pipeline(redis, lambda pipe: health.succeeded(pipe, cid)))  # mark reset
    await run_pipeline(redis, lambda pipe: health.succeeded(pipe, cid))
    assert await version(redis) == seen[-1]
    await bumped(registry.set_enabled(cid, False, "test"))
    await bumped(registry.set_enabled(cid, True))
    row = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.callback(cid))).items()}  # type: ignore[misc]  # sync|async
    await bumped(run_pipeline(redis, lambda pipe: queue_put(registry, pipe, row, reset=True)))
    piped, _ = await registry.create("demo", "https://example.com/p", Event.BUILD_END,
                                     Region.OSS, pipeline_id="p1")  # fmt: skip
    seen.append(await version(redis))
    await bumped(registry.delete("demo", piped, pipeline_id="p1"))  # a pipeline's: the project's
    await bumped(registry.delete("demo", cid))
    assert await version(redis, "other") == 0  # another project's writes bump its own
    await registry.create(PLATFORM_PROJECT, "https://example.com/all", Event.BUILD_END,
                          Region.OSS)  # fmt: skip
    assert await version(redis, PLATFORM_PROJECT) == 1
    assert await version(redis) == seen[-1]


async def test_a_claim_reads_the_platforms_and_its_projects_versions(
    settings: Settings, redis: Redis
) -> None:
    registry = Registry(redis)
    await registry.create(PLATFORM_PROJECT, "https://example.com/all", Event.BUILD_END,
                          Region.OSS)  # fmt: skip
    await registry.create("demo", "https://example.com/a", Event.BUILD_END, Region.OSS)
    await registry.create("demo", "https://example.com/b", Event.BUILD_END, Region.OSS)
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_END", {})
    await producer.emit("quiet", "BUILD_END", {})  # no callbacks, ever: version 0
    claimed = await Claims(redis, Keys(settings.queue_name), "me", 30).claim(10)
    versions = {c.job_id.split(":")[0]: c.registry_version for c in claimed}
    assert versions == {"demo": b"1 2", "quiet": b"1 0"}


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[None]:
    """A worker that runs until the test ends."""
    worker = create_worker(settings, poll_delay=0.01, handle_signals=False)
    main = asyncio.create_task(worker.main())
    try:
        await until(lambda: asyncio.sleep(0, bool(worker.served)), 10, "the worker to start")
        yield
    finally:
        worker.stop()
        await main
        await worker.close()


async def test_a_kept_match_shows_each_registry_change_on_the_next_event(
    settings: Settings, redis: Redis, receiver: Receiver, running: None
) -> None:
    registry, producer = Registry(redis), Producer(settings, redis)
    a, _ = await registry.create("demo", receiver.url("/a"), Event.BUILD_END, Region.DEVNET,
                                 "token-1")  # fmt: skip
    sent = 0

    async def emit() -> None:
        nonlocal sent
        sent += 1
        await producer.emit("demo", "BUILD_END", {"n": sent})
        await until(lambda: _drained(redis, settings), 10, f"event {sent} delivered")

    def paths() -> list[str]:
        return [seen.path for seen in receiver.seen]

    await emit()
    kept = REGISTRY.get_sample_value("dispatcher_matches_total", {"source": "kept"}) or 0
    await emit()
    now = REGISTRY.get_sample_value("dispatcher_matches_total", {"source": "kept"}) or 0
    assert now == kept + 1  # the second event's match: not read again
    assert paths() == ["/a", "/a"]

    await registry.rotate_secret(a, "demo", "token-2", 0)
    await emit()
    assert receiver.requests("/a")[-1].headers[TOKEN_HEADER] == "token-2"

    await registry.create("demo", receiver.url("/b"), Event.BUILD_END, Region.DEVNET, "t")
    await emit()
    await registry.create(PLATFORM_PROJECT, receiver.url("/all"), Event.BUILD_END,
                          Region.DEVNET, "t")  # fmt: skip
    await emit()
    assert sorted(paths()[3:]) == ["/a", "/a", "/all", "/b", "/b"]

    await registry.set_enabled(a, False, "test")
    receiver.seen.clear()
    await emit()
    assert sorted(paths()) == ["/all", "/b"]

    await registry.delete(PLATFORM_PROJECT, (await registry.match(PLATFORM_PROJECT,
                                                                  "BUILD_END"))[0].id)  # fmt: skip
    receiver.seen.clear()
    await emit()
    assert paths() == ["/b"]


async def test_a_kept_match_shows_a_broader_callbacks_filter_change_to_the_url_it_shadows(
    settings: Settings, redis: Redis, receiver: Receiver, running: None
) -> None:
    """A URL at the platform and at demo: the chunk kept for demo's events carries the
    platform callback's filter with demo's (shadowed) callback; the platform callback's
    registration again, whose filter changes, shows on the next event."""
    registry, producer, url = Registry(redis), Producer(settings, redis), receiver.url("/same")
    await registry.create("demo", url, Event.BUILD_END, Region.DEVNET, "demo")

    async def platform(expression: str | None) -> None:
        await registry.create(PLATFORM_PROJECT, url, Event.BUILD_END, Region.DEVNET, "all",
                              options=Options(filter=expression))  # fmt: skip

    async def sender(status: str) -> str:
        receiver.seen.clear()
        await producer.emit("demo", "BUILD_END", {"status": status})
        await until(lambda: _drained(redis, settings), 10, f"the {status} event delivered")
        [seen] = receiver.requests("/same")
        return seen.headers[TOKEN_HEADER]

    await platform("data.status == 'FAILED'")
    assert await sender("OK") == "demo"
    kept = REGISTRY.get_sample_value("dispatcher_matches_total", {"source": "kept"}) or 0
    assert [await sender("FAILED"), await sender("OK")] == ["all", "demo"]
    now = REGISTRY.get_sample_value("dispatcher_matches_total", {"source": "kept"}) or 0
    assert now == kept + 2  # both from the chunk kept, shadow and all
    await platform(None)  # no filter: the platform's callback takes every event
    assert await sender("OK") == "all"
    await platform("data.status == 'OK'")
    assert [await sender("OK"), await sender("FAILED")] == ["all", "demo"]


async def test_a_kept_match_sees_a_callbacks_failures_so_its_next_success_resets_them(
    settings: Settings, redis: Redis, receiver: Receiver, running: None
) -> None:
    """The match carries whether a callback has failures on record: a success of one that
    has writes the reset. Kept from before a final failure, it would say none, and the
    count would run on past successes to a wrongful disable."""
    url = receiver.script("/a", answer(200), answer(200), *[answer(500)] * 4, answer(200))
    cid, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    producer = Producer(settings, redis)
    for n in range(3):  # success, success (kept match), 4 failed attempts: a final failure
        await producer.emit("demo", "BUILD_END", {"n": n})
        await until(lambda: _drained(redis, settings), 10, f"event {n} done")
    assert await redis.exists(keys.health(cid))
    await producer.emit("demo", "BUILD_END", {"n": 3})  # success: the count is reset
    await until(lambda: _drained(redis, settings), 10, "event 3 done")
    assert len(receiver.requests("/a")) == 7
    assert not await redis.exists(keys.health(cid))


@pytest.mark.parametrize("owner", ["demo", PLATFORM_PROJECT])
async def test_a_kept_match_says_whether_its_project_numbers_events_as_the_producer_did(
    settings: Settings, redis: Redis, receiver: Receiver, running: None, owner: str
) -> None:
    """The chunk kept for demo's events says whether its events are numbered (an ordered
    callback of demo's or the platform's: `Chunk.numbered`), which decides whether a
    fan-out may hold demo's lanes, so it looks (`Enter`) without a command per delivery:
    an ordered callback (of another event) registered, or made unordered, bumps the
    version the kept chunk is under. Event 2, numbered, lets its lanes go at its fan-out
    (pending to ready; a stale chunk would leave it pending); event 3, after the callback
    is unordered again, is not numbered and its fan-out looks for nothing (no ZSCORE)."""
    registry, producer = Registry(redis), Producer(settings, redis)
    await registry.create("demo", receiver.url("/a"), Event.BUILD_END, Region.DEVNET, "t")

    async def emit(n: int) -> None:
        await producer.emit("demo", "BUILD_END", {"buildId": "b"}, event_id=f"e{n}")
        await until(lambda: _drained(redis, settings), 10, f"event {n} delivered")

    async def ordered(by: str | None) -> None:
        await registry.create(owner, receiver.url("/o"), Event.BUILD_START, Region.DEVNET,
                              "t", options=Options(order_by=by))  # fmt: skip

    await emit(1)  # its chunk kept: demo's events not numbered
    await ordered("buildId")
    await emit(2)
    assert await redis.zrange(keys.lanes_ready("demo"), 0, -1) == [b"demo:e2"]
    assert not await redis.zcard(keys.lanes_pending("demo"))
    await ordered(None)
    await redis.config_resetstat()
    await emit(3)
    assert len(receiver.requests("/a")) == 3
    stats = await redis.info("commandstats")
    assert int(stats.get("cmdstat_zscore", {}).get("calls", 0)) == 0


async def _drained(redis: Redis, settings: Settings) -> bool:
    return int(await redis.zcard(settings.queue_name)) == 0
