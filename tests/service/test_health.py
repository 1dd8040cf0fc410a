"""Endpoint health as the worker counts it: one script per final failure, in the attempt's
pipeline, that also disables the callback past the thresholds (a count and a span)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher.embedded import EmbeddedRedis
from dispatcher.health import FilterError, Health
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import Receiver, RunWorker, all_records, make_settings

keys = Keys()  # today's key names (one shard)


async def test_health_counts_a_record_once_and_disables_past_both_thresholds(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The production path's count (`queue_failed`, one script in the attempt's pipeline):
    a record counted twice (its batch sent again) counts once; past the count *and* the
    span the same script disables the callback, and `judged` reports it once."""
    settings = make_settings(redis_server.url, disable_after_failures=2, disable_after_seconds=60)
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", "https://e.com/h", Event.BUILD_END,
                                           Region.DEVNET)  # fmt: skip
    health = Health(redis, registry, settings)

    async def count(record_id: int, now_ms: int) -> str | None:
        (reply,) = await run_pipeline(
            redis,
            lambda pipe: health.queue_failed(pipe, callback_id, "HTTP 500", now_ms, record_id),
        )
        return health.judged(callback_id, reply)

    assert await count(1, 1_000_000) is None
    assert await count(1, 1_000_000) is None  # the same record again: still one failure
    assert await redis.hget(keys.health(callback_id), "failures") == b"1"  # type: ignore[misc]
    assert await count(2, 1_030_000) is None  # two failures, but over 30 s only
    assert (await registry.get(callback_id)).enabled
    with capture_logs() as logs:
        reason = await count(3, 1_000_000 + 2 * 3_600_000)
    assert reason == (
        "disabled after 3 consecutive failed deliveries over 2.0 h; last error: HTTP 500"
    )
    callback = await registry.get(callback_id)
    assert not callback.enabled and callback.disabled_reason == reason
    assert [e["event"] for e in logs] == ["callback.disabled"]
    assert await health.failed(callback_id, "HTTP 500", now_ms=1_000_000 + 3 * 3_600_000) is False
    assert (await registry.get(callback_id)).disabled_reason == reason  # disabled once
    assert await registry.match("demo", "BUILD_END") == []  # out of the match set


async def test_a_late_failure_keeps_an_owners_disable_and_its_reason(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """An attempt in flight when the owner disabled the callback fails for good past the
    thresholds: the callback stays disabled with the owner's reason, and the failure is
    not a disable (not logged as one, not counted). It was disabled again: the owner's
    reason overwritten, `callback.disabled` logged and counted (review)."""
    settings = make_settings(redis_server.url, disable_after_failures=3, disable_after_seconds=0)
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", "http://127.0.0.1:9/x", Event.BUILD_END,
                                           Region.DEVNET)  # fmt: skip
    health = Health(redis, registry, settings)
    for _ in range(2):
        assert not await health.failed(callback_id, "HTTP 500")
    owners = "paused by owner: receiver maintenance"
    await registry.set_enabled(callback_id, False, owners, project_id="demo")
    with capture_logs() as logs:
        assert not await health.failed(callback_id, "HTTP 500")  # the one in flight
    callback = await registry.get(callback_id)
    assert not callback.enabled and callback.disabled_reason == owners
    assert "callback.disabled" not in [e["event"] for e in logs]
    assert await redis.hget(keys.health(callback_id), "failures") == b"3"  # type: ignore[misc]


