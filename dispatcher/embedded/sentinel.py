"""A private Redis Sentinel group for the tests and the bench: a master, its replicas and
three sentinels, each a redis-server process on a free loopback port, with its data in a
folder of its own, and the faults to put it through (a node killed, paused, restarted).

Sentinels decide fast here (`down-after-milliseconds` 1000, a short failover timeout), so
that a failover takes a few seconds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import redis as redis_py
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.embedded.redis import _free_port, _ping, find_redis_server

__all__ = ["SentinelGroup"]

HOST = "127.0.0.1"


class SentinelGroup:
    """A master named `name`, `replicas` replicas and three sentinels watching it (with
    `sentinel_password`, their `requirepass`: DISPATCHER_REDIS_SENTINEL_PASSWORD)."""

    def __init__(
        self,
        folder: Path,
        *,
        name: str = "dispatcher",
        replicas: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        sentinel_password: str | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_password = sentinel_password
        ports = _distinct_ports(4 + replicas)
        self.nodes: dict[int, subprocess.Popen[bytes] | None] = dict.fromkeys(ports[3:])
        self.sentinels: dict[int, subprocess.Popen[bytes] | None] = dict.fromkeys(ports[:3])
        self.first_master = ports[3]
        self.paused: set[int] = set()

    @property
    def url(self) -> str:
        """The `redis+sentinel://` URL of the group (database 0)."""
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}/0"

    # ---- starting and stopping -----------------------------------------------------------

    def start(self, within: float = 20.0) -> str:
        """Start every node and sentinel; returns the URL once the sentinels see the
        master and its replicas (that they see one another too, which a failover needs and
        takes them a few seconds more, is waited for before the first fault)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        master, *replicas = list(self.nodes)
        self._on_a_free_port(master, self.nodes, self._start_master)
        for port in replicas:
            self._on_a_free_port(port, self.nodes, self._start_replica)
        for port in list(self.sentinels):
            self._on_a_free_port(port, self.sentinels, self._start_sentinel)
        deadline = time.monotonic() + within
        while not self._sentinels_ready(mesh=False):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the sentinel group did not come up; logs in {self.folder}")
            time.sleep(0.05)
        return self.url

    def _on_a_free_port(
        self,
        port: int,
        table: dict[int, subprocess.Popen[bytes] | None],
        start: Callable[[int], None],
    ) -> None:
        """Start a process of the group on `port`, or on another free port should that one
        have been taken meanwhile (another process picked it too): up to 3 tries."""
        for tries_left in (2, 1, 0):
            try:
                start(port)
                return
            except _Exited:
                if not tries_left:
                    raise
                del table[port]
                port = _free_port()
                table[port] = None

    def _start_master(self, port: int) -> None:
        self.first_master = port
        self.start_node(port, None)

    def _start_replica(self, port: int) -> None:
        self.start_node(port, self.first_master)

    def start_node(self, port: int, replica_of: int | None) -> None:
        """(Re)start the data node on `port`, with its data, as a replica of `replica_of`
        (the sentinels reconfigure it should that be wrong)."""
        folder = self.folder / f"node-{port}"
        folder.mkdir(exist_ok=True)
        command = [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(folder),
            "--logfile",
            str(folder / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--daemonize",
            "no",
        ]
        if replica_of is not None:
            command += ["--replicaof", HOST, str(replica_of)]
        self.nodes[port] = self._spawn(command, port)

    def _start_sentinel(self, port: int) -> None:
        config = self.folder / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind {HOST}\ndir {self.folder}\n"
            f"logfile {self.folder / f'sentinel-{port}.log'}\n"
            f"sentinel monitor {self.name} {HOST} {self.first_master} 2\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        if self.sentinel_password:  # (the sentinels' own, which they give one another too)
            with config.open("a") as out:
                out.write(f"requirepass {self.sentinel_password}\n")
                out.write(f"sentinel sentinel-pass {self.sentinel_password}\n")
        command = [find_redis_server(), str(config), "--sentinel"]
        self.sentinels[port] = self._spawn(command, port, self.sentinel_password)

    @staticmethod
    def _spawn(
        command: list[str], port: int, password: str | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        # ours answers, not another's
        while not _ping(port, password) or process.poll() is not None:
            if process.poll() is not None:
                raise _Exited(f"redis-server on port {port} exited at start: {command}")
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server on port {port} did not start: {command}")
            time.sleep(0.02)
        return process

    def stop(self) -> None:
        """Stop every process of the group (paused ones too)."""
        for processes in (self.sentinels, self.nodes):
            for port, process in processes.items():
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=5)
                processes[port] = None

    # ---- what the sentinels say ---------------------------------------------------------

    def _ask(self, port: int, *command: str) -> object:
        """A command to the sentinel on `port`; None when it does not answer."""
        client = redis_py.Redis(
            host=HOST,
            port=port,
            socket_timeout=1,
            decode_responses=True,
            password=self.sentinel_password,
        )
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError, redis_py.ResponseError):
            return None
        finally:
            client.close()

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it now."""
        for port in self.sentinels:
            answer = self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            if isinstance(answer, (list, tuple)):
                return int(answer[1])
        raise RuntimeError("no sentinel answers")

    def _sentinels_ready(self, *, mesh: bool) -> bool:
        """Whether every sentinel sees the master and its replicas up, but those paused on
        purpose (`mesh`: and the other sentinels, so that they can agree on a failover)."""
        paused_replicas = self.paused
        if paused_replicas:  # (asked only then: the sentinels may not answer yet)
            try:
                paused_replicas = self.paused - {self.master_port()}
            except RuntimeError:
                return False
        up = len(self.nodes) - 1 - len(paused_replicas)
        for port in self.sentinels:
            master = self._ask(port, "SENTINEL", "MASTER", self.name)
            replicas = self._ask(port, "SENTINEL", "REPLICAS", self.name)
            if not isinstance(master, list) or not isinstance(replicas, list):
                return False
            flags = [dict(zip(r[::2], r[1::2], strict=True)).get("flags") for r in replicas]
            if flags.count("slave") < up:  # not s_down, not disconnected
                return False
            state = dict(zip(master[::2], master[1::2], strict=True))
            if mesh and int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        return True

    # ---- faults -------------------------------------------------------------------------

    def signal(self, port: int, sig: signal.Signals) -> None:
        """Send `sig` to the node on `port` (SIGKILL: it is reaped and stays down). Before
        the master is killed or paused, every sentinel sees the others."""
        process = self.nodes[port]
        assert process is not None, f"node {port} is not running"
        if sig in (signal.SIGKILL, signal.SIGSTOP) and port == self.master_port():
            self._wait(lambda: self._sentinels_ready(mesh=True), 20.0, "sentinels in touch")
        process.send_signal(sig)
        if sig is signal.SIGSTOP:
            self.paused.add(port)
        elif sig is signal.SIGCONT:
            self.paused.discard(port)
        elif sig is signal.SIGKILL:
            process.wait(timeout=5)
            self.nodes[port] = None
            self.paused.discard(port)

    def heal(self, within: float = 30.0) -> int:
        """Paused nodes resumed, dead ones restarted as replicas, once a master is up (a
        failover may be under way); returns the master's port when its replicas are in
        sync and the sentinels see them up."""
        for port in list(self.paused):
            self.signal(port, signal.SIGCONT)
        self._wait(lambda: _role(self.master_port()) == "master", within, "a master")
        master = self.master_port()
        for port, process in self.nodes.items():
            if process is None:
                self.start_node(port, master)
        self.wait_for_replicas(len(self.nodes) - 1, within)
        self._wait(lambda: self._sentinels_ready(mesh=False), within, "sentinels see them up")
        return master

    def wait_for_new_master(self, old: int, within: float = 30.0) -> int:
        """Until the sentinels name another master than `old`, and it says it is one;
        returns its port."""

        def promoted() -> bool:
            port = self.master_port()
            return port != old and _role(port) == "master"

        self._wait(promoted, within, "a failover")
        return self.master_port()

    def wait_for_replicas(self, count: int, within: float = 30.0) -> None:
        """Until the master has `count` replicas connected and in sync."""

        def in_sync() -> bool:
            info = _info(self.master_port())
            states = [v for k, v in info.items() if k.startswith("slave")]
            return sum("online" in str(state) for state in states) >= count

        self._wait(in_sync, within, f"{count} replicas in sync")

    def report(self, lines: int = 12) -> str:
        """What each node says of its replication, and the end of its log: for a test's
        failure message (a CI clone and its logs are gone once it fails)."""
        parts = []
        for port in self.nodes:
            log = self.folder / f"node-{port}" / "redis.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"node {port}: {_info(port)}\n  " + "\n  ".join(tail))
        return "\n".join(parts)

    def _wait(self, check: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within} s: {what} (logs in {self.folder})")
            time.sleep(0.05)


class _Exited(RuntimeError):
    """A process of the group exited as it started (its port taken, most often)."""


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        if (port := _free_port()) not in ports:
            ports.append(port)
    return ports


def _info(port: int) -> dict[str, object]:
    client = redis_py.Redis(host=HOST, port=port, socket_timeout=1)
    try:
        return cast("dict[str, object]", client.info("replication"))
    except (RedisConnectionError, RedisTimeoutError):
        return {}
    finally:
        client.close()


def _role(port: int) -> str:
    return str(_info(port).get("role", ""))
