"""Ordered delivery under faults, on real processes: many builds, each emitting its steps in
order, interleaved with the other builds'; a receiver that fails every delivery's first
attempt (the first three of a build's first step) and answers after a random delay; two
workers, each SIGKILLed once and replaced, Redis paused (SIGSTOP) for longer than a lease,
and Redis SIGKILLed and restarted (AOF `always`) while events are emitted. Two callbacks
get the same events: one `orderBy=buildId`, one unordered. On the ordered one, each build's
first successful arrivals are in emit order; on the unordered one the same check fails
(so it can); on both nothing is lost. The events are over 1 KiB, so each one's body is
kept once for its parked deliveries and retries (`dispatcher.bodies`): every request
carries its event's whole data, and no body kept for the lanes is left at the end.

And a worker paused past its lease while a lane's head is in flight there leaves the head's
lane to the worker that took its job: the next delivery starts after the head's answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.connections import REDIS_ERRORS, connect
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from tests import helpers
from tests.faults.chaos import Answer, FlakyReceiver, all_records, judge, serving
from tests.faults.test_chaos import PROJECT, fleet, quiesce
from tests.helpers import make_settings

keys = Keys()

pytestmark = pytest.mark.timeout(120)

BUILDS, STEPS = 24, 8
PAD = "x" * 1_100  # over 1 KiB: an event's body is kept once for its deliveries' jobs
ENV = {
    "DISPATCHER_LEASE_SECONDS": "2",
    "DISPATCHER_CIRCUIT_THRESHOLD": "100000",  # the receiver fails half the attempts
    "DISPATCHER_RETRY_SCHEDULE": "[0.1, 0.2, 0.3, 0.5]",
}


@dataclass
class FirstFails(FlakyReceiver):
    """Answers 500 to the first request of every delivery (the first three of a build's
    step 0, so that its retries end well after step 1's), 200 to the next ones, each after
    0 to `max_delay` seconds; keeps the successful requests' (path, build, step) in the
    order they arrived."""

    tried: dict[str, int] = field(default_factory=dict)
    arrivals: list[tuple[str, str, int]] = field(default_factory=list)
    bodies_whole: bool = True  # every request carried its event's whole data

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived = _ms()
        delivery_id = request.headers["X-DEVOPS-DELIVERY-ID"]
        try:
            data = orjson.loads(await request.read())["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):  # sent without its body
            self.bodies_whole = False
            return web.Response(status=400)
        event = delivery_id.split(":", 1)[1].rpartition(".")[0]  # e{step}-{build}: its own
        self.bodies_whole &= (
            data.get("log") == PAD and event == f"e{data['step']}-{data['buildId'][1:]}"
        )
        tries = self.tried[delivery_id] = self.tried.get(delivery_id, 0) + 1
        status = 200 if tries > (3 if data["step"] == 0 else 1) else 500
        if status == 200:
            self.arrivals.append((request.path, data["buildId"], data["step"]))
        await asyncio.sleep(self.rng.uniform(0, self.max_delay))
        self.answers.append(Answer(delivery_id, arrived, _ms(), status))
        return web.Response(status=status)

    def out_of_order(self, path: str) -> list[str]:
        """Builds whose first successful arrivals at `path` are not in emit order."""
        firsts: dict[str, list[int]] = {}
        for where, build, step in self.arrivals:
            steps = firsts.setdefault(build, [])
            if where == path and step not in steps:
                steps.append(step)
        return sorted(build for build, steps in firsts.items() if steps != sorted(steps))


def pause(pid: int, seconds: float) -> None:
    """SIGSTOP a process, then SIGCONT it `seconds` later (blocking: run in a thread)."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)


def _ms() -> int:
    return time.time_ns() // 1_000_000


async def test_each_build_arrives_in_order_through_kills_a_paused_and_a_restarted_redis(
    tmp_path: Path,
) -> None:
    receiver = FirstFails(max_delay=0.03, seed=21)
    async with serving(receiver), fleet(tmp_path, 2, **ENV) as crew:
        settings = make_settings(crew.url, emit_wait=15)
        redis = connect(settings)
        try:
            registry = Registry(redis)
            ordered, _ = await registry.create(
                PROJECT, receiver.url("/ordered"), Event.BUILD_END, Region.DEVNET,
                options=Options(order_by="buildId"),
            )  # fmt: skip
            plain, _ = await registry.create(
                PROJECT, receiver.url("/plain"), Event.BUILD_END, Region.DEVNET
            )
            await crew.ready(redis)
            shared = 0  # lane copies seen while the events came
            events = [(step, build) for step in range(STEPS) for build in range(BUILDS)]
            faults = {
                2 * BUILDS: lambda: crew.kill_worker(0),
                3 * BUILDS: lambda: pause(crew.server.pid, 2.5),  # past the 2 s lease
                4 * BUILDS: lambda: crew.restart_redis(signal.SIGKILL, 0.5),
                6 * BUILDS: lambda: crew.kill_worker(0),
            }
            async with Producer(settings) as producer:
                for start in range(0, len(events), BUILDS // 2):
                    if start in faults:
                        await asyncio.to_thread(faults[start])
                    batch = events[start : start + BUILDS // 2]
                    await producer.emit_many([
                        (PROJECT, "BUILD_END", {"buildId": f"b{b}", "step": s, "log": PAD},
                         f"e{s}-{b}")
                        for s, b in batch
                    ])  # fmt: skip
                    await asyncio.sleep(0.05)
                    with contextlib.suppress(*REDIS_ERRORS):  # (Redis paused or restarting)
                        shared += len(await redis.keys(f"{keys.BODY_PREFIX}:lane:*"))
            await quiesce(redis, settings, within=30)
            assert all(crew.alive()), "a worker died"
            for path, callback in (("/ordered", ordered), ("/plain", plain)):
                expected = {f"{PROJECT}:e{s}-{b}.{callback}" for s, b in events}
                url = receiver.url(path)
                records = await all_records(redis, settings, PROJECT, url, "BUILD_END")
                mine = [a for a in receiver.answers if a.delivery_id.endswith(f".{callback}")]
                answered = FlakyReceiver(answers=mine)  # what this callback's receiver saw
                verdict = await judge(redis, records, expected, answered, settings)
                verdict.assert_nothing_lost()
            assert receiver.out_of_order("/ordered") == []
            # the same events, unordered: the check above can fail (each build's step 0
            # succeeds about 0.6 s after it is emitted, step 1 about 0.2 s)
            assert receiver.out_of_order("/plain") != []
            assert not await redis.keys(f"{keys.LANE_PREFIX}*"), "a lane was left behind"
            # each event's body was kept once for its lanes, and the last one out took it
            assert receiver.bodies_whole, "a request came without its event's body"
            assert not await redis.keys(f"{keys.BODY_PREFIX}:lane:*"), "a lane's body was left"
            assert shared > 0, "no body was kept for the lanes"
        finally:
            await redis.aclose()


@dataclass
class SlowHead:
    """A lane's receiver: the `first` worker's attempt of step 0 is answered (400, final)
    only once that worker was paused past its lease (`stopped`), the `second`'s after 4 s;
    keeps each request's (sender, step, monotonic time) as it arrives and as it is answered."""

    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    at_first: asyncio.Event = field(default_factory=asyncio.Event)
    at_second: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: list[tuple[str, int, float]] = field(default_factory=list)
    answered: list[tuple[str, int, float]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sender = request.headers["User-Agent"]
        step = orjson.loads(await request.read())["data"]["step"]
        self.arrived.append((sender, step, time.monotonic()))
        status = 200
        if (sender, step) == ("first", 0):
            self.at_first.set()
            await self.stopped.wait()
            status = 400  # final: FAILED, written by a worker whose lease went to another
        elif (sender, step) == ("second", 0):
            self.at_second.set()
            await asyncio.sleep(4)
        self.answered.append((sender, step, time.monotonic()))
        return web.Response(status=status)

    def head_answered(self) -> bool:
        return any(a[:2] == ("second", 0) for a in self.answered)


@pytest.mark.timeout(90)
async def test_a_worker_paused_past_its_lease_leaves_the_head_to_its_new_holder(
    settings: Settings, redis: Redis, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A worker SIGSTOPped while a lane's head is in flight there, past its 2 s lease: a
    second worker takes the head's job and sends it again; the first, woken, has its final
    answer and writes its record, but leaves the lane to the second (its release finds the
    lease the second's), so step 1 starts only after the second's attempt was answered
    (the README: delivery n+1 of a lane starts only after delivery n has ended). It was
    sent at once by the first worker, 4 s before the head's answer (review)."""
    receiver, env = (
        SlowHead(),
        {**ENV, "DISPATCHER_TOTAL_TIMEOUT": "10", "DISPATCHER_JOB_TIMEOUT": "120"},
    )
    async with helpers.serving(receiver.handle) as base:
        url = f"{base}/hook"
        await Registry(redis).create(
            "demo", url, Event.BUILD_END, Region.DEVNET, "t", options=Options(order_by="buildId")
        )
        redis_url, logs = settings.redis_url or "", tmp_path
        first = helpers.start_worker(
            redis_url, logs / "1.log", **env, DISPATCHER_USER_AGENT="first"
        )
        workers.append(first)
        await Producer(settings, redis).emit_many(
            [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(2)]
        )
        await asyncio.wait_for(receiver.at_first.wait(), 30)
        first.send_signal(signal.SIGSTOP)
        receiver.stopped.set()
        second = helpers.start_worker(
            redis_url, logs / "2.log", **env, DISPATCHER_USER_AGENT="second"
        )
        workers.append(second)
        await asyncio.wait_for(receiver.at_second.wait(), 30)
        first.send_signal(signal.SIGCONT)

        async def step_1_answered() -> bool:
            return receiver.head_answered() and any(a[1] == 1 for a in receiver.answered)

        await helpers.until(step_1_answered, 30, "the head answered and step 1 sent")
        await helpers.until(lambda: _no_lane(redis), 10, "the lane released")
        records = await helpers.all_records(redis, settings, url)
    events = sorted({(r.event_id, r.final) for r in records})
    assert events == [("e0", True), ("e1", True)], events  # the head twice at most: no loss
    head_answered = next(t for s, n, t in receiver.answered if (s, n) == ("second", 0))
    step_1 = [(s, t) for s, n, t in receiver.arrived if n == 1]
    assert len(step_1) == 1, step_1
    assert step_1[0][1] > head_answered, "step 1 was sent while step 0 was still in flight"


async def _no_lane(redis: Redis) -> bool:
    return not await redis.keys(f"{keys.LANE_PREFIX}*")
