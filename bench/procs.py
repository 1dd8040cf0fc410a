"""The bench's child processes, seen from the orchestrator: the receiver, workers, load
generators. Every wait is bounded; every process started here is stopped here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from bench.common import BENCH_DIR, cpu_seconds, free_port, rss_kb

PYTHON = sys.executable
ROOT = BENCH_DIR.parent


class BenchError(RuntimeError):
    """A scenario could not be measured (a child failed or timed out)."""


async def _spawn(
    args: list[str],
    stderr: IO[bytes] | int | None = asyncio.subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PYTHON,
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=env,
    )


async def _stop(process: asyncio.subprocess.Process, within: float = 10.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _read_json(process: asyncio.subprocess.Process, within: float) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), within)
    except TimeoutError:
        await _stop(process)
        raise BenchError(f"child {process.pid} gave no result within {within:.0f}s") from None
    if not line:
        await process.wait()
        raise BenchError(f"child {process.pid} exited ({process.returncode}) without a result")
    value: dict[str, Any] = orjson.loads(line)
    return value


async def get_json(port: int, path: str) -> dict[str, Any]:
    """GET http://127.0.0.1:PORT/PATH on a connection of its own; the JSON body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    value: dict[str, Any] = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    return value


@dataclass
class Receiver:
    """The receiver process (bench/receiver.py) on 127.0.0.1."""

    process: asyncio.subprocess.Process | None = None
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *, delay_ms: int = 0) -> None:
        """Start it; with `delay_ms`, every answer is held back that long (a slow host)."""
        self.process = await _spawn(["-m", "bench.receiver", "--delay-ms", str(delay_ms)])
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 15)
        if not line.startswith(b"PORT "):
            raise BenchError(f"receiver did not start: {line!r}")
        self.port = int(line.split()[1])

    async def stop(self) -> None:
        if self.process is not None:
            await _stop(self.process)
            self.process = None

    async def control(self, path: str) -> dict[str, Any]:
        return await get_json(self.port, path)

    async def reset(self, *, latency: bool = False) -> None:
        await self.control("/_reset?latency=1" if latency else "/_reset")

    async def stats(self) -> dict[str, Any]:
        return await self.control("/_stats")

    async def wait_count(self, count: int, within: float) -> dict[str, Any]:
        """Poll until the receiver has seen `count` requests (or `within` s have passed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            stats = await self.stats()
            if stats["count"] >= count or loop.time() > deadline:
                return stats
            await asyncio.sleep(0.05)


@dataclass
class WorkerProcess:
    """One bench/worker_proc.py child, started but waiting for GO."""

    process: asyncio.subprocess.Process
    log: IO[bytes] | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(
        cls,
        redis_url: str,
        *,
        kind: str = "dispatcher",
        burst: bool = True,
        log_level: str = "WARNING",
        log_path: Path | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        args = ["-m", "bench.worker_proc", "--redis-url", redis_url, "--kind", kind]
        args += ["--log-level", log_level, *(extra or [])]
        if burst:
            args.append("--burst")
        log = log_path.open("wb") if log_path else None
        environ = {**os.environ, **env} if env else None
        process = await _spawn(args, stderr=log or asyncio.subprocess.DEVNULL, env=environ)
        worker = cls(process, log)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if line.strip() != b"READY":
            await worker.kill()
            raise BenchError(f"worker did not start: {line!r}")
        return worker

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    def go(self) -> None:
        self._send("GO")

    def stop(self) -> None:
        self._send("STOP")

    async def finish(self, within: float) -> dict[str, Any]:
        """The worker's JSON result (burst: when the queue is empty; else after stop())."""
        try:
            self.result = await _read_json(self.process, within)
        finally:
            await self.kill()
        return self.result

    async def kill(self) -> None:
        await _stop(self.process)
        if self.log is not None:
            self.log.close()
            self.log = None


@dataclass
class ApiProcess:
    """`python -m dispatcher api` (uvicorn under uvloop, as a user runs it) on a free port
    of 127.0.0.1, with default settings but the log level."""

    process: asyncio.subprocess.Process
    port: int
    log: IO[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, redis_url: str, log_path: Path, **env: str) -> ApiProcess:
        port = free_port()
        environ = {
            **os.environ, "DISPATCHER_REDIS_URL": redis_url, "DISPATCHER_API_HOST": "127.0.0.1",
            "DISPATCHER_API_PORT": str(port), "DISPATCHER_LOG_LEVEL": "WARNING",
            "DISPATCHER_EMIT_PROJECT_RATE": "0",  # the routes' speed, one project sending all
            **env,
        }  # fmt: skip
        log = log_path.open("wb")
        process = await _spawn(["-m", "dispatcher", "api"], stderr=log, env=environ)
        api = cls(process, port, log)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (await get_json(port, "/readyz")).get("data") == "ready":
                    return api
            if process.returncode is not None or loop.time() > deadline:
                await api.stop()
                raise BenchError(f"the API did not start; see {log_path}")
            await asyncio.sleep(0.1)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    async def stop(self) -> None:
        await _stop(self.process)
        self.log.close()


async def run_loadgen(mode: str, args: list[str], within: float) -> dict[str, Any]:
    """Run bench/loadgen.py MODE ... in its own process; returns its JSON result."""
    process = await _spawn(["-m", "bench.loadgen", mode, *args], stderr=None)
    try:
        return await _read_json(process, within)
    finally:
        await _stop(process)
