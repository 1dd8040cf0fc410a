"""Redis faults under real worker processes: paused longer than the job timeout, restarted
after SIGTERM and after SIGKILL (AOF `always`), and a chaos run that adds killed and paused
workers and a flaky receiver. Each run ends with the same verdict: no delivery lost or
abandoned, no 2xx recorded as a failure, no delivered webhook without a record, and every
worker process still alive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from dispatcher.api import create_app
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.models import Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.status import live_workers
from tests.faults.chaos import FlakyReceiver, Verdict, all_records, judge, serving
from tests.helpers import UID, make_settings, start_worker, stop, until

keys = Keys()  # today's key names (one shard)

pytestmark = pytest.mark.timeout(150)

PROJECT = "chaos"
PAD = "x" * 1_500


@dataclass
class Fleet:
    """A Redis that can be paused, killed and restarted on its port, and worker processes."""

    tmp: Path
    env: dict[str, str]
    server: EmbeddedRedis
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    replaced: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = start_worker(self.url, self.tmp / "workers.log", **self.env)
        self.workers.append(worker)
        return worker

    def kill_worker(self, index: int) -> None:
        """SIGKILL one worker and start another in its place."""
        victim = self.workers.pop(index)
        victim.kill()
        victim.wait(timeout=5)
        self.replaced.append(victim)
        self.start_worker()

    def restart_redis(self, how: signal.Signals, down_s: float) -> None:
        port = self.server.port
        if how is signal.SIGKILL:
            os.kill(self.server.pid, signal.SIGKILL)
        self.server.stop()  # SIGTERM: AOF flushed, clean exit; after SIGKILL: reaps it
        time.sleep(down_s)
        self.server = EmbeddedRedis(self.tmp / "redis", port=port, appendfsync="always")
        self.server.start()

    def alive(self) -> list[bool]:
        return [worker.poll() is None for worker in self.workers]

    async def ready(self, redis: Redis) -> None:
        """Until every worker has said it is alive (process start-up takes seconds)."""

        async def all_up() -> bool:
            return len(await live_workers(redis, keys)) >= len(self.workers)

        await until(all_up, 30, "every worker started")


@asynccontextmanager
async def fleet(tmp: Path, workers: int, **env: str) -> AsyncIterator[Fleet]:
    server = EmbeddedRedis(tmp / "redis", appendfsync="always")
    server.start()
    crew = Fleet(tmp, env, server)
    try:
        for _ in range(workers):
            crew.start_worker()
        yield crew
    finally:
        for worker in crew.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
            stop(worker)
        crew.server.stop()


async def quiesce(redis: Redis, settings: Settings, within: float) -> None:
    """Until the queue is empty twice a second apart (deferred retries included)."""
    deadline = time.monotonic() + within
    empty_in_a_row = 0
    while empty_in_a_row < 2:
        if time.monotonic() > deadline:
            left = await redis.zrange(settings.queue_name, 0, 9, withscores=True)
            leases = [await redis.get(f"arq:in-progress:{m.decode()}") for m, _ in left]
            raise AssertionError(f"the queue never emptied: {left} leased by {leases}")
        await asyncio.sleep(1)
        try:
            empty_in_a_row = (
                empty_in_a_row + 1 if await redis.zcard(settings.queue_name) == 0 else 0
            )
        except (OSError, ConnectionError):
            empty_in_a_row = 0


async def register(redis: Redis, receiver: FlakyReceiver, paths: list[str]) -> dict[str, int]:
    registry = Registry(redis)
    ids = {}
    for path in paths:
        ids[path], _ = await registry.create(PROJECT, receiver.url(path), Event.BUILD_END,
                                             Region.DEVNET, "s3cret")  # fmt: skip
    return ids


async def emit_through_the_api(
    settings: Settings, redis: Redis, count: int, every_s: float
) -> list[str]:
    """`count` events through the real emit route, each retried (same event id) until the
    route takes it; returns the event ids. Each event's data is over 1 KiB, so that its
    retries share its body kept in Redis (`dispatcher.bodies`) through the faults."""
    app = create_app(settings, redis)
    ids = [f"evt_chaos_{i}" for i in range(count)]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as api:
            for event_id in ids:
                for _ in range(20):
                    answer = await api.post(
                        f"/apigw/v4/projects/{PROJECT}/events", headers=UID,
                        json={"event": "BUILD_END", "data": {"id": event_id, "pad": PAD},
                              "eventId": event_id},
                    )  # fmt: skip
                    if answer.status_code == 200:
                        break
                    assert answer.status_code == 503, answer.text
                else:
                    raise AssertionError(f"{event_id} was never taken")
                await asyncio.sleep(every_s)
    return ids


async def verdict_of(
    redis: Redis, settings: Settings, receiver: FlakyReceiver, paths: dict[str, int],
    event_ids: list[str],
) -> tuple[Verdict, list[HistoryRecord]]:  # fmt: skip
    records = [
        record
        for path in paths
        for record in await all_records(redis, settings, PROJECT, receiver.url(path), "BUILD_END")
    ]
    expected = {f"{PROJECT}:{event_id}.{cid}" for event_id in event_ids for cid in paths.values()}
    return await judge(redis, records, expected, receiver, settings), records


async def bodies_released(redis: Redis) -> int:
    """How many times a retry that ended gave back its reference to its event's kept body
    (`dispatcher.bodies`) since Redis started: the release script's `HLEN` calls (no other
    script calls it)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hlen", {}).get("calls", 0))


