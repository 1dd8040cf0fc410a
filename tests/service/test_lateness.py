"""How late each project's fan-outs are claimed, as the workers export it for the queue's
critical alert: one project's old backlog beside a project served at once is 1 late
project of 2, not a fleet that is late (deploy/prometheus/alerts.yml)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher import queue as queue_module
from dispatcher.clock import now_ms
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.worker.lateness import LATENESS
from tests.helpers import Receiver, RunWorker


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.fixture(autouse=True)
def _fresh_lateness() -> Iterator[None]:
    """The process's lateness (one per worker process) starts empty: other tests' workers
    ran in this process."""
    LATENESS.clear()
    yield
    LATENESS.clear()


async def test_one_projects_old_backlog_counts_one_late_project_of_two(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flooding project's fan-outs queued 12 minutes ago (held back as fair share holds a
    flood: due all along) and a quiet project's queued now, run by a real burst worker:
    the oldest due job is the flooder's, and the worker's gauges count 2 projects seen, 1
    of them late over 60 s and over 600 s; no Redis command was added for it (the job's
    bytes carry its enqueue time)."""
    registry = Registry(redis)
    for project in ("flood", "quiet"):
        await registry.create(project, receiver.url(f"/{project}"), Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    queued_at = now_ms() - 720_000
    with monkeypatch.context() as patched:
        patched.setattr(queue_module, "now_ms", lambda: queued_at)
        for n in range(3):
            await producer.emit("flood", "BUILD_END", {"n": n})
    await producer.emit("quiet", "BUILD_END", {})
    due, oldest_s = await Queue(redis, Keys(settings.queue_name)).depth()
    assert due == 4 and oldest_s > 600

    await run_worker()
    assert len(receiver.requests("/flood")) == 3 and len(receiver.requests("/quiet")) == 1
    assert gauge("dispatcher_worker_projects_seen") == 2
    assert gauge("dispatcher_worker_projects_late", over="600") == 1
    assert gauge("dispatcher_worker_projects_late", over="60") == 1
