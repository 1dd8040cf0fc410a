"""What tests share besides fixtures: settings, a real HTTP receiver, scripted answers,
worker processes, and bounded waits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import uvicorn
from aiohttp import web
from multidict import CIMultiDict
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from dispatcher.api import create_app
from dispatcher.batch import QueueCommands
from dispatcher.clock import now_ms
from dispatcher.history.redis import RedisHistory
from dispatcher.history.schema import upgrade
from dispatcher.history.shipper import Shipper
from dispatcher.keys import Keys
from dispatcher.serve import api_config
from dispatcher.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RunWorker = Callable[..., Awaitable[Any]]
UID = {"X-DEVOPS-UID": "alice"}


def make_settings(url: str, **overrides: Any) -> Settings:
    """Test settings: fast retries, short timeouts, loopback receivers allowed."""
    values: dict[str, Any] = {
        "redis_url": url,
        "allow_internal_regions": ["DEVNET", "OSS", "IDC"],
        "open_access": True,
        "retry_schedule": (0.05, 0.05, 0.05),
        "retry_jitter": 0,
        "connect_timeout": 1,
        "total_timeout": 2,
        "poll_delay": 0.01,
        "shutdown_grace": 1,
        "emit_wait": 1,
    }
    values.update(overrides)
    return Settings(**values)


async def all_records(
    redis: Redis, settings: Settings, url: str, project: str = "demo"
) -> list[Any]:
    """Every Redis history record of `url` (event BUILD_END, the last minute), oldest first."""
    now, page = now_ms(), 1
    found: list[Any] = []
    window = {"start_ms": now - 60_000, "end_ms": now + 1000, "page_size": 100}
    history = RedisHistory(redis, settings, Keys(settings.queue_name))
    while True:
        result = await history.query(project, url, "BUILD_END", page=page, **window)
        found += result.records
        if page >= result.total_pages:
            return list(reversed(found))
        page += 1


def on_postgres(url: str, what: str) -> None:
    """Outside any test's event loop (a thread of its own): `upgrade` the database at
    `url`, or `empty` its history tables (partitions and schema stay)."""

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            if what == "upgrade":
                await upgrade(conn)
            else:
                await conn.execute(
                    "TRUNCATE history_attempts, history_counts, history_pairs, history_shipped,"
                    " history_set_aside"
                )
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


async def ship_all(settings: Settings, redis: Redis, *, now_ms: int | None = None) -> int:
    """PostgreSQL history: ship everything the stream holds now (as a worker's shipper
    would); returns how many records were stored. Redis history: nothing to do."""
    if not settings.history_url:
        return 0
    shipper = Shipper(redis, settings, elect=False)
    await shipper.open()
    try:
        return await shipper.drain(now_ms=now_ms)
    finally:
        await shipper.close()


@asynccontextmanager
async def app_client(
    settings: Settings, redis: Redis, **client: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app for `settings` over ASGI, lifespan included, and a client of it."""
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://dispatcher", **client
        ) as api:
            yield api


@dataclass
class Seen:
    """One request a receiver got."""

    path: str
    headers: CIMultiDict[str]  # HTTP header names are case-insensitive
    body: bytes
    at: float


