"""How many projects the fleet serves late, as the API exports it for the queue's critical
alert (dispatcher/lateness.py, deploy/prometheus/alerts.yml), over a real Redis and real
burst workers: one project's old backlog beside a project served at once is 1 late project
of 2, not a fleet that is late; and a flooding project whose fan-outs several workers
claim counts once across the fleet, as each project does (on a Redis Cluster too)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher import lateness
from dispatcher import queue as queue_module
from dispatcher.clock import now_ms
from dispatcher.keys import Keys
from dispatcher.lateness import Noted, add
from dispatcher.lua import run_pipeline
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.shards import gauges
from dispatcher.shards.router import Router
from dispatcher.worker import create_worker, duties
from tests.cluster import LocalCluster, grown
from tests.helpers import Receiver, RunWorker, make_settings


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def fleet() -> tuple[float | None, ...]:
    """The fleet's projects seen, late over 60 s, late over 600 s."""
    late = "dispatcher_queue_projects_late"
    seen = gauge("dispatcher_queue_projects_seen")
    return seen, gauge(late, over="60"), gauge(late, over="600")


async def emit(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, project: str, ago_s: int
) -> None:
    """An event of `project`, its fan-out queued `ago_s` seconds ago (held back as fair
    share holds a flood: due all along)."""
    queued_at = now_ms() - ago_s * 1000
    with monkeypatch.context() as patched:
        patched.setattr(queue_module, "now_ms", lambda: queued_at)
        await Producer(settings, redis).emit(project, "BUILD_END", {})


async def register(redis: Redis, receiver: Receiver, *projects: str) -> None:
    for project in projects:
        url = receiver.url(f"/{project}")
        await Registry(redis).create(project, url, Event.BUILD_END, Region.DEVNET)


async def test_one_projects_old_backlog_counts_one_late_project_of_two(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flooding project's fan-outs queued 12 minutes ago and a quiet project's queued
    now, run by a real burst worker: the oldest due job is the flooder's, and the fleet's
    gauges count 2 projects seen, 1 of them late over 60 s and over 600 s; no Redis command
    was added to a delivery's way for it (the job's bytes carry its enqueue time; the
    worker adds its projects with its heartbeat, or on its way out)."""
    await register(redis, receiver, "flood", "quiet")
    for _ in range(3):
        await emit(settings, redis, monkeypatch, "flood", 720)
    await emit(settings, redis, monkeypatch, "quiet", 0)
    due, oldest_s = await Queue(redis, Keys(settings.queue_name)).depth()
    assert due == 4 and oldest_s > 600

    await run_worker()
    assert len(receiver.requests("/flood")) == 3 and len(receiver.requests("/quiet")) == 1
    async with Router.open(settings, redis) as router:
        await gauges.fleet_gauges(router)
    assert fleet() == (2, 1, 1)


async def test_a_worker_whose_clock_is_six_minutes_ahead_counts_by_redis_clock(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real burst worker whose host clock is 6 minutes ahead claims a fan-out queued
    now: the fleet saw 1 project, none late. By its own clock it waited 6 minutes, late
    over 60 s, and was added to a window ahead of the one the API reads: 0 seen (review)."""
    await register(redis, receiver, "skewed")
    await emit(settings, redis, monkeypatch, "skewed", 0)
    ahead = lambda: now_ms() + 360_000  # noqa: E731
    monkeypatch.setattr(lateness, "now_ms", ahead)
    monkeypatch.setattr(duties, "now_ms", ahead)
    await run_worker()
    monkeypatch.undo()
    assert len(receiver.requests("/skewed")) == 1
    async with Router.open(settings, redis) as router:
        await gauges.fleet_gauges(router)
    assert fleet() == (1, 0, 0)


async def test_a_flooder_several_workers_serve_counts_once_across_the_fleet(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two real burst workers each claim fan-outs of the flooding project (queued 12
    minutes ago) and of a quiet project of their own (queued now): the fleet saw 3
    projects, 1 of them late. Each worker's own counts summed over the workers read 4 and
    2, a majority late (review: 10 workers, one flooder, 6 quiet projects read 10 late of
    16 and paged)."""
    await register(redis, receiver, "flood", "quiet-1", "quiet-2")
    for quiet in ("quiet-1", "quiet-2"):
        await emit(settings, redis, monkeypatch, "flood", 720)
        await emit(settings, redis, monkeypatch, quiet, 0)
        await run_worker()  # a worker of its own
    assert len(receiver.requests("/flood")) == 2
    async with Router.open(settings, redis) as router:
        await gauges.fleet_gauges(router)
    assert fleet() == (3, 1, 1)


async def test_the_fleets_counts_are_read_on_a_redis_cluster(redis_cluster: LocalCluster) -> None:
    """On a Redis Cluster the home shard's keys share its hash tag: a worker's adds and the
    API's read of two windows together (one `PFCOUNT`) go to its one slot."""
    redis_cluster.flush()
    settings = await grown(make_settings(redis_cluster.url, redis_cluster_shards=4))
    noted = Noted()
    for project, waited_ms in (("flood", 700_000), ("quiet", 0)):
        noted.note(project, waited_ms)
    async with Router.open(settings) as router:
        home, taken, now = router.home, noted.take(), now_ms()
        await run_pipeline(home.redis, lambda pipe: add(pipe, home.keys, taken, now))
        await gauges.fleet_gauges(router)
    assert fleet() == (2, 1, 1)


async def test_a_heartbeat_adds_the_projects_noted_since_the_last_one(
    settings: Settings, redis: Redis
) -> None:
    """A running worker adds what it noted with each heartbeat (no burst's last words)."""
    worker = create_worker(settings, redis=redis, handle_signals=False)
    try:
        worker.duties.noted.note("late", 700_000)
        await worker.duties.heartbeat()
        worker.duties.noted.note("quiet", 0)
        await worker.duties.heartbeat()
        assert worker.duties.noted.take() == {"seen": set(), "late:60": set(), "late:600": set()}
    finally:
        await worker.close()
    async with Router.open(settings, redis) as router:
        await gauges.fleet_gauges(router)
    assert fleet() == (2, 1, 1)
