"""The Lua scripts build some keys from values they read inside Redis, from prefixes and
separators `keys.py` hands them. Here both sides meet: after each scripted operation, the
keys in Redis are exactly the ones `keys.py` names."""

from __future__ import annotations

from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.history.record import AttemptRecord
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.keys import Keys, callback_unique_field, history_member
from dispatcher.keys import scope as scope_of
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.queue import Queue
from dispatcher.services import Services
from dispatcher.settings import Settings

keys = Keys()  # today's key names (one shard)

URL = "https://example.com/hook"


async def present(redis: Redis) -> set[str]:
    return {key.decode() for key in await redis.keys("*")}


async def test_scripts_and_keys_py_build_the_same_names(settings: Settings, redis: Redis) -> None:
    services = Services(settings, redis)
    registry = services.registry
    callback_id, created = await registry.create("demo", URL, Event.BUILD_END, Region.OSS, "t")
    assert created
    registered = {
        keys.CALLBACK_SEQ,
        keys.callback(callback_id),
        keys.callback_unique("demo"),
        keys.project_callbacks("demo"),
        keys.match("demo", "BUILD_END"),
        keys.registry_version("demo"),
    }
    assert await present(redis) == registered
    field = callback_unique_field("BUILD_END", URL)
    unique = await redis.hget(keys.callback_unique("demo"), field)  # type: ignore[misc]  # sync|async
    assert unique == str(callback_id).encode()

    await services.health.failed(callback_id, "HTTP 500")
    failing = {keys.health(callback_id), keys.HEALTH_FAILING}
    failing |= {keys.failing_of("demo"), keys.HEALTH_FAILING_PROJECTS}
    assert await present(redis) == registered | failing

    await services.disable(callback_id, by="test")
    # the match set emptied (Redis drops it); the disabled set names the callback
    assert await present(redis) == (registered - {keys.match("demo", "BUILD_END")}) | failing | {
        keys.CALLBACKS_DISABLED
    }
    await services.enable(callback_id)  # back in the match set, failure count cleared
    assert await present(redis) == registered

    now = now_ms()
    record: AttemptRecord = {"projectId": "demo", "callBackUrl": URL, "events": "BUILD_END",
              "status": "FAILED", "startTime": now, "endTime": now, "createdTime": now}  # fmt: skip
    record_id = await services.history.add(record, dead=True)
    index = keys.history_index("demo", "BUILD_END", URL)
    history = {
        keys.HISTORY_SEQ,
        keys.HISTORY_SEQ_SERVER,
        keys.history_record(record_id),
        index,
        keys.HISTORY_INDEXES,
        keys.HISTORY_DEAD,
        keys.history_dead("demo"),
        keys.HISTORY_DEAD_KEYS,
        keys.history_url_index("demo", URL, failed=True),
        keys.history_failed("demo"),
    }
    assert await present(redis) == registered | history
    # the sweep finds a URL's indexes from each of its (event, url) indexes
    assert keys.history_indexes_of(index) == (
        keys.history_url_index("demo", URL, failed=False),
        keys.history_url_index("demo", URL, failed=True),
        keys.history_failed("demo"),
    )
    weird = keys.history_index("a:b", "BUILD_END", URL)  # a separator in the project id
    assert keys.history_indexes_of(weird)[1:] == (
        keys.history_url_index("a:b", URL, True),
        keys.history_failed("a:b"),
    )
    # the record's member, and the index's mark (+inf: no time range reads it)
    assert await redis.zrange(index, 0, -1) == [history_member(record_id).encode(), b"~"]
    dead_keys = await redis.smembers(keys.HISTORY_DEAD_KEYS)  # type: ignore[misc]  # sync|async
    assert dead_keys == {keys.history_dead("demo").encode()}
    assert [r.id for r in await services.history.dead("demo")] == [record_id]

    attempt: AttemptRecord = {**record, "deliveryId": "evt_1.1"}
    attempt_id = await services.history.add(attempt)
    history |= {keys.history_record(attempt_id), keys.history_attempts("evt_1.1")}
    assert await present(redis) == registered | history
    assert [r.id for r in await services.history.attempts("evt_1.1", "demo")] == [attempt_id]

    await registry.delete("demo", callback_id)
    version = keys.registry_version("demo")  # stays: see the pipeline test below
    assert await present(redis) == {keys.CALLBACK_SEQ, version} | history

    await Queue(redis, Keys(settings.queue_name)).enqueue(EventJob("evt_1", "demo", "BUILD_END"))
    assert await present(redis) - history - {keys.CALLBACK_SEQ, version} == {
        keys.arq_job("demo:evt_1"),
        settings.queue_name,
    }


