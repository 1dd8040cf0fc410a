"""A noisy neighbour cannot slow anyone else: a real worker process, slow receivers for
projB, a fast one for projA."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from redis.asyncio import Redis

from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import Receiver, all_records, serving, start_worker, until

SLOW_S = 4.0
SETTINGS = {  # a small worker, so that a few slow callbacks are a crowd
    "DISPATCHER_WORKER_MAX_JOBS": "20",  # a project alone holds 10 slots at most
    "DISPATCHER_MAX_PER_HOST": "8",
    "DISPATCHER_MAX_CONNECTIONS": "20",
    "DISPATCHER_TOTAL_TIMEOUT": "10",
    "DISPATCHER_JOB_TIMEOUT": "30",
}


@dataclass
class Held:
    """How many requests some receivers hold at once, and the most they held."""

    now: int = 0
    peak: int = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)


@dataclass
class Slow:
    """A receiver that answers after `SLOW_S`, counting what it holds at once, alone and
    with the others sharing its `crowd`."""

    base: str = ""
    held: int = 0
    peak: int = 0
    answered: list[float] = field(default_factory=list)
    crowd: Held = field(default_factory=Held)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.held += 1
        self.peak = max(self.peak, self.held)
        self.crowd.enter()
        try:
            await asyncio.sleep(SLOW_S)
        finally:
            self.held -= 1
            self.crowd.now -= 1
        self.answered.append(time.monotonic())
        return web.Response(text="slow")


@asynccontextmanager
async def slow_receiver(crowd: Held) -> AsyncIterator[Slow]:
    slow = Slow(crowd=crowd)
    async with serving(slow.handle) as base:
        slow.base = base
        yield slow


async def test_a_slow_neighbour_holds_only_its_share_and_the_victim_is_served_at_once(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """projB's event goes to 20 callbacks on two slow hosts (4 s each); the worker's
    connection pool (20) could hold them all. projA's 10 events, emitted while projB's
    requests are in flight, all arrive before the slow hosts have answered once: projB holds
    at most its share of the worker (10 of 20 slots) and 8 per host, the rest of its
    deliveries wait in the queue, and each is then made once, as attempt 1."""
    registry, both = Registry(redis), Held()
    async with slow_receiver(both) as one, slow_receiver(both) as two:
        slow_urls = [f"{slow.base}/b{i}" for slow in (one, two) for i in range(10)]
        for url in slow_urls:
            await registry.create("projB", url, Event.BUILD_END, Region.DEVNET)
        await registry.create("projA", receiver.url(), Event.BUILD_END, Region.DEVNET)
        log = tmp_path / "worker.log"
        workers.append(start_worker(settings.redis_url or "", log, **SETTINGS))
        producer = Producer(settings, redis)
        await producer.emit("projB", "BUILD_END", {}, event_id="noisy")

        async def crowded() -> bool:
            return one.held + two.held >= 8

        await until(crowded, 20, "projB's requests in flight")
        for n in range(10):
            await producer.emit("projA", "BUILD_END", {"n": n}, event_id=f"victim-{n}")
            await asyncio.sleep(0.05)
        await receiver.wait_for(10, within=SLOW_S * 3)
        victim_done = max(seen.at for seen in receiver.requests())
        first_slow_answer = min(one.answered + two.answered, default=float("inf"))
        assert victim_done < first_slow_answer, "projA waited for projB's slow receivers"
        assert one.peak <= 8 and two.peak <= 8, (one.peak, two.peak)
        assert both.peak <= 10, both.peak  # projB's share of the worker's 20

        async def neighbour_done() -> bool:
            ended = [await all_records(redis, settings, url, "projB") for url in slow_urls]
            return all(ended)

        await until(neighbour_done, 60, "every projB delivery recorded")
    for url in slow_urls:
        [record] = await all_records(redis, settings, url, "projB")
        assert record.status.value == "SUCCESS" and record.attempt == 1, record
    assert all(w.poll() is None for w in workers), log.read_text()[-3000:]


async def test_a_slow_neighbour_on_a_host_the_victim_calls_too_leaves_it_a_slot(
    settings: Settings, redis: Redis, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A shared host (a SaaS one, say): projB's event goes to 10 callbacks on its slow
    paths (4 s each), projA's to its fast path, the same host and port. projB alone there
    holds 7 of the host's 8 slots (an eighth kept for the next project), so projA's
    events, emitted while projB's requests are in flight, arrive before the slow paths
    have answered once (projB held all 8, and its queued attempts got the freed ones
    first); projB's other deliveries wait, each made once, as attempt 1."""
    slow, fast = Slow(), Receiver()

    async def either(request: web.Request) -> web.StreamResponse:
        return await (slow.handle if request.path.startswith("/slow") else fast.handle)(request)

    registry = Registry(redis)
    async with serving(either) as base:
        slow_urls = [f"{base}/slow/b{i}" for i in range(10)]
        for url in slow_urls:
            await registry.create("projB", url, Event.BUILD_END, Region.DEVNET)
        await registry.create("projA", f"{base}/fast", Event.BUILD_END, Region.DEVNET)
        log = tmp_path / "worker.log"
        workers.append(start_worker(settings.redis_url or "", log, **SETTINGS))
        producer = Producer(settings, redis)
        await producer.emit("projB", "BUILD_END", {}, event_id="noisy")

        async def crowded() -> bool:
            return slow.held >= 7

        await until(crowded, 20, "projB's requests in flight")
        for n in range(3):
            await producer.emit("projA", "BUILD_END", {"n": n}, event_id=f"victim-{n}")
        await fast.wait_for(3, "/fast", within=SLOW_S * 3)
        victim_done = max(seen.at for seen in fast.requests("/fast"))
        assert victim_done < min(slow.answered, default=float("inf")), "projA waited"
        assert slow.peak <= 7, slow.peak

        async def neighbour_done() -> bool:
            return all([await all_records(redis, settings, url, "projB") for url in slow_urls])

        await until(neighbour_done, 60, "every projB delivery recorded")
    for url in slow_urls:
        [record] = await all_records(redis, settings, url, "projB")
        assert record.status.value == "SUCCESS" and record.attempt == 1, record
    assert all(w.poll() is None for w in workers), log.read_text()[-3000:]


