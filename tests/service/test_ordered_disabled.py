"""An ordered callback disabled (by its owner, or by the service for a `410 Gone`) with a
backlog parked in its lane: none of it is dropped. The lane's head waits in the queue,
looked at again every `DISABLED_RECHECK_S`, its members parked behind it; once the callback
is enabled again they go on in order, once it is deleted each is dropped on record. (A
disable dropped the whole parked backlog at once, and a project's list of drops keeps only
the last 1,000 of them: review.)"""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.lane_ids import lane_id
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from dispatcher.worker.lanes import DISABLED_RECHECK_S, GONE
from tests.helpers import Receiver, RunWorker, all_records, make_settings

keys = Keys()

STEPS = 5

pytestmark = pytest.mark.timeout(60)


async def parked(
    redis: Redis, slow: Settings, receiver: Receiver, run_worker: RunWorker, head: dict[str, int]
) -> tuple[int, str, str, list[str]]:
    """Build b's `STEPS` events to an ordered callback; step 0 is answered `head["status"]`
    (500 at first: its retry due in a minute, the others parked behind it), the others 200:
    the callback, its URL, its lane, the lane's members (in order)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        step = orjson.loads(await request.read())["data"]["step"]
        return web.Response(status=head["status"] if step == 0 else 200)

    url = receiver.script("/hook", handler)
    ordered = Options(order_by="buildId")
    registry = Registry(redis)
    callback_id, _ = await registry.create(
        "demo", url, Event.BUILD_END, Region.DEVNET, options=ordered
    )
    await Producer(slow, redis).emit_many(
        [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(STEPS)]
    )
    await run_worker(slow, max_burst_jobs=STEPS)  # the fan-outs: step 0 failed, the rest parked
    lane = keys.lane(lane_id("demo", url, "buildId", "demo", "b"))
    members = [member.decode() for member in await redis.zrange(lane, 0, -1)]
    assert len(members) == STEPS
    return callback_id, url, lane, members


def steps(receiver: Receiver) -> list[int]:
    return [orjson.loads(seen.body)["data"]["step"] for seen in receiver.requests("/hook")]


async def held_while_disabled(redis: Redis, lane: str, members: list[str]) -> None:
    """Nothing dropped: every member still in the lane (the head first, due again in about
    `DISABLED_RECHECK_S`, the lane listed blocked), the others parked."""
    assert await redis.llen(keys.DROPPED) == 0  # type: ignore[misc]  # sync|async
    assert [m.decode() for m in await redis.zrange(lane, 0, -1)] == members
    due = await redis.zscore(keys.QUEUE, members[0])
    assert due is not None and due > now_ms() + (DISABLED_RECHECK_S - 10) * 1000
    assert all([await redis.zscore(keys.QUEUE, m) is None for m in members[1:]])
    assert await redis.zscore(keys.LANES_BLOCKED, lane) is not None


async def test_a_disabled_callbacks_lane_stays_parked_and_goes_on_in_order_once_enabled(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    head = {"status": 500}
    callback_id, url, lane, members = await parked(redis, slow, receiver, run_worker, head)
    registry = Registry(redis)
    await registry.set_enabled(callback_id, False, "paused by its owner")
    head["status"] = 200
    for _ in range(2):  # (its next look, due now: it waits again)
        await redis.zadd(keys.QUEUE, {members[0]: 0})
        await run_worker(slow, max_burst_jobs=1)
    await held_while_disabled(redis, lane, members)
    assert steps(receiver) == [0]  # nothing sent while disabled

    await registry.set_enabled(callback_id, True)
    await redis.zadd(keys.QUEUE, {members[0]: 0})  # (its next look, a minute on)
    await run_worker(slow)
    assert steps(receiver) == [0, *range(STEPS)]  # in order
    ends = [(r.event_id, r.status.value, r.final) for r in await all_records(redis, slow, url)]
    assert ends == [("e0", "FAILED", False)] + [(f"e{s}", "SUCCESS", True) for s in range(STEPS)]
    assert not await redis.exists(lane) and not await redis.zcard(keys.LANES_BLOCKED)


async def test_a_lane_whose_receiver_answers_410_stays_parked_until_its_callback_is_deleted(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The head's 410 ends it (a final FAILED) and disables the callback: the next member
    heads the lane and waits, the others parked; deleted, each is dropped on record."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    head = {"status": 500}
    callback_id, url, lane, members = await parked(redis, slow, receiver, run_worker, head)
    head["status"] = 410
    await redis.zadd(keys.QUEUE, {members[0]: 0})
    await run_worker(slow, max_burst_jobs=1)  # (its one job spent, e1 goes back, due now)
    assert not (await Registry(redis).get(callback_id)).enabled  # disabled for the 410
    await run_worker(slow, max_burst_jobs=1)
    await held_while_disabled(redis, lane, members[1:])
    assert steps(receiver) == [0, 0]

    await Registry(redis).delete("demo", callback_id)
    await redis.zadd(keys.QUEUE, {members[1]: 0})
    await run_worker(slow)
    entries = await redis.lrange(keys.dropped("demo"), 0, -1)  # type: ignore[misc]
    dropped = sorted(orjson.loads(entry)["deliveryId"].split(":")[1] for entry in entries)
    assert dropped == [f"e{s}.{callback_id}" for s in range(1, STEPS)]
    assert {orjson.loads(entry)["reason"] for entry in entries} == {GONE}
    assert not await redis.exists(lane) and steps(receiver) == [0, 0]
    ends = [(r.event_id, r.status.value, r.final) for r in await all_records(redis, slow, url)]
    assert ends == [("e0", "FAILED", False), ("e0", "FAILED", True)]  # the 500, the 410
