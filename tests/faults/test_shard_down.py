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

import redis as sync_redis
from aiohttp import web

from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.router import Router
from tests.cluster import grown
from tests.helpers import Receiver, make_settings, start_worker, until

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
