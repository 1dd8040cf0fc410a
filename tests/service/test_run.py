"""`dispatcher run` as a newcomer uses it: embedded Redis (and, when asked, an embedded
PostgreSQL history), API, worker, one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis
from dispatcher.keys import Keys
from tests.helpers import Receiver, free_port, make_settings, start_process, stop, until

keys = Keys()  # today's key names (one shard)

STARTS_WITHIN_S = 30
UID = {"X-DEVOPS-UID": "alice"}
HISTORY = "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history"


@dataclass
class Run:
    """A running `dispatcher run`: its API client, the environment it was given (for the
    CLI commands run beside it) and its output so far."""

    base: str
    client: httpx.AsyncClient
    env: dict[str, str]
    log: Path

    def output(self) -> str:
        return self.log.read_text()


async def _until_healthy(run: Run, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + STARTS_WITHIN_S
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await run.client.get("/healthz")).status_code == 200:
                return
        assert process.returncode is None, run.output()
        assert time.monotonic() < deadline, run.output()
        await asyncio.sleep(0.1)


def _environ(data_dir: Path, port: int, **env: str) -> dict[str, str]:
    """This process's environment but its DISPATCHER_* settings, with the data folder, the
    API port and `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    environ.update(DISPATCHER_DATA_DIR=str(data_dir), DISPATCHER_API_PORT=str(port), **env)
    return environ


def _logged(log: Path) -> str:
    return log.read_text()


@contextlib.asynccontextmanager
async def running(data_dir: Path, log: Path, **env: str) -> AsyncIterator[Run]:
    """`dispatcher run` in a subprocess, no DISPATCHER_* setting but its data folder, a free
    API port and `env`, until it answers /healthz; stopped with Ctrl+C (SIGINT)."""
    port = free_port()
    environ = _environ(data_dir, port, **env)
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher", "run", env=environ, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                run = Run(base, client, environ, log)
                await _until_healthy(run, process)
                yield run
        finally:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), STARTS_WITHIN_S)
            except TimeoutError:
                process.kill()
                raise AssertionError(
                    f"no stop within {STARTS_WITHIN_S} s of SIGINT:\n{_logged(log)}"
                ) from None


async def register_and_emit(run: Run, receiver: Receiver) -> None:
    """The README's Try it: the seed's registration request, then `dispatcher emit`; the
    receiver gets the signed event."""
    created = await run.client.post(
        "/apigw-user/v4/projects/demo/callbacks",
        params={"event": "BUILD_END", "region": "DEVNET", "secretToken": "s3cret",
                "url": receiver.url()},
        headers={"Content-Type": "application/json", **UID},
    )  # fmt: skip
    assert created.json() == {"data": True, "message": None, "status": 0}
    emitted = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "emit", "--project", "demo",
        "--event", "BUILD_END", "--data", '{"buildId": "b-42"}',
        env=run.env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(emitted.communicate(), STARTS_WITHIN_S)
    except TimeoutError:
        emitted.kill()
        raise AssertionError(f"`dispatcher emit` hung; the run's log:\n{run.output()}") from None
    assert emitted.returncode == 0, stderr.decode()
    await receiver.wait_for(1, within=5)
    [seen] = receiver.requests()
    assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "s3cret"
    assert seen.body == b'{"event":"BUILD_END","projectId":"demo","data":{"buildId":"b-42"}}'


async def test_run_serves_the_seed_request_and_delivers(tmp_path: Path, receiver: Receiver) -> None:
    async with running(tmp_path / "data", tmp_path / "run.log") as run:
        await register_and_emit(run, receiver)
        listed = await run.client.get("/apigw-user/v4/projects/demo/callbacks", headers=UID)
        assert listed.json()["data"]["records"][0]["url"] == receiver.url()
        console = await run.client.get("/console/projects/demo")  # a browser sends no uid
        assert console.status_code == 200 and receiver.url() in console.text
    output = run.output()
    assert f"API on {run.base}" in output and "worker.stopped" in output
    assert EmbeddedRedis(tmp_path / "data").running_url() is None  # Redis stopped with it


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder every user can reach: as root, PostgreSQL runs as `nobody`, who cannot
    reach pytest's tmp_path (0700)."""
    root = Path(tempfile.mkdtemp(prefix="dispatcher-run-pg-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(150)  # (past its own bounds, which say what the run logged; CI once hit 60)
async def test_run_with_an_embedded_postgresql_history_reads_it_from_postgresql(
    reachable_dir: Path, receiver: Receiver
) -> None:
    data = reachable_dir / "data"
    async with running(data, reachable_dir / "run.log", DISPATCHER_HISTORY_URL="embedded") as run:
        await register_and_emit(run, receiver)
        query = {"url": receiver.url(), "event": "BUILD_END"}

        async def shipped() -> bool:  # the worker ships records to PostgreSQL in batches
            page = await run.client.get(HISTORY, params=query, headers=UID)
            return bool(page.json()["data"]["count"])

        await until(shipped, 10, "the attempt's record is queryable")
        page = (await run.client.get(HISTORY, params=query, headers=UID)).json()["data"]
        [record] = page["records"]
        assert record["status"] == "SUCCESS" and record["callBackUrl"] == receiver.url()
        pg_url = EmbeddedPostgres(data_dir=data / "postgres").running_url()
        assert pg_url is not None, run.output()
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT id, delivery_id FROM history_attempts")
        finally:
            await conn.close()
        assert [(r["id"], r["delivery_id"]) for r in rows] == [(record["id"], record["deliveryId"])]
        redis_url = EmbeddedRedis(data).running_url()
        assert redis_url is not None
        redis = connect(make_settings(redis_url))
        try:  # the Redis store's record key was never written
            assert not await redis.exists(keys.history_record(record["id"]))
        finally:
            await redis.aclose()
    assert f"history: PostgreSQL {pg_url}  (embedded" in run.output()
    assert EmbeddedPostgres(data_dir=data / "postgres").running_url() is None  # stopped


async def test_a_run_whose_port_is_taken_stops_its_worker_and_exits(reachable_dir: Path) -> None:
    """uvicorn exits the process when it cannot bind its port (`sys.exit`, status 3).
    Raised in a task, that exit left the event loop at once and cancelled the worker in
    the middle of its stop; with the PostgreSQL history the process hung for good (review:
    a CI run whose port another test took). It exits with uvicorn's status, once its
    worker stopped, and its embedded servers stop with it."""
    data, log = reachable_dir / "data", reachable_dir / "run.log"
    with socket.socket() as taken, log.open("wb") as out:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        environ = _environ(data, taken.getsockname()[1], DISPATCHER_HISTORY_URL="embedded")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher", "run", env=environ, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            status = await asyncio.wait_for(process.wait(), STARTS_WITHIN_S)
        except TimeoutError:
            process.kill()
            raise AssertionError(f"hung:\n{_logged(log)}") from None
    assert status == 3, _logged(log)
    assert "address already in use" in _logged(log) and "worker.stopped" in _logged(log)
    assert EmbeddedRedis(data).running_url() is None
    assert EmbeddedPostgres(data_dir=data / "postgres").running_url() is None


@pytest.mark.parametrize("command", ["api", "run"])
async def test_a_stop_while_the_start_waits_for_the_home_shard_ends_the_process(
    tmp_path: Path, command: str
) -> None:
    """A process whose API is still starting (it waits for shard 0's placement as long as
    shard 0 takes) ends on SIGTERM, saying so, with no traceback. It waited for Redis: a
    stop, a rolling update, hung until SIGKILL (review)."""
    silent = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(2)]
    log = tmp_path / "out.log"
    process = start_process(
        [command], silent[0], log, DISPATCHER_REDIS_SHARDS=json.dumps(silent),
        DISPATCHER_API_PORT=str(free_port()), DISPATCHER_LOG_LEVEL="INFO",
    )  # fmt: skip
    try:

        async def waiting() -> bool:
            return "shards.placement_unread" in log.read_text()

        await until(waiting, STARTS_WITHIN_S, "its start waiting for shard 0")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, STARTS_WITHIN_S) == 0
    finally:
        stop(process)
    out = log.read_text()
    assert "api.stopped_while_starting" in out
    assert "Traceback" not in out
