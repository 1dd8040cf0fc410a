"""Endpoint health as the worker counts it: one script per final failure, in the attempt's
pipeline, that also disables the callback past the thresholds (a count and a span)."""

from __future__ import annotations

from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher.embedded import EmbeddedRedis
from dispatcher.health import Health
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from tests.helpers import make_settings

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
    assert await health.failed(callback_id, "HTTP 500", now_ms=1_000_000 + 3 * 3_600_000) is True
    assert await registry.match("demo", "BUILD_END") == []  # out of the match set


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
