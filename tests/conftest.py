"""Real servers for every test: a private redis-server for the session (flushed before each
test), the app over ASGI, real HTTP receivers on 127.0.0.1, and burst workers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from aiohttp import web
from arq.connections import ArqRedis
from multidict import CIMultiDict

from dispatcher.api import create_app
from dispatcher.redis import EmbeddedRedis, connect
from dispatcher.settings import Settings
from dispatcher.worker import create_worker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """CLI commands configure logging for their process; undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


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
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(redis_server: EmbeddedRedis) -> Settings:
    return make_settings(redis_server.url)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    pool = await connect(settings)
    await pool.flushdb()
    yield pool
    await pool.aclose()


@pytest.fixture
async def api(settings: Settings, redis: ArqRedis) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over ASGI, lifespan included."""
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dispatcher") as client:
            yield client


RunWorker = Callable[..., Awaitable[Any]]


@pytest.fixture
def run_worker(settings: Settings, redis: ArqRedis) -> RunWorker:
    """Run a burst worker until the queue (deferred retries included) is empty."""

    async def run(worker_settings: Settings | None = None, **overrides: Any) -> Any:
        worker = create_worker(
            worker_settings or settings,
            burst=True,
            poll_delay=0.01,
            handle_signals=False,
            **overrides,
        )
        try:
            await asyncio.wait_for(worker.main(), timeout=30)
        finally:
            await worker.close()
        return worker

    return run


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


def hang(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="late")

    return handler


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recv.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recv.base = f"http://127.0.0.1:{port}"
    yield recv
    await runner.cleanup()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


UID = {"X-DEVOPS-UID": "alice"}