WORKER_ENV = {"DISPATCHER_LEASE_SECONDS": "3", "DISPATCHER_LOG_LEVEL": "INFO"}


async def at(started: float, second: float, action: Callable[[], None]) -> None:
    """Run a blocking fault `action` in a thread `second`s after `started`."""
    await asyncio.sleep(max(0.0, started + second - time.monotonic()))
    await asyncio.to_thread(action)


async def test_redis_paused_longer_than_the_job_timeout_loses_nothing(tmp_path: Path) -> None:
    """SIGSTOP Redis for 6 s under a worker whose job timeout is 3 s, with retries of 160
    deliveries in flight (80 events of over 1 KiB to two callbacks, so their retries share
    their bodies) to a receiver answering 500: each ends in a final FAILED record (arq's
    own worker deleted timed-out retry jobs: 46 of 80, to one callback, were lost)."""
    receiver = FlakyReceiver(fail=1.0, max_delay=0.5)
    env = {"DISPATCHER_JOB_TIMEOUT": "3", "DISPATCHER_RETRY_SCHEDULE": "[0.3, 0.3]",
           "DISPATCHER_CIRCUIT_THRESHOLD": "1000",
           "DISPATCHER_REDIS_TIMEOUT": "1"}  # fmt: skip
    async with serving(receiver), fleet(tmp_path, 1, **env) as crew:
        settings = make_settings(crew.url)
        redis = connect(settings)
        try:
            paths = await register(redis, receiver, ["/hook", "/hook-2"])  # bodies shared
            await crew.ready(redis)
            events = [(PROJECT, "BUILD_END", {"n": i, "id": f"evt_pause_{i}", "pad": PAD},
                       f"evt_pause_{i}") for i in range(80)]  # fmt: skip
            ids = await Producer(settings, redis).emit_many(events)
            deadline = time.monotonic() + 20
            while len(receiver.answers) < 100:  # the first attempts, then retries in flight
                assert time.monotonic() < deadline, "the worker never got going"
                await asyncio.sleep(0.02)
            os.kill(crew.server.pid, signal.SIGSTOP)
            await asyncio.sleep(6)
            os.kill(crew.server.pid, signal.SIGCONT)
            await quiesce(redis, settings, within=60)
            verdict, records = await verdict_of(redis, settings, receiver, paths, ids)
            verdict.assert_nothing_lost(tmp_path / "workers.log")
            assert await bodies_released(redis) > 0  # the retries shared their events' bodies
            finals = {r.delivery_id for r in records if r.final and r.status.value == "FAILED"}
            assert finals == verdict.expected, verdict.summary()
            assert crew.alive() == [True], (tmp_path / "workers.log").read_text()[-3000:]
        finally:
            await redis.aclose()


