"""One project's failing callbacks hide no other project's from the operators: a real
worker delivers to real receivers that refuse, then the three views are read as operators
read them (`dispatcher callbacks failing`, `dispatcher status`, the console's status)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, RunWorker, answer


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