async def test_the_match_knows_failures_on_record_from_the_callbacks_mark(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The match reads `failing` from the callback's hash (no look at its health hash): a
    failure sets it, a success's reset clears it, a hash written before it was kept counts
    as failing (its next success writes the reset), and a reset never revives a deleted
    callback."""
    settings = make_settings(redis_server.url)
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", "https://e.com/h", Event.BUILD_END,
                                           Region.DEVNET)  # fmt: skip
    health = Health(redis, registry, settings)

    async def failing() -> tuple[bool, bool]:
        (matched,) = await registry.match("demo", "BUILD_END")
        target = await registry.target(callback_id)
        assert target is not None
        return matched.failing, target.failing

    assert await failing() == (False, False)
    await health.failed(callback_id, "HTTP 500")
    assert await failing() == (True, True)
    await run_pipeline(redis, lambda pipe: health.succeeded(pipe, callback_id))
    assert await failing() == (False, False)
    assert await health.failures([callback_id]) == {}
    await redis.hdel(keys.callback(callback_id), "failing")  # type: ignore[misc]  # sync|async
    assert await failing() == (True, True)
    await registry.delete("demo", callback_id)
    await run_pipeline(redis, lambda pipe: health.succeeded(pipe, callback_id))
    assert not await redis.exists(keys.callback(callback_id))


async def test_a_callback_deleted_while_its_attempt_is_in_flight_leaves_no_health_behind(
    redis: Redis, settings: Settings, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A final failure whose callback was deleted while its request was in flight counts
    nothing: its health hash and its place among the failing callbacks went with it, and
    came back for good (no TTL, the id never used again), pushing real failing callbacks
    out of the oldest-first status listings (review)."""
    arrived, go = asyncio.Event(), asyncio.Event()

    async def held_then_refused(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await go.wait()
        return web.Response(status=400, text="no")

    registry = Registry(redis)
    url = receiver.script("/held", held_then_refused)
    callback_id, _ = await registry.create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
    worker = asyncio.ensure_future(run_worker())
    try:
        await asyncio.wait_for(arrived.wait(), 30)
        await registry.delete("demo", callback_id)
        assert not await redis.exists(keys.callback(callback_id))
    finally:
        go.set()
        await worker
    assert len(receiver.requests("/held")) == 1
    assert not await redis.exists(keys.health(callback_id), keys.callback(callback_id))
    assert await redis.zscore(keys.HEALTH_FAILING, str(callback_id)) is None
    assert (await Health(redis, registry, settings).failing()).shown == []


async def test_the_failing_listing_clears_what_deleted_callbacks_left(
    redis: Redis, settings: Settings
) -> None:
    """Health a deleted callback left behind (an earlier version counted its final failure
    without checking that it exists) is cleared by the failing set's index at start-up
    (`Health.upgrade`): listed and counted no more, its keys gone. One left in its
    project's set (a version before deleted the callback) is cleared by the first listing
    that meets it. A callback still there is listed as before."""
    registry = Registry(redis)
    health = Health(redis, registry, settings)
    kept, _ = await registry.create("demo", "https://e.com/h", Event.BUILD_END, Region.DEVNET)
    await health.failed(kept, "HTTP 500", now_ms=2_000)
    ghost = kept + 1000
    await redis.hset(keys.health(ghost), mapping={"failures": 3, "since": 1_000})  # type: ignore[misc]
    await redis.zadd(keys.HEALTH_FAILING, {str(ghost): 1_000, "7777": 500})
    await health.upgrade()
    found = await health.failing()
    assert ([f.callback_id for f in found.shown], found.total) == ([kept], 1)
    assert not await redis.exists(keys.health(ghost))
    assert await redis.zrange(keys.HEALTH_FAILING, 0, -1) == [str(kept).encode()]

    other, _ = await registry.create("demo", "https://e.com/o", Event.BUILD_END, Region.DEVNET)
    for _ in range(3):  # the worst of demo's: read first
        await health.failed(other, "HTTP 500", now_ms=3_000)
    await redis.delete(keys.callback(other), keys.health(other))  # a version before's delete
    await redis.zrem(keys.HEALTH_FAILING, str(other))
    found = await health.failing()
    assert ([f.callback_id for f in found.shown], found.total, found.projects) == ([kept], 1, 1)
    assert found.groups[0].count == 1
    assert await redis.zrange(keys.failing_of("demo"), 0, -1) == [str(kept).encode()]
    assert await redis.zscore(keys.HEALTH_FAILING_PROJECTS, "demo") == 1.0


async def test_a_filters_failure_counts_only_while_its_callback_exists(
    redis: Redis, settings: Settings
) -> None:
    """A filter's failure is counted on its callback while it exists; one whose callback
    was deleted meanwhile (between the match and the write) leaves no count behind."""
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", "https://e.com/h", Event.BUILD_END,
                                           Region.DEVNET)  # fmt: skip
    errors = keys.filter_errors(callback_id)

    async def fail() -> int:
        count = FilterError(errors, keys.callback(callback_id), "length() of a number", 5)
        return int(await count.run(redis))

    assert await fail() == 1
    assert await redis.hgetall(errors) == {  # type: ignore[misc]  # sync|async
        b"n": b"1",
        b"lastError": b"length() of a number",
        b"lastAt": b"5",
    }
    await registry.delete("demo", callback_id)
    assert await fail() == 0
    assert not await redis.exists(errors)


@pytest.mark.parametrize("platform", [True, False], ids=["platform", "project"])
@pytest.mark.parametrize("status", [400, 410])
async def test_one_projects_failures_disable_only_a_callback_of_its_own(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    platform: bool, status: int,
) -> None:  # fmt: skip
    """`evil`'s events end in final failures at a receiver that refuses them (its data:
    400 three times, past the threshold; or one 410 Gone). A platform-wide callback, which
    every project's events reach, is not disabled by them (before, it was: demo's later
    event matched nothing, no delivery, no record, no drop; review): each of evil's
    deliveries has its final FAILED record, the failures show in `failing` naming evil, and
    demo's event is delivered. evil's own callback is disabled as before."""
    settings = settings.model_copy(
        update={"retry_schedule": (), "disable_after_failures": 3, "disable_after_seconds": 0}
    )

    async def refuses_evil(request: web.Request) -> web.StreamResponse:
        evils = orjson.loads(await request.read())["projectId"] == "evil"
        return web.Response(status=status if evils else 200)

    url = receiver.script("/hook", refuses_evil)
    registry, producer = Registry(redis), Producer(settings, redis)
    owner = PLATFORM_PROJECT if platform else "evil"
    callback_id, _ = await registry.create(owner, url, Event.BUILD_END, Region.DEVNET)
    failures = 3 if status == 400 else 1
    for _ in range(failures):
        await producer.emit("evil", "BUILD_END", {})
    await run_worker(settings)
    records = await all_records(redis, settings, url, owner)
    assert [(r.status.value, r.response_code, r.final) for r in records] == [
        ("FAILED", status, True)
    ] * failures
    callback = await registry.get(callback_id)
    if not platform:  # today's behaviour, unchanged
        assert not callback.enabled
        assert ("410" if status == 410 else "3 consecutive") in (callback.disabled_reason or "")
        return
    assert callback.enabled and callback.disabled_reason is None
    (shown,) = (await Health(redis, registry, settings).failing()).shown
    assert (shown.callback_id, shown.failures) == (callback_id, failures)
    assert shown.last_error.startswith("project evil: ")
    await producer.emit("demo", "BUILD_END", {})
    await run_worker(settings)
    projects = [orjson.loads(r.body)["projectId"] for r in receiver.requests("/hook")]
    assert projects == ["evil"] * failures + ["demo"]
    assert (await Health(redis, registry, settings).failing()).shown == []  # reset by demo's


async def test_one_projects_failures_at_a_platform_callback_leave_every_projects_matches_cached(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """`evil`'s refused events and demo's accepted ones take turns at a platform-wide
    callback: its `failing` mark goes on and off with each. The platform's registry version
    is left as it was: every flip bumped it, and every worker's cached matches of every
    project were read again (evil could keep them all uncached; review). A worker sees the
    mark within its cache's age (10 s), and demo's success still resets the count."""
    settings = settings.model_copy(update={"retry_schedule": ()})

    async def refuses_evil(request: web.Request) -> web.StreamResponse:
        evils = orjson.loads(await request.read())["projectId"] == "evil"
        return web.Response(status=400 if evils else 200)

    url = receiver.script("/hook", refuses_evil)
    registry, producer = Registry(redis), Producer(settings, redis)
    await registry.create(PLATFORM_PROJECT, url, Event.BUILD_END, Region.DEVNET)
    version = keys.REGISTRY_VERSION_PREFIX + PLATFORM_PROJECT
    before = await redis.get(version)
    for project in ["evil", "demo", "evil", "demo"]:
        await producer.emit(project, "BUILD_END", {})
        await run_worker(settings)  # a new worker: its cache is read at the mark's value
    assert await redis.get(version) == before
    assert (await Health(redis, registry, settings).failing()).shown == []  # reset by demo's