@dataclass
class Receiver:
    """A real aiohttp server on 127.0.0.1. Each path answers from its script (one handler
    per request, the last repeating); unscripted paths answer 200."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    scripts: dict[str, list[Handler]] = field(default_factory=dict)

    def url(self, path: str = "/hook") -> str:
        return self.base + path

    def script(self, path: str, *handlers: Handler) -> str:
        self.scripts[path] = list(handlers)
        return self.url(path)

    def requests(self, path: str = "/hook") -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def wait_for(self, count: int, path: str = "/hook", within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while len(self.requests(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(self.requests(path))} of {count} requests")
            await asyncio.sleep(0.01)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.path, CIMultiDict(request.headers), body, time.monotonic()))
        handlers = self.scripts.get(request.path)
        if not handlers:
            return web.Response(text="ok")
        handler = handlers.pop(0) if len(handlers) > 1 else handlers[0]
        return await handler(request)


def answer(status: int, body: str = "", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    return handler


@dataclass
class Overlap:
    """A handler answering 200 after `seconds`, counting how many requests it holds at
    once (`most`: the most it ever held)."""

    seconds: float
    now: int = 0
    most: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.now -= 1
        return web.Response(text="ok")


def hang(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="late")

    return handler


@asynccontextmanager
async def serving(handle: Handler) -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1 answering every path with `handle`; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # a worker opens 200 at once
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_api(settings: Settings) -> AsyncIterator[int]:
    """`dispatcher api`'s own server (uvicorn, h11: `serve.api_config`) on a free port of
    127.0.0.1, started; yields the port, and stops the server after."""
    server = uvicorn.Server(api_config(settings.model_copy(update={"api_port": free_port()})))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    try:
        await until(started, 10, "the API started")
        yield server.config.port
    finally:
        server.should_exit = True
        await serving


@dataclass
class ForwardProxy:
    """A tiny HTTP forward proxy on 127.0.0.1 (absolute-form requests to http:// URLs, one
    request per connection) that resolves names itself, as real proxies do: trailing dots
    dropped, then `hosts` (its own view of an internal DNS), then the system resolver."""

    hosts: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)  # the host of every request
    authorized: list[str] = field(default_factory=list)  # each Proxy-Authorization given
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            parts = urlsplit(target)
            name = (parts.hostname or "").rstrip(".")
            self.asked.append(parts.hostname or "")
            self.authorized += [
                line.split(":", 1)[1].strip()
                for line in lines
                if line.lower().startswith("proxy-authorization:")
            ]
            if method == "CONNECT":  # a tunnel (to an https URL): refused, once asked
                raise ValueError("tunnels are not served")
            hop_by_hop = ("connection:", "proxy-", "keep-alive:")
            kept = [line for line in lines if line and not line.lower().startswith(hop_by_hop)]
            length = [line[15:] for line in kept if line.lower().startswith("content-length:")]
            body = await reader.readexactly(int(length[0]) if length else 0)
            address = self.hosts.get(name) or str(
                (await asyncio.get_running_loop().getaddrinfo(name, None))[0][4][0]
            )
            up_reader, up_writer = await asyncio.open_connection(address, parts.port or 80)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            upstream = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
            up_writer.write(upstream.encode("latin-1") + b"\r\n\r\n" + body)
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
            up_writer.close()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        finally:
            writer.close()


@asynccontextmanager
async def proxying(hosts: dict[str, str] | None = None) -> AsyncIterator[ForwardProxy]:
    """A `ForwardProxy` serving on 127.0.0.1 for the block."""
    proxy = ForwardProxy(hosts=dict(hosts or {}))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield proxy


def command(*args: str | int) -> QueueCommands:
    """One Redis command to queue on a pipeline (for `Batcher.execute`, `Writer.submit`)."""

    def queue(pipe: Pipeline) -> None:
        pipe.execute_command(*args)

    return queue


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Wait for `check` to hold, at most `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


WORKER_ENV = {
    "DISPATCHER_ALLOW_INTERNAL_REGIONS": '["DEVNET","OSS","IDC"]',
    "DISPATCHER_TOTAL_TIMEOUT": "2",
    "DISPATCHER_CONNECT_TIMEOUT": "1",
    "DISPATCHER_JOB_TIMEOUT": "3",
    "DISPATCHER_RETRY_SCHEDULE": "[0.1, 0.1, 0.1]",
    "DISPATCHER_RETRY_JITTER": "0",
    "DISPATCHER_POLL_DELAY": "0.01",
    "DISPATCHER_SHUTDOWN_GRACE": "2",
    "DISPATCHER_LOG_LEVEL": "WARNING",
}


def start_process(
    args: list[str], redis_url: str, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """`python -m dispatcher ARGS` with the test environment, output appended to `log`."""
    env = {**os.environ, **WORKER_ENV, "DISPATCHER_REDIS_URL": redis_url, **extra}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *args], env=env, stdout=out, stderr=out
        )


def start_worker(redis_url: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    return start_process(["worker"], redis_url, log, **extra)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def compiling_costs(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Masking's clock (`masking.time.thread_time`) stands still but at each pattern's
    compiling, which moves it on by `seconds`: what a long secret's compiling costs, seen
    by the budget alone."""
    from dispatcher import masking

    clock = [0.0]
    monkeypatch.setattr(masking, "time", SimpleNamespace(thread_time=lambda: clock[0]))
    compile_pattern = masking._pattern

    def compiling(secret: str) -> re.Pattern[str]:
        clock[0] += seconds
        return compile_pattern(secret)

    monkeypatch.setattr(masking, "_pattern", compiling)
