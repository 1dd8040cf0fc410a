"""One shard's Redis frozen (SIGSTOP) under a worker process serving two shards: the other
shard's claims and leases go on as if it were alone. (redis-py waits a frozen Redis out
for its socket timeout, four times over: ~20 s with the default 5 s.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as sync_redis
from aiohttp import web

from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.router import Router
from tests.cluster import grown
from tests.helpers import Overlap, Receiver, make_settings, start_worker, until

EVENTS = 40
# lease 4 s, Redis timeout 2 s (the defaults' 10 s and 5 s, halved); a request may take 8 s
SLOW_RECEIVER = {
    "DISPATCHER_LEASE_SECONDS": "4",
    "DISPATCHER_REDIS_TIMEOUT": "2",
    "DISPATCHER_TOTAL_TIMEOUT": "10",
    "DISPATCHER_JOB_TIMEOUT": "30",
}


async def test_a_frozen_shard_holds_up_no_claim_of_another(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """Shard 0 is frozen under a worker serving both shards (8 jobs at once: claims of 2
    jobs a shard, in turn); 40 events are then queued on shard 1. Every one is delivered
    while shard 0 is still frozen. (Before: each turn's claim on shard 0 held the loop up
    ~20 s, so shard 1 got a claim of 2 jobs per ~20 s.)"""
    urls, settings = await _two_shards(shard_servers)
    env = _env(urls, DISPATCHER_WORKER_MAX_JOBS="8")
    async with Router.open(settings) as router, Producer(settings) as producer:
        on_1 = await _project_on(router, 1, receiver.url("/one"))
        workers.append(start_worker(urls[0], tmp_path / "worker.log", **env))
        await producer.emit(on_1, "BUILD_END", {"n": -1})
        await receiver.wait_for(1, "/one", within=20)  # the worker claims on both shards
        with _frozen(shard_servers[0]):
            await producer.emit_many([(on_1, "BUILD_END", {"n": n}) for n in range(EVENTS)])

            async def all_sent() -> bool:
                return len(receiver.requests("/one")) >= EVENTS + 1

            await until(all_sent, 15, f"shard 1's {EVENTS} events sent, shard 0 frozen")
    delivered = {seen.headers["X-DEVOPS-DELIVERY-ID"] for seen in receiver.requests("/one")}
    assert len(delivered) == EVENTS + 1


async def test_a_frozen_shard_lets_no_lease_lapse_on_another(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A worker serving both shards holds a job on each (their receivers answer in 8 s);
    a second worker serves shard 1 alone. Shard 0 is frozen (lease 4 s, Redis timeout 2 s:
    the defaults' 10 s and 5 s, halved). The first worker's lease on shard 1 holds: the
    second never takes its job, and its delivery is sent once. (Before: the renewals went
    shard after shard, shard 1's waited ~10 s behind shard 0's, its lease lapsed and the
    second worker sent the delivery again 4 s in.)"""
    urls, settings = await _two_shards(shard_servers)
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 8)
        return web.Response(text="ok")

    env = _env(urls, **SLOW_RECEIVER)
    async with Router.open(settings) as router, Producer(settings) as producer:
        on_0 = await _project_on(router, 0, receiver.script("/zero", slow))
        on_1 = await _project_on(router, 1, receiver.script("/one", slow))
        first = start_worker(urls[0], tmp_path / "first.log", **env, DISPATCHER_USER_AGENT="first")
        workers.append(first)
        await producer.emit_many([(on_0, "BUILD_END", {}), (on_1, "BUILD_END", {})])
        await receiver.wait_for(1, "/zero", within=20)
        await receiver.wait_for(1, "/one", within=20)  # both jobs held by the first
        second_log = tmp_path / "second.log"
        second = {"DISPATCHER_WORKER_SHARDS": "[1]", "DISPATCHER_USER_AGENT": "second"}
        workers.append(
            start_worker(urls[0], second_log, **env, **second, DISPATCHER_LOG_LEVEL="INFO")
        )

        async def second_claiming() -> bool:
            return second_log.exists() and '"worker.started"' in second_log.read_text()

        await until(second_claiming, 20, "the second worker claiming on shard 1")
        with _frozen(shard_servers[0]):
            ended = router.shards[1].redis

            async def over() -> bool:  # the job ended, or was sent again
                done = not await ended.exists(router.shards[1].keys.QUEUE)
                return done or len(receiver.requests("/one")) > 1

            await until(over, 20, "shard 1's job ended, shard 0 frozen")
            release.set()
    senders = [seen.headers["User-Agent"] for seen in receiver.requests("/one")]
    assert senders == ["first"], senders


