"""`dispatcher run` as a newcomer uses it: embedded Redis, API, worker, one process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dispatcher.embedded import EmbeddedRedis
from tests.helpers import Receiver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_run_serves_the_seed_request_and_delivers(tmp_path: Path, receiver: Receiver) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(DISPATCHER_DATA_DIR=str(tmp_path / "data"), DISPATCHER_API_PORT=str(port))
    log = (tmp_path / "run.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "run", env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
                await asyncio.sleep(0.1)
            created = await client.post(
                "/apigw-user/v4/projects/demo/callbacks",
                params={"event": "BUILD_END", "region": "DEVNET", "secretToken": "s3cret",
                        "url": receiver.url()},
                headers={"Content-Type": "application/json", "X-DEVOPS-UID": "alice"},
            )  # fmt: skip
            assert created.json() == {"data": True, "message": None, "status": 0}
            listed = await client.get(
                "/apigw-user/v4/projects/demo/callbacks", headers={"X-DEVOPS-UID": "alice"}
            )
            assert listed.json()["data"]["records"][0]["url"] == receiver.url()
            console = await client.get("/console/projects/demo")  # a browser sends no uid
            assert console.status_code == 200 and receiver.url() in console.text
        emitted = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher", "emit", "--project", "demo",
            "--event", "BUILD_END", "--data", '{"buildId": "b-42"}',
            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(emitted.communicate(), 30)
        assert emitted.returncode == 0, stderr.decode()
        await receiver.wait_for(1, within=5)
        [seen] = receiver.requests()
        assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "s3cret"
        assert seen.body == b'{"event":"BUILD_END","projectId":"demo","data":{"buildId":"b-42"}}'
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert f"API on {base}" in output and "worker.stopped" in output
    assert EmbeddedRedis(tmp_path / "data").running_url() is None  # Redis stopped with it
