"""Failure modes, each with real processes: a worker killed mid-delivery, Redis restarted
under a running worker and API, receivers that misbehave at the socket level."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.api import create_app
from dispatcher.clock import now_ms
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    answer,
    hang,
    make_settings,
    start_worker,
    stop,
    until,
)

keys = Keys()  # today's key names (one shard)


async def test_worker_killed_mid_delivery_loses_nothing(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.Response(text="ok")

    url = receiver.script("/hook", slow)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    ids = await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"n": i}) for i in range(40)]
    )
    log = tmp_path / "workers.log"
    lease = {"DISPATCHER_LEASE_SECONDS": "2"}
    workers.append(start_worker(settings.redis_url or "", log, **lease))
    await receiver.wait_for(5, within=20)
    workers[0].send_signal(signal.SIGKILL)  # mid-delivery: the receiver has not answered yet
    workers[0].wait(timeout=5)
    history = RedisHistory(redis, settings, keys)
    now = now_ms()

    async def successes() -> set[str | None]:
        page = await history.query("demo", url, "BUILD_END", start_ms=now - 120_000,
                                   end_ms=now + 60_000, page_size=100)  # fmt: skip
        return {r.event_id for r in page.records if r.status.value == "SUCCESS"}

    assert len(await successes()) < 40, "the worker finished before it could be killed"
    killed = time.monotonic()
    workers.append(start_worker(settings.redis_url or "", log, **lease))

    async def all_recorded() -> bool:
        return await successes() == set(ids)

    # the killed worker's leases lapse within 2 s; its jobs run again on the new worker
    await until(all_recorded, 30, "a SUCCESS record for every event")
    assert time.monotonic() - killed < 15  # within leases, not job timeouts
    # at least once, never under another id: repeats share the delivery id
    by_id: dict[str, set[bytes]] = {}
    for s in receiver.requests():
        by_id.setdefault(s.headers["webhook-id"], set()).add(s.body)
    assert len(by_id) == 40 and all(len(bodies) == 1 for bodies in by_id.values())


async def test_redis_restart_under_running_worker_and_api(
    tmp_path: Path, receiver: Receiver, workers: list[subprocess.Popen[bytes]]
) -> None:
    """The worker's claims fail while Redis is down (a dozen times: its backoff grows to
    2 s), said once as the outage begins, and once as it ends (a line each time: review)."""
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    url = server.start()
    port = server.port
    settings = make_settings(url)
    pool = connect(settings)
    try:
        await Registry(pool).create("demo", receiver.url(), Event.BUILD_END, Region.DEVNET)
        workers.append(start_worker(url, tmp_path / "worker.log", DISPATCHER_LOG_LEVEL="INFO"))
        app = create_app(settings, pool)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://d") as api:
                emit = "/apigw/v4/projects/demo/events"
                first = await api.post(emit, json={"event": "BUILD_END"}, headers=UID)
                assert first.json()["status"] == 0
                await receiver.wait_for(1, within=10)

                server.stop()
                assert (await api.get("/readyz")).status_code == 503
                down = await api.post(emit, json={"event": "BUILD_END"}, headers=UID)
                assert down.status_code == 503
                body = down.json()  # after waiting DISPATCHER_EMIT_WAIT (1 s here)
                assert (body["status"], body["data"]) == (503, None)
                assert "Redis is unreachable" in body["message"]
                assert "same event ids is safe" in body["message"]
                await asyncio.sleep(3)  # the worker polls a dead Redis meanwhile

                restarted = EmbeddedRedis(tmp_path / "redis", persist=True, port=port)
                restarted.start()
                try:
                    assert (await api.get("/readyz")).status_code == 200  # recovered
                    again = await api.post(emit, json={"event": "BUILD_END"}, headers=UID)
                    assert again.json()["status"] == 0, again.text
                    await receiver.wait_for(2, within=20)
                    assert workers[0].poll() is None, "the worker died instead of reconnecting"
                    stop(workers[0])
                finally:
                    restarted.stop()
        said = (tmp_path / "worker.log").read_text()
        assert said.count('"worker.claim_failed"') == 1, said
        assert said.count('"worker.claim_resumed"') == 1, said
    finally:
        await pool.aclose()


# ---- receivers misbehaving at the socket level ---------------------------------------------

# Starts a raw TCP server running the handler; returns its URL.
RawServer = Callable[[Callable[..., Awaitable[None]]], Awaitable[str]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    servers: list[asyncio.Server] = []

    async def start(handler: Callable[..., Awaitable[None]]) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()  # SO_LINGER 0: the close sends RST


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"this is not HTTP at all\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(("handler", "fragment"), [(reset, "reset"), (garbage, "not HTTP")])
async def test_receivers_that_reset_or_speak_garbage_are_recorded_and_retried(
    settings: Settings,
    redis: Redis,
    run_worker: RunWorker,
    raw_server: RawServer,
    handler: Callable[..., Awaitable[None]],
    fragment: str,
) -> None:
    url = await raw_server(handler)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        "demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 1000
    )
    assert page.count == settings.max_attempts  # retried like any connection failure
    for record in page.records:
        assert record.status.value == "FAILED" and record.response_code is None
        assert record.error_msg and fragment.lower() in record.error_msg.lower()


async def test_a_gigabyte_answer_does_not_grow_the_worker(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    async def gigabyte(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(1 << 30)})
        await response.prepare(request)
        chunk = b"y" * (1 << 20)
        try:
            for _ in range(1024):
                await response.write(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    url = receiver.script("/hook", gigabyte)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    tracemalloc.start()
    try:
        await run_worker()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB while reading a 1 GiB answer"
    now = now_ms()
    [record] = (
        await RedisHistory(redis, settings, keys).query(
            "demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 1000
        )
    ).records
    assert record.status.value == "SUCCESS" and "truncated" in (record.response_body or "")


@pytest.mark.timeout(240)  # each probe starts a Python process: seconds on a loaded machine
def test_worker_check_follows_the_loop_not_redis(tmp_path: Path) -> None:
    """`dispatcher-alive` (the liveness probe; `worker --check` is the same) passes while
    the worker's event loop turns,
    Redis paused included (a restart cures no Redis outage: the probe asked Redis before,
    and failed every pod through one), fails once the worker itself is paused, and at once
    after a clean stop (its mark removed). (A mark is made every 5 s and `--fresh` is 7:
    a loop late by 2 s fails one probe, so each passing probe is waited for.)"""
    marks = tmp_path / "tmp"
    marks.mkdir()
    env = {**os.environ, "TMPDIR": str(marks)}
    check = [str(Path(sys.executable).parent / "dispatcher-alive"), "--fresh", "7"]

    def passes() -> bool:
        return subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0

    def until(wanted: bool, what: str) -> None:
        deadline = time.monotonic() + 60
        while passes() is not wanted:
            assert time.monotonic() < deadline, what
            time.sleep(0.3)

    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        assert not passes()
        worker = start_worker(server.url, tmp_path / "w.log", TMPDIR=str(marks))
        try:
            until(True, "worker --check never saw the worker")
            os.kill(server.pid, signal.SIGSTOP)
            try:
                time.sleep(8)  # past --fresh: a probe that passes now saw a mark made meanwhile
                until(True, "the probe failed while only Redis was paused")
            finally:
                os.kill(server.pid, signal.SIGCONT)
            worker.send_signal(signal.SIGSTOP)
            try:
                until(False, "worker --check passed for a paused worker")
            finally:
                worker.send_signal(signal.SIGCONT)
            until(True, "worker --check did not see the worker resume")
        finally:
            stop(worker)
        assert not passes()  # a cleanly stopped worker removes its mark


@pytest.mark.timeout(150)  # a worker process's start alone may take 20 s on a loaded machine
async def test_sigterm_lets_running_deliveries_finish_and_loses_nothing(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A worker running one delivery at a time gets SIGTERM while the receiver holds its
    first request: that delivery finishes within the grace and is recorded, what the
    worker had not started stays queued, and a worker after it sends it. (Its grace and
    timeouts are long: bounds on a loaded machine.)"""
    signalled = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await signalled.wait()  # running when the signal comes
        await asyncio.sleep(0.5)  # and still as the worker begins to stop
        return web.Response(text="done")

    url = receiver.script("/hook", slow)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    ids = await Producer(settings, redis).emit_many([("demo", "BUILD_END", {})] * 3)
    held = {"DISPATCHER_WORKER_MAX_JOBS": "1", "DISPATCHER_SHUTDOWN_GRACE": "10",
            "DISPATCHER_TOTAL_TIMEOUT": "20", "DISPATCHER_JOB_TIMEOUT": "30"}  # fmt: skip
    workers.append(start_worker(settings.redis_url or "", tmp_path / "w.log", **held))
    await receiver.wait_for(1, within=60)
    workers[0].send_signal(signal.SIGTERM)
    signalled.set()
    await asyncio.to_thread(workers[0].wait, 60)
    assert workers[0].returncode == 0
    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    page = await history.query("demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 1000)
    started = {s.headers["X-DEVOPS-DELIVERY-ID"] for s in receiver.requests()}
    # what was running when the signal came finished and was recorded as a success
    assert {r.delivery_id for r in page.records if r.status.value == "SUCCESS"} == started
    assert len(started) < 3
    await run_worker()  # the rest was still queued
    assert {s.headers["X-DEVOPS-DELIVERY-ID"].split(".")[0] for s in receiver.requests()} == {
        f"demo:{i}" for i in ids
    }


async def test_sigterm_puts_back_at_once_what_the_grace_cuts_short(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    workers: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """The receiver holds the first request 5 s, past the worker's 0.5 s grace; leases
    last a minute, so only a put-back makes the job due again before the burst worker
    after it gives up (30 s): the same delivery, then a SUCCESS record."""
    url = receiver.script("/hook", hang(5), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    [event_id] = await Producer(settings, redis).emit_many([("demo", "BUILD_END", {})])
    held = {"DISPATCHER_SHUTDOWN_GRACE": "0.5", "DISPATCHER_LEASE_SECONDS": "60",
            "DISPATCHER_TOTAL_TIMEOUT": "10", "DISPATCHER_JOB_TIMEOUT": "20"}  # fmt: skip
    workers.append(start_worker(settings.redis_url or "", tmp_path / "w.log", **held))
    await receiver.wait_for(1, within=15)
    workers[0].send_signal(signal.SIGTERM)
    await asyncio.to_thread(workers[0].wait, 15)
    assert workers[0].returncode == 0
    await run_worker(make_settings(settings.redis_url or "", lease_seconds=60))
    sent = [s.headers["X-DEVOPS-DELIVERY-ID"] for s in receiver.requests()]
    assert len(sent) == 2 and sent[0] == sent[1] and sent[0].startswith(f"demo:{event_id}.")
    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    page = await history.query("demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 1000)
    assert [(r.delivery_id, r.status.value) for r in page.records] == [(sent[0], "SUCCESS")]
