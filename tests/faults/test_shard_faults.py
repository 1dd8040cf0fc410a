"""A worker process serving two shards, SIGKILLed mid-delivery: nothing is lost on either."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import redis as sync_redis
from aiohttp import web

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.shards.router import Router
from tests.cluster import grown
from tests.helpers import Receiver, make_settings, start_worker, until

EVENTS_PER_PROJECT = 10


async def test_a_worker_killed_while_serving_two_shards_loses_nothing(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    settings = await grown(make_settings(urls[0], redis_shards=urls))

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    url = receiver.script("/hook", slow)
    async with Router.open(settings) as router:
        projects = _two_on_each_shard(router)
        for project in projects:
            registration = Registration(project, url, Region.DEVNET, "test", "t")
            await router.of(project).register(registration, "BUILD_END")
        async with Producer(settings) as producer:
            ids = await producer.emit_many(
                [(p, "BUILD_END", {"n": n}) for p in projects for n in range(EVENTS_PER_PROJECT)]
            )
        env = {"DISPATCHER_LEASE_SECONDS": "2", "DISPATCHER_REDIS_SHARDS": json.dumps(urls)}
        log = tmp_path / "workers.log"
        workers.append(start_worker(urls[0], log, **env))

        async def busy_on_both() -> bool:
            started = {_project_of(s.body) for s in receiver.requests()}
            return {router.of(p).shard.index for p in started} == {0, 1}

        await until(busy_on_both, 20, "requests of both shards' projects")
        workers[0].send_signal(signal.SIGKILL)  # mid-delivery (0.5 s each), on both shards
        workers[0].wait(timeout=5)
        assert len(await _succeeded(router, projects, url)) < len(ids), "finished too soon"
        workers.append(start_worker(urls[0], log, **env))
        killed = time.monotonic()

        async def every_event_recorded() -> bool:
            return await _succeeded(router, projects, url) == set(ids)

        await until(every_event_recorded, 40, "a SUCCESS record for every event, on its shard")
        assert time.monotonic() - killed < 30
    by_delivery: dict[str, set[bytes]] = {}
    for seen in receiver.requests():
        by_delivery.setdefault(seen.headers["webhook-id"], set()).add(seen.body)
    assert len(by_delivery) == len(ids)  # every delivery made, repeats under the same id
    assert all(len(bodies) == 1 for bodies in by_delivery.values())


def _two_on_each_shard(router: Router) -> list[str]:
    found: dict[int, list[str]] = {0: [], 1: []}
    for n in range(100):
        project = f"p{n}"
        on = found[router.of(project).shard.index]
        if len(on) < 2:
            on.append(project)
    return found[0] + found[1]


def _project_of(body: bytes) -> str:
    project: str = json.loads(body)["projectId"]
    return project


async def _succeeded(router: Router, projects: list[str], url: str) -> set[str | None]:
    """The events with a SUCCESS record, read from each project's own shard."""
    now = now_ms()
    found: set[str | None] = set()
    for project in projects:
        page = await router.of(project).history.query(
            project, url, "BUILD_END", start_ms=now - 120_000, end_ms=now + 60_000, page_size=100
        )
        found |= {r.event_id for r in page.records if r.status.value == "SUCCESS"}
    return found