async def test_projects_arriving_in_turn_leave_the_next_one_a_connection(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Four projects' events go to 20 slow callbacks each (4 s, five hosts of their own),
    emitted one after another, then projA's 3 events to its fast receiver. Each share is
    reckoned as its project arrives: before, the four were admitted 10 + 6 + 5 + 4 = 25
    attempts on the 20 connections, and the last ones, projA's with them, waited in the
    connection pool (on their own total timeout) for the slow answers. Now each arrival
    holds at most half of what the others left: all four are in flight within the pool, and
    projA's arrive before any slow receiver has answered."""
    registry, crowd = Registry(redis), Held()
    noisy = ["evil1", "evil2", "evil3", "evil4"]
    async with AsyncExitStack() as stack:
        slows = {p: [await stack.enter_async_context(slow_receiver(crowd)) for _ in range(5)]
                 for p in noisy}  # fmt: skip
        for project in noisy:
            for slow in slows[project]:
                for i in range(4):
                    await registry.create(project, f"{slow.base}/x{i}", Event.BUILD_END,
                                          Region.DEVNET)  # fmt: skip
        await registry.create("projA", receiver.url(), Event.BUILD_END, Region.DEVNET)
        log = tmp_path / "worker.log"
        workers.append(start_worker(settings.redis_url or "", log, **SETTINGS))
        producer = Producer(settings, redis)
        for project in noisy:
            await producer.emit(project, "BUILD_END", {}, event_id=f"noisy-{project}")
            if project == noisy[0]:

                async def crowded() -> bool:
                    return crowd.now >= 8

                await until(crowded, 20, "evil1's requests in flight")
            await asyncio.sleep(0.5)  # its attempts admitted (those its share has room for)
        held = {p: sum(slow.held for slow in slows[p]) for p in noisy}
        for n in range(3):
            await producer.emit("projA", "BUILD_END", {"n": n}, event_id=f"victim-{n}")
        await receiver.wait_for(3, within=SLOW_S * 3)
        victim_done = max(seen.at for seen in receiver.requests())
        answered = [at for p in noisy for slow in slows[p] for at in slow.answered]
        assert victim_done < min(answered, default=float("inf")), "projA waited for a connection"
        assert all(held.values()) and sum(held.values()) <= 20, held
    assert all(w.poll() is None for w in workers), log.read_text()[-3000:]
