"""A callback's limits hold for the whole fleet: two worker processes share one
`maxPerSecond` and one `maxInFlight` (measured at the receiver), and a worker SIGKILLed
while it holds a slot does not hold it for ever."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis

from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from tests.faults.test_noisy_neighbour import SETTINGS, Held, slow_receiver
from tests.helpers import Overlap, Receiver, start_worker, until

keys = Keys()  # today's key names (one shard)
ARRIVAL_SLACK_S = 0.2  # the spread of start-to-arrival times the test tolerates


async def _register(redis: Redis, url: str, options: Options) -> int:
    callback_id, _ = await Registry(redis).create(
        "demo", url, Event.BUILD_END, Region.DEVNET, "t", options=options
    )
    return callback_id


async def _emit(settings: Settings, redis: Redis, count: int) -> None:
    await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"n": i}) for i in range(count)]
    )


async def test_a_rate_limit_holds_across_two_workers(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    arrivals: list[float] = []

    async def note(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.time())
        return web.Response(text="ok")

    url = receiver.script("/rated", note)
    await _register(redis, url, Options(max_per_second=4))
    for _ in range(2):
        workers.append(start_worker(settings.redis_url or "", tmp_path / "workers.log"))
    await _emit(settings, redis, 20)
    await receiver.wait_for(20, "/rated", within=30)
    # No one-second window holds more than 4 starts. The receiver sees arrivals, which
    # trail their starts by a varying few ms (more on a loaded machine): any 5 arrivals in a
    # row span at least a second, less that slack. Unlimited, all 20 land within ~0.1 s.
    spans = [later - first for first, later in zip(arrivals, arrivals[4:], strict=False)]
    assert min(spans) >= 1.0 - ARRIVAL_SLACK_S, [round(span, 3) for span in spans]
    assert arrivals[-1] - arrivals[0] >= 3.9  # 20 at 4 a second: 5 seconds' worth
    assert len(receiver.requests("/rated")) == 20  # each once: waiting spent no attempt


async def test_a_rate_limit_holds_at_the_receiver_while_the_project_holds_its_share(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The project's 10 slow requests (4 s) hold its share of a worker of 20 slots when its
    10 deliveries to a callback at `maxPerSecond` 2 come: each waits for a share first,
    and only then is its start taken, so they reach the receiver 2 a second still. Their
    starts were taken first, then each waited for a share (up to 5 s): the ones admitted
    over those seconds left together once the slow requests ended (10 in a second)."""
    arrivals: list[float] = []

    async def note(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.time())
        return web.Response(text="ok")

    registry, crowd = Registry(redis), Held()
    rated = receiver.script("/rated", *([note] * 10))
    async with slow_receiver(crowd) as one, slow_receiver(crowd) as two:
        for slow in (one, two):
            for i in range(5):
                await registry.create("demo", f"{slow.base}/s{i}", Event.BUILD_START,
                                      Region.DEVNET)  # fmt: skip
        await _register(redis, rated, Options(max_per_second=2))
        workers.append(start_worker(settings.redis_url or "", tmp_path / "w.log", **SETTINGS))
        await Producer(settings, redis).emit("demo", "BUILD_START", {}, event_id="slow")

        async def held() -> bool:
            return crowd.now >= 10  # the project's share: 20 // 2

        await until(held, 20, "the slow requests in flight")
        await _emit(settings, redis, 10)
        await receiver.wait_for(10, "/rated", within=30)
    spans = [later - first for first, later in zip(arrivals, arrivals[2:], strict=False)]
    assert min(spans) >= 1.0 - ARRIVAL_SLACK_S, [round(at - arrivals[0], 3) for at in arrivals]
    assert len(receiver.requests("/rated")) == 10  # each once: waiting spent no attempt


async def test_max_in_flight_holds_across_two_workers(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    overlap = Overlap(0.3)
    url = receiver.script("/slow", overlap.handle)
    callback_id = await _register(redis, url, Options(max_in_flight=3))
    for _ in range(2):
        workers.append(start_worker(settings.redis_url or "", tmp_path / "workers.log"))
    await _emit(settings, redis, 15)
    await receiver.wait_for(15, "/slow", within=30)
    assert overlap.most == 3, overlap.most
    await until(lambda: _empty(redis, keys.limits(callback_id)[1]), 5, "every slot given back")


async def test_a_killed_workers_slot_lapses(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def first_hangs(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 60)
        return web.Response(text="late")

    async def quick(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    url = receiver.script("/one", first_hangs, quick)
    callback_id = await _register(redis, url, Options(max_in_flight=1))
    log, lease = tmp_path / "workers.log", {"DISPATCHER_LEASE_SECONDS": "2"}
    workers.append(start_worker(settings.redis_url or "", log, **lease))
    await _emit(settings, redis, 1)
    await receiver.wait_for(1, "/one", within=20)  # the slot is taken, the request hangs
    assert await redis.zcard(keys.limits(callback_id)[1]) == 1
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=5)
    killed = time.monotonic()
    await _emit(settings, redis, 3)
    workers.append(start_worker(settings.redis_url or "", log, **lease))
    # the slot lapses (total timeout 2 s + 10 s), then the three go, one at a time, and the
    # killed worker's delivery is made again (same delivery id)
    await receiver.wait_for(5, "/one", within=25)
    assert time.monotonic() - killed > 4  # they waited for the slot; it was not just free
    release.set()
    await until(lambda: _empty(redis, keys.limits(callback_id)[1]), 5, "the slot given back")


async def _empty(redis: Redis, key: str) -> bool:
    return int(await redis.zcard(key)) == 0