async def under_faults(
    crew: Fleet, receiver: FlakyReceiver, faults: list[tuple[float, Callable[[], None]]],
    count: int, every_s: float,
) -> tuple[Verdict, list[HistoryRecord]]:  # fmt: skip
    """Two callbacks, `count` events through the emit route while `faults` happen (each at
    its second), then the verdict once the queue is empty."""
    settings = make_settings(crew.url, emit_wait=15)
    redis = connect(settings)
    try:
        paths = await register(redis, receiver, ["/a", "/b"])
        await crew.ready(redis)
        started = time.monotonic()
        happening = asyncio.gather(*(at(started, second, fault) for second, fault in faults))
        ids = await emit_through_the_api(settings, redis, count=count, every_s=every_s)
        await happening
        await quiesce(redis, settings, within=60)
        return await verdict_of(redis, settings, receiver, paths, ids)
    finally:
        await redis.aclose()


async def test_redis_restarts_under_workers_and_the_api_lose_nothing(tmp_path: Path) -> None:
    """Redis stopped with SIGTERM, then killed with SIGKILL (AOF `always`), each time
    restarted after a second, under two workers and the emit route: every worker lives on
    (arq's died in 3 runs of 8), nothing is lost, and no 2xx is recorded as a failure."""
    receiver = FlakyReceiver(max_delay=0.1)
    async with serving(receiver), fleet(tmp_path, 2, **WORKER_ENV) as crew:
        faults = [
            (2.0, lambda: crew.restart_redis(signal.SIGTERM, 1.0)),
            (5.0, lambda: crew.restart_redis(signal.SIGKILL, 1.0)),
        ]
        verdict, _ = await under_faults(crew, receiver, faults, count=80, every_s=0.08)
        verdict.assert_nothing_lost(tmp_path / "workers.log")
        assert crew.alive() == [True, True], (tmp_path / "workers.log").read_text()[-3000:]


async def test_chaos_workers_killed_and_paused_redis_restarted_flaky_receiver(
    tmp_path: Path,
) -> None:
    """About 40 s: three workers, two of them SIGKILLed and one SIGSTOPped for 6 s; Redis
    restarted after SIGTERM and after SIGKILL; a receiver that answers 500 one time in
    five, resets one connection in twenty and takes up to 300 ms."""
    receiver = FlakyReceiver(fail=0.2, reset=0.05, max_delay=0.3)
    env = {**WORKER_ENV, "DISPATCHER_RETRY_SCHEDULE": "[0.2, 0.5, 1, 1, 1, 1]"}
    async with serving(receiver), fleet(tmp_path, 3, **env) as crew:
        paused: list[subprocess.Popen[bytes]] = []

        def pause_a_worker() -> None:
            paused.append(crew.workers[-1])
            paused[0].send_signal(signal.SIGSTOP)

        faults = [
            (2.0, lambda: crew.kill_worker(0)),
            (4.0, lambda: crew.restart_redis(signal.SIGTERM, 1.0)),
            (7.0, pause_a_worker),
            (9.0, lambda: crew.kill_worker(0)),
            (11.0, lambda: crew.restart_redis(signal.SIGKILL, 1.5)),
            (13.0, lambda: paused[0].send_signal(signal.SIGCONT)),
            (15.0, lambda: crew.kill_worker(1)),
        ]
        verdict, records = await under_faults(crew, receiver, faults, count=150, every_s=0.1)
        verdict.assert_nothing_lost(tmp_path / "workers.log")
        redis = connect(make_settings(crew.url))
        try:  # since the last restart: the emits go on 4 s past it, 1 in 4 retried
            assert await bodies_released(redis) > 0
        finally:
            await redis.aclose()
        assert all(crew.alive()), (tmp_path / "workers.log").read_text()[-3000:]
        assert len(verdict.ended) == 300 and len(records) >= 300
