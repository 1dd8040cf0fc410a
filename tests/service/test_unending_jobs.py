"""Jobs whose runs never end (`dispatcher.worker.unending`), on a real Redis and receiver:
past `MAX_CLAIMS` claims their deliveries end as final FAILED records, unsent; only a job
whose giving up fails too is dropped, on record."""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.models import DeliveryStatus, Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from dispatcher.worker.unending import GIVE_UP_RUNS, MAX_CLAIMS
from tests.helpers import Receiver, RunWorker, all_records, answer, make_settings

keys = Keys()  # today's key names (one shard)
GAVE_UP = "not sent: its job was claimed 26 times without ending"


async def callbacks(
    redis: Redis, receiver: Receiver, *paths: str, options: Options | None = None
) -> list[tuple[str, int]]:
    """A BUILD_END callback of project demo for each path: (url, callback id)."""
    made = []
    for path in paths:
        url = receiver.script(path, answer(200))
        callback_id, _ = await Registry(redis).create(
            "demo", url, Event.BUILD_END, Region.DEVNET, options=options
        )
        made.append((url, callback_id))
    return made


async def claimed_before(redis: Redis, job_id: str, claims: int) -> None:
    """As if the job had been claimed `claims` times, none of its runs ending."""
    await redis.set(keys.ARQ_RETRY_PREFIX + job_id, claims)


def given_up(records: list[HistoryRecord], attempt: int) -> bool:
    """One final FAILED record of `attempt`, unsent, saying why."""
    [record] = records
    return (
        record.status is DeliveryStatus.FAILED
        and record.final
        and record.attempt == attempt
        and record.response_code is None
        and (record.error_msg or "").startswith(GAVE_UP)
    )


async def test_a_fan_out_claimed_25_times_ends_its_deliveries_as_failed_records(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Nothing is sent; each callback gets its final FAILED record (in the dead-letter view,
    for its owner to redeliver), not counted against its health nor taking a start of its
    limits; the job ends, no drop."""
    limited = Options(max_per_second=1, max_in_flight=1)
    made = [
        *await callbacks(redis, receiver, "/a"),
        *await callbacks(redis, receiver, "/b", options=limited),
    ]
    event_id = await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
    await claimed_before(redis, f"demo:{event_id}", MAX_CLAIMS)
    await run_worker()
    assert receiver.seen == [] and await redis.zcard(settings.queue_name) == 0
    for url, callback_id in made:
        assert given_up(await all_records(redis, settings, url), attempt=1), url
        assert not await redis.exists(keys.health(callback_id))  # no failure counted
        assert not await redis.exists(*keys.limits(callback_id))  # no start taken
    dead = await RedisHistory(redis, settings, keys).dead("demo")
    assert {r.callback_id for r in dead} == {callback_id for _, callback_id in made}
    assert await redis.llen(keys.DROPPED) == 0  # type: ignore[misc]  # sync|async


async def test_only_the_chunk_that_never_ended_gives_up(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A fan-out's next chunk counts its claims from 1 again: it is delivered as usual."""
    (first, _), (second, _) = await callbacks(redis, receiver, "/a", "/b")
    chunked = make_settings(settings.redis_url or "", fan_out_chunk=1)
    event_id = await Producer(chunked, redis).emit("demo", "BUILD_END", {})
    await claimed_before(redis, f"demo:{event_id}", MAX_CLAIMS)
    await run_worker(chunked)
    assert given_up(await all_records(redis, chunked, first), attempt=1)
    [delivered] = await all_records(redis, chunked, second)
    assert delivered.status is DeliveryStatus.SUCCESS
    assert [s.path for s in receiver.seen] == ["/b"]


async def test_a_retry_claimed_25_times_ends_as_its_next_attempt_failed(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A `deliver` job (a retry, its first attempt made) gives up as attempt 2."""
    url = receiver.script("/hook", answer(500), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    slow = make_settings(settings.redis_url or "", retry_schedule=(30,))
    await Producer(slow, redis).emit("demo", "BUILD_END", {})
    await run_worker(slow, max_burst_jobs=1)  # the fan-out only: attempt 1, a 500
    [job_id] = [m.decode() for m in await redis.zrange(slow.queue_name, 0, -1)]
    await redis.zadd(slow.queue_name, {job_id: 0})  # due now, not in 30 s
    await claimed_before(redis, job_id, MAX_CLAIMS)
    await run_worker(slow)
    assert len(receiver.requests()) == 1 and await redis.zcard(slow.queue_name) == 0
    first, last = await all_records(redis, slow, url)
    assert first.status is DeliveryStatus.FAILED and not first.final  # the 500, retried
    assert given_up([last], attempt=2)


async def test_an_ordered_delivery_that_gives_up_lets_its_lane_go_on(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The lane's head ends FAILED, unsent; the next event of the build goes out after it."""
    url = receiver.script("/hook", answer(200))
    await Registry(redis).create(
        "demo", url, Event.BUILD_END, Region.DEVNET, options=Options(order_by="buildId")
    )
    events = [("demo", "BUILD_END", {"buildId": "b-1", "step": step}) for step in (0, 1)]
    first, second = await Producer(settings, redis).emit_many(events)
    await claimed_before(redis, f"demo:{first}", MAX_CLAIMS)
    await run_worker()
    head, after = await all_records(redis, settings, url)
    assert given_up([head], attempt=1) and head.event_id == first
    assert (after.event_id, after.status) == (second, DeliveryStatus.SUCCESS)
    [sent] = receiver.requests()
    assert orjson.loads(sent.body)["data"]["step"] == 1


async def test_a_job_whose_giving_up_fails_too_is_dropped_on_record(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The last resort, past `GIVE_UP_RUNS` more claims: the job is dropped unrun, on
    record. A `fan_out` job's entry names the event's job alone."""
    made = await callbacks(redis, receiver, "/a", "/b")
    event_id = await Producer(settings, redis).emit("demo", "BUILD_END", {})
    job_id = f"demo:{event_id}"
    await claimed_before(redis, job_id, MAX_CLAIMS + GIVE_UP_RUNS)
    await run_worker()
    assert receiver.seen == [] and await redis.zcard(settings.queue_name) == 0
    [drop] = [orjson.loads(e) for e in await redis.lrange(keys.DROPPED, 0, -1)]  # type: ignore[misc]
    claims = MAX_CLAIMS + GIVE_UP_RUNS + 1
    assert (drop["jobId"], drop["reason"]) == (job_id, f"claimed {claims} times without ending")
    assert set(drop) == {"jobId", "reason", "at"}  # no delivery, callback or project
    for url, _ in made:
        assert await all_records(redis, settings, url) == []