@pytest.mark.parametrize("job_timeout", ["5", "60"])
async def test_a_frozen_shards_jobs_filling_the_slots_hold_up_no_other_shard(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    job_timeout: str,
) -> None:
    """A worker of 4 slots serving both shards (no fair share: one host may take every
    slot) runs 4 jobs of shard 0 (8 projects' events, their receiver answers in 2 s) when
    shard 0 is frozen; 10 events are then queued on shard 1. The 4 attempts are answered
    and wait for their records' writes, a second in flight: their slots go to shard 1
    (job timeout 60 s); or the 4 runs time out first (5 s) and their put-backs wait for
    shard 0, their slots given up. Shard 1's 10 events are delivered while shard 0 is still
    frozen. Once it resumes, shard 0's 8 events are delivered, each once (no job was run
    again). (Before: a running job kept its slot until its job timeout, 30 s by default,
    and a failed run until its put-back landed, so shard 0's 4 jobs kept them all: 0 of
    the 10 sent in 20 s, either way.)"""
    urls, settings = await _two_shards(shard_servers)
    held = Overlap(2.0)
    env = _env(urls, DISPATCHER_WORKER_MAX_JOBS="4", DISPATCHER_FAIR_SHARE="false",
               DISPATCHER_TOTAL_TIMEOUT="3", DISPATCHER_JOB_TIMEOUT=job_timeout)  # fmt: skip
    async with Router.open(settings) as router, Producer(settings) as producer:
        zero = receiver.script("/zero", held.handle)
        on_0 = [p for p in (f"p{n}" for n in range(200)) if router.of(p).shard.index == 0][:8]
        for project in on_0:
            registration = Registration(project, zero, Region.DEVNET, "t")
            await router.of(project).register(registration, "BUILD_END")
        on_1 = await _project_on(router, 1, receiver.url("/one"))
        workers.append(start_worker(urls[0], tmp_path / "worker.log", **env))
        await producer.emit(on_1, "BUILD_END", {"n": -1})
        await receiver.wait_for(1, "/one", within=20)
        await producer.emit_many([(project, "BUILD_END", {}) for project in on_0])

        async def every_slot() -> bool:  # each of the 4: a job of shard 0 sending
            return held.now == 4

        await until(every_slot, 20, "4 of shard 0's jobs sending at once")
        with _frozen(shard_servers[0]):
            await producer.emit_many([(on_1, "BUILD_END", {"n": n}) for n in range(10)])

            async def all_sent() -> bool:
                return len(receiver.requests("/one")) >= 11

            await until(all_sent, 20, "shard 1's 10 events sent, shard 0 frozen")
        queue = router.shards[0].redis

        async def ended() -> bool:
            return not await queue.exists(router.shards[0].keys.QUEUE)

        await until(ended, 60, "shard 0's jobs ended once it resumed")
    sent = [seen.headers["X-DEVOPS-DELIVERY-ID"] for seen in receiver.requests("/zero")]
    assert len(sent) == len(set(sent)) == 8, sent


async def test_a_frozen_shards_waiting_writes_hold_up_no_other_shard(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A worker of 4 slots (16 writes may wait; no fair share: the fan-out's attempts go
    at once) runs a fan-out of 40 callbacks on shard 0 (their receiver answers in 2 s) when
    shard 0 is frozen: once answered, the 40 attempts' writes wait for it. 10 events then
    queued on shard 1 are delivered meanwhile: a shard's claims stop on its own waiting
    writes only. (Before: the writes waiting on every shard were added up, and shard 0's
    40 stopped the claims of both: 0 of the 10 sent in 15 s.)"""
    urls, settings = await _two_shards(shard_servers)
    held = Overlap(2.0)
    env = _env(urls, DISPATCHER_WORKER_MAX_JOBS="4", DISPATCHER_FAIR_SHARE="false")
    async with Router.open(settings) as router, Producer(settings) as producer:
        fan = receiver.script("/fan", held.handle)
        on_0 = await _project_on(router, 0, fan)
        for n in range(1, 40):
            registration = Registration(on_0, f"{fan}?n={n}", Region.DEVNET, "t")
            await router.of(on_0).register(registration, "BUILD_END")
        on_1 = await _project_on(router, 1, receiver.url("/one"))
        workers.append(start_worker(urls[0], tmp_path / "worker.log", **env))
        await producer.emit(on_1, "BUILD_END", {"n": -1})
        await receiver.wait_for(1, "/one", within=20)
        await producer.emit(on_0, "BUILD_END", {})
        await receiver.wait_for(40, "/fan", within=20)  # every attempt sent
        with _frozen(shard_servers[0]):

            async def answered() -> bool:
                return held.now == 0

            await until(answered, 10, "the fan-out's 40 attempts answered")
            await asyncio.sleep(0.5)  # their writes queued (for shard 0)
            await producer.emit_many([(on_1, "BUILD_END", {"n": n}) for n in range(10)])

            async def all_sent() -> bool:
                return len(receiver.requests("/one")) >= 11

            await until(all_sent, 15, "shard 1's 10 events sent, shard 0's writes waiting")
    delivered = {seen.headers["X-DEVOPS-DELIVERY-ID"] for seen in receiver.requests("/one")}
    assert len(delivered) == 11


async def _two_shards(shard_servers: list[EmbeddedRedis]) -> tuple[list[str], Settings]:
    """Both shards emptied and in use; the test's own processes refresh no placement."""
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return urls, await grown(make_settings(urls[0], redis_shards=urls, placement_refresh=60))


def _env(urls: list[str], **extra: str) -> dict[str, str]:
    return {"DISPATCHER_REDIS_SHARDS": json.dumps(urls), **extra}


async def _project_on(router: Router, shard: int, url: str) -> str:
    """A project placed on `shard`, with a callback to `url` for BUILD_END."""
    projects = (f"p{n}" for n in range(100))
    project = next(p for p in projects if router.of(p).shard.index == shard)
    await router.of(project).register(Registration(project, url, Region.DEVNET, "t"), "BUILD_END")
    return project


@contextmanager
def _frozen(server: EmbeddedRedis) -> Iterator[None]:
    """`server` stopped (SIGSTOP) for the block, then resumed, whatever happens."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)
