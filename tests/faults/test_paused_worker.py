"""A worker paused (SIGSTOP) past its lease, then resumed, beside another worker: real
processes, a real receiver."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import all_records, serving, start_worker, stop, until

pytestmark = pytest.mark.timeout(150)  # two workers' start and 60 requests on a loaded machine

SETTINGS = {
    "DISPATCHER_LEASE_SECONDS": "2",
    "DISPATCHER_WORKER_MAX_JOBS": "8",  # 4 attempts at once: the chunk takes seconds
    "DISPATCHER_TOTAL_TIMEOUT": "5",
    # past the longest pause the test may make (its 60 s wait for the second worker): a
    # run's timeout that lapses in the pause fires as it wakes (job.failed, not job_left)
    "DISPATCHER_JOB_TIMEOUT": "120",
}


async def test_a_worker_resumed_past_its_lease_sends_nothing_it_no_longer_holds(
    settings: Settings, redis: Redis, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The first worker is paused 8 requests into an event's 60 callbacks (0.3 s each),
    its lease of 2 s lapses, the second worker takes the event on; once the second is
    sending, the first resumes. It may finish the requests it had sent (the second sends
    them again: they had no record), but what it sends after it resumed is only what it
    claims anew, never what the second sends too (nor puts it off to the queue for a job of
    its own); it lives on; every callback ends in a SUCCESS record. What it sent is read
    once it has stopped (SIGTERM: its running requests end first)."""
    seen: list[tuple[str, str, float]] = []  # the sender's User-Agent, delivery id, when

    async def answer(request: web.Request) -> web.StreamResponse:
        # when its head came: a request whose body the worker wrote as it woke (its head
        # before the pause) was sent before it all the same
        sender, delivery = request.headers["User-Agent"], request.headers["X-DEVOPS-DELIVERY-ID"]
        seen.append((sender, delivery, time.monotonic()))
        await request.read()
        await asyncio.sleep(0.3)
        return web.Response(text="ok")

    registry, redis_url = Registry(redis), settings.redis_url or ""
    async with serving(answer) as base:
        urls = [f"{base}/c{i}" for i in range(60)]
        for url in urls:
            await registry.create("demo", url, Event.BUILD_END, Region.DEVNET)
        first = start_worker(redis_url, tmp_path / "first.log", **SETTINGS,
                             DISPATCHER_USER_AGENT="first")  # fmt: skip
        workers.append(first)
        await Producer(settings, redis).emit("demo", "BUILD_END", {}, event_id="e1")

        def sent_by(agent: str) -> list[float]:
            return [at for sender, _, at in seen if sender == agent]

        async def first_busy() -> bool:
            return len(sent_by("first")) >= 8

        await until(first_busy, 60, "the first worker sending")
        first.send_signal(signal.SIGSTOP)
        workers.append(start_worker(redis_url, tmp_path / "second.log", **SETTINGS,
                                    DISPATCHER_USER_AGENT="second"))  # fmt: skip

        async def second_busy() -> bool:
            return len(sent_by("second")) >= 4

        await until(second_busy, 60, "the second worker taking the event on")
        first.send_signal(signal.SIGCONT)
        resumed = time.monotonic()

        async def all_delivered() -> bool:
            return all([await all_records(redis, settings, url, "demo") for url in urls])

        await until(all_delivered, 90, "every callback recorded")
        alive = first.poll() is None
        await asyncio.to_thread(stop, first)  # whatever it would still send, it has sent
    sends = Counter(delivery for _, delivery, _ in seen)
    again = [d for sender, d, at in seen if sender == "first" and at > resumed and sends[d] > 1]
    assert again == [], f"after it resumed, the first worker sent {len(again)} the second sent"
    for url in urls:
        records = await all_records(redis, settings, url, "demo")
        assert any(r.status.value == "SUCCESS" for r in records), (url, records)
    log = (tmp_path / "first.log").read_text()
    assert alive, log[-3000:]
    assert '"worker.job_left"' in log and '"job.failed"' not in log, log[-3000:]  # left, as is