async def test_pipeline_and_platform_callbacks_use_the_names_keys_py_builds(
    settings: Settings, redis: Redis
) -> None:
    registry = Services(settings, redis).registry
    piped, _ = await registry.create(
        "demo", URL, Event.BUILD_END, Region.OSS, pipeline_id="p1", auth_header=("X-Key", "v")
    )
    platform, _ = await registry.create(PLATFORM_PROJECT, URL, Event.BUILD_END, Region.OSS)
    scope = scope_of("demo", "p1")
    assert scope == "demo:p1"
    pipeline_keys = {
        keys.callback(piped),
        keys.callback_unique(scope),
        keys.project_callbacks("demo"),
        keys.pipeline_callbacks("demo", "p1"),
        keys.match(scope, "BUILD_END"),
        keys.registry_version("demo"),
    }
    platform_keys = {
        keys.callback(platform),
        keys.callback_unique(PLATFORM_PROJECT),
        keys.project_callbacks(PLATFORM_PROJECT),
        keys.match(PLATFORM_PROJECT, "BUILD_END"),
        keys.registry_version(PLATFORM_PROJECT),
    }
    assert await present(redis) == {keys.CALLBACK_SEQ} | pipeline_keys | platform_keys
    assert await redis.zrange(keys.match(scope, "BUILD_END"), 0, -1, withscores=True) == [
        (str(piped).encode(), float(piped))
    ]
    field = callback_unique_field("BUILD_END", URL)
    unique = await redis.hget(keys.callback_unique(scope), field)  # type: ignore[misc]  # sync|async
    assert unique == str(piped).encode()

    await registry.set_enabled(piped, False, "test")  # the script finds the pipeline's set
    assert not await redis.exists(keys.match(scope, "BUILD_END"))
    await registry.set_enabled(piped, True)
    assert await redis.exists(keys.match(scope, "BUILD_END"))

    await registry.delete("demo", piped, pipeline_id="p1")
    await registry.delete(PLATFORM_PROJECT, platform)
    # the versions stay: a kept match of the old ones must not hold again
    versions = {keys.registry_version("demo"), keys.registry_version(PLATFORM_PROJECT)}
    assert await present(redis) == {keys.CALLBACK_SEQ} | versions
    assert await registry.upgrade() == 0
    assert await present(redis) == {keys.CALLBACK_SEQ, keys.CALLBACKS_LAYOUT} | versions


async def test_a_window_redeliverys_id_is_taken_only_once_its_job_is_gone(
    redis: Redis,
) -> None:
    """The queued-once key was taken before the job's key was looked at: a window call
    landing while a dropped redelivery's job was still ending queued nothing and held the
    id for days (review). A try again of the same call still counts what it queued."""
    job = DeliveryJob("demo:e.1", "demo:e.1:redeliver:after-5", "e", "demo", "BUILD_END",
                      b"{}", 1, 5, "demo")  # fmt: skip
    queue, k = Queue(redis, keys), keys.arq_job(job.job_id)

    async def push(nonce: str) -> list[int]:
        [answer] = await run_pipeline(
            redis, lambda pipe: queue.push_many(pipe, [job], nonce=nonce, once_ms=60_000)
        )
        return list(answer)

    await redis.set(k, b"ending")  # its job, still ending
    assert await push("first") == [0]
    assert not await redis.exists(keys.pushed(job.job_id))
    await redis.delete(k)
    assert [await push("second"), await push("second"), await push("third")] == [[1], [1], [0]]
    assert await redis.zcard(keys.QUEUE) == 1
