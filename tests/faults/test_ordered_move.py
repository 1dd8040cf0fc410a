"""Ordered delivery across a move between shards: a project whose lanes hold parked and
retrying deliveries moves to a new shard while its builds keep emitting; every build's
events still arrive in emit order, every one is recorded, and no lane of the project is
left behind on its old shard."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import pytest
import redis as sync_redis
from aiohttp import web

from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Region
from dispatcher.placement import rendezvous
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registration
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.worker import create_worker
from tests.helpers import Receiver, make_settings, until

pytestmark = pytest.mark.timeout(120)

PROJECT = next(f"lanes-{n}" for n in range(100) if rendezvous(f"lanes-{n}", 2) == 1)
BUILDS = 6


@dataclass
class FirstFails:
    """Answers 500 to each delivery's first request, 200 to the next, after 0-20 ms; keeps
    the successful requests' (build, step) in arrival order."""

    tried: set[str] = field(default_factory=set)
    arrivals: list[tuple[str, int]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = orjson.loads(await request.read())["data"]
        delivery_id = request.headers["X-DEVOPS-DELIVERY-ID"]
        await asyncio.sleep(self.rng.uniform(0, 0.02))
        if delivery_id not in self.tried:
            self.tried.add(delivery_id)
            return web.Response(status=500)
        self.arrivals.append((data["buildId"], data["step"]))
        return web.Response(text="ok")

    def out_of_order(self) -> list[str]:
        """Builds whose first successful arrivals are not in emit order."""
        firsts: dict[str, list[int]] = {}
        for build, step in self.arrivals:
            steps = firsts.setdefault(build, [])
            if step not in steps:
                steps.append(step)
        return sorted(build for build, steps in firsts.items() if steps != sorted(steps))


async def test_a_moved_project_keeps_its_lanes_order_and_loses_nothing(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    quick = {"placement_refresh": 0.05, "retry_schedule": (0.2, 0.2, 0.2, 0.2)}
    one = make_settings(urls[0], **quick)
    two = make_settings(urls[0], redis_shards=urls, **quick)
    answers = FirstFails()
    url = receiver.script("/ordered", answers.handle)
    async with Router.open(one) as router:
        ordered = Options(order_by="buildId")
        registration = Registration(PROJECT, url, Region.DEVNET, "t", options=ordered)
        await router.of(PROJECT).register(registration, "BUILD_END")
    worker = create_worker(two, poll_delay=0.01, handle_signals=False)
    delivering = asyncio.create_task(worker.main())
    emitted: list[str] = []
    try:
        step = await _emit_steps(two, emitted, 0, lambda step: step < 4)  # old shard's lanes
        async with Router.open(two) as router:
            mover = Mover(router, lambda _: None, settle_s=0.3, late_s=0.3)
            assert await mover.grow() == [PROJECT]
            moving = asyncio.create_task(mover.rebalance())
            # during the move (at most 16 steps: each lane delivers ~3 a second, one after
            # the other, so a slow move on a loaded machine must not make the lanes long)
            until_moved = step + 16
            step = await _emit_steps(
                two, emitted, step, lambda n: n < until_moved and not moving.done()
            )
            assert await moving == 1
            await _emit_steps(two, emitted, step, lambda n: n < step + 4)  # after the move
            await until(lambda: _all_succeeded(answers, emitted), 60, "every event delivered")
            old, new = router.shards
            assert [k async for k in old.redis.scan_iter(match=f"{old.keys.LANE_PREFIX}*")] == []
            assert await new.redis.exists(new.keys.lanes_hold(PROJECT)) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(delivering, 20)
        await worker.close()
    assert answers.out_of_order() == []
    assert len(answers.arrivals) >= len(emitted) > 12 * BUILDS, "the move took emits"


async def _emit_steps(
    settings: Settings, emitted: list[str], step: int, more: Callable[[int], bool]
) -> int:
    """Each step of every build from `step` while `more(step)` (one `emit_many` per step,
    the builds interleaved, a step every 50 ms) through a producer that reads the
    placements as the fleet does; returns the next step."""
    async with Producer(settings) as producer:
        while more(step) and step < 200:
            batch = [
                (PROJECT, "BUILD_END", {"buildId": f"b{b}", "step": step}, f"s{step}-b{b}")
                for b in range(BUILDS)
            ]
            emitted += await producer.emit_many(batch)
            await asyncio.sleep(0.05)
            step += 1
    return step


async def _all_succeeded(answers: FirstFails, emitted: list[str]) -> bool:
    arrived = {f"s{step}-{build}" for build, step in answers.arrivals}
    return arrived >= set(emitted)
