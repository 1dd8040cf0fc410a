"""How many ordered deliveries wait parked in their lanes, behind their lane's head:
`dispatcher_lanes_parked`, counted by the lanes' scripts as deliveries join and leave a
lane (a lane's head is not parked; one whose job is gone leaves as a recorded drop). A lane
whose receiver answers well but slower than its events come grows without bound, and
nothing showed it: only blocked lanes were counted (review)."""

from __future__ import annotations

import re

import httpx
import orjson
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from tests.helpers import Receiver, RunWorker, make_settings

keys = Keys()


async def parked(api: httpx.AsyncClient) -> float:
    metrics = (await api.get("/metrics")).text
    found = re.search(r"^dispatcher_lanes_parked (\S+)$", metrics, re.MULTILINE)
    assert found is not None, "no dispatcher_lanes_parked"
    return float(found.group(1))


async def test_the_deliveries_parked_in_lanes_are_counted_as_they_join_and_leave(
    api: httpx.AsyncClient,
    redis: Redis,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    failing = {"on": True}

    async def handler(request: web.Request) -> web.StreamResponse:
        step = orjson.loads(await request.read())["data"]["step"]
        return web.Response(status=503 if failing["on"] and step == 0 else 200)

    url = receiver.script("/hook", handler)
    ordered = Options(order_by="buildId")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, options=ordered)
    builds = {"b1": 4, "b2": 2}
    events = [
        ("demo", "BUILD_END", {"buildId": b, "step": s}, f"{b}-{s}")
        for b, steps in builds.items()
        for s in range(steps)
    ]
    await Producer(slow, redis).emit_many(events)
    await run_worker(slow, max_burst_jobs=len(events))  # the fan-outs: each step 0 retries
    assert await parked(api) == 3 + 1
    heads = [
        job for job in await redis.zrange(keys.QUEUE, 0, -1) if b"-0." in job
    ]  # the two step 0 retries
    assert len(heads) == 2
    (gone,) = [m for m in await redis.keys(f"{keys.ARQ_JOB_PREFIX}demo:b1-1.*")]
    await redis.delete(gone)  # b1's step 1: its job gone, dropped on record in its turn
    failing["on"] = False
    await redis.zadd(keys.QUEUE, dict.fromkeys(heads, 0))
    await run_worker(slow)
    assert await redis.llen(keys.dropped("demo")) == 1  # type: ignore[misc]  # sync|async
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")
    assert await parked(api) == 0
