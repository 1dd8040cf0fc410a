"""One project's failing callbacks hide no other project's from the operators: a real
worker delivers to real receivers that refuse, then the three views are read as operators
read them (`dispatcher callbacks failing`, `dispatcher status`, the console's status)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    answer,
    app_client,
    make_settings,
    start_worker,
    stop,
    until,
)

keys = Keys()  # today's key names (one shard)


async def test_a_projects_callbacks_failing_for_good_hide_no_other_projects(
    receiver: Receiver,
    api: httpx.AsyncClient,
    run_worker: RunWorker,
    redis: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Project evil registers 1,000 callbacks on a host answering 400 and emits once:
    1,000 final failures that stay (until each is deleted or enabled). Project victim's
    callback then fails twice, more than any of evil's. The listing shows victim's callback
    and every view counts 1,001 failing callbacks of 2 projects. Before, the three views
    read the 1,000 oldest entries: victim was left out of all of them, and the count said
    1000 (review)."""
    registry = Registry(redis)
    for n in range(1000):
        url = receiver.script(f"/e{n}", answer(400))
        await registry.create("evil", url, Event.BUILD_END, Region.DEVNET)
    victim, _ = await registry.create(
        "victim", receiver.script("/v", answer(400)), Event.BUILD_END, Region.DEVNET
    )
    emitted = await api.post(
        "/apigw/v4/projects/evil/events", json={"event": "BUILD_END", "data": {}}, headers=UID
    )
    assert emitted.status_code == 200
    await run_worker()
    for _ in range(2):
        emitted = await api.post(
            "/apigw/v4/projects/victim/events",
            json={"event": "BUILD_END", "data": {}},
            headers=UID,
        )
        assert emitted.status_code == 200
    await run_worker()
    assert len(receiver.requests("/v")) == 2

    monkeypatch.setenv("DISPATCHER_REDIS_URL", str(settings.redis_url))
    cli = CliRunner()
    listed = await asyncio.to_thread(cli.invoke, app, ["callbacks", "failing"])
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"│ victim\s+│ {victim}\s+│ 2 ", listed.output), listed.output
    assert "│ evil " in listed.output and "995 more" in listed.output
    assert "1001 failing callbacks, of 2 projects" in listed.output
    status = await asyncio.to_thread(cli.invoke, app, ["status"])
    assert re.search(r"│ callbacks failing\s+│ 1001 ", status.output), status.output
    page = await api.get("/console/status", headers=UID)
    assert "<dt>Callbacks failing</dt><dd>1001 (of 2 projects)</dd>" in page.text


async def test_a_full_redis_fails_no_start_over_the_failing_index(tmp_path: Path) -> None:
    """A shard as the version before left it (an entry of the failing set not yet indexed
    by project) and full (`maxmemory`, `noeviction`): a worker and the API start all the
    same, the index left to the sweep; once there is room, a start indexes it. The index's
    refusal (-OOM) raised out of the worker's start, which exited 1, and out of the API's
    (review)."""
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        settings = make_settings(server.url)
        redis = connect(settings)
        registry = Registry(redis)
        await registry.upgrade()  # the layout current
        cid, _ = await registry.create(
            "demo", "https://demo.example/", Event.BUILD_END, Region.DEVNET
        )
        await redis.hset(keys.health(cid), mapping={"failures": 2, "since": 1})  # type: ignore[misc]
        await redis.zadd(keys.HEALTH_FAILING, {str(cid): 1})
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used)
        log = tmp_path / "worker.log"
        worker = start_worker(server.url, log)
        try:

            async def postponed_or_exited() -> bool:
                text = log.read_text() if log.exists() else ""
                return "health.failing_index_postponed" in text or worker.poll() is not None

            await until(postponed_or_exited, 30, "the worker's start over")
            assert worker.poll() is None, log.read_text()[-2000:]
            async with app_client(settings, redis) as api:
                assert (await api.get("/healthz")).status_code == 200
            assert not await redis.zcard(keys.failing_of("demo"))
            await redis.config_set("maxmemory", 0)  # the operator makes room
            async with app_client(settings, redis):
                assert await redis.zrange(keys.failing_of("demo"), 0, -1) == [str(cid).encode()]
        finally:
            stop(worker)
            await redis.config_set("maxmemory", 0)
            await redis.aclose()
