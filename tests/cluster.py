"""Real shard topologies for tests: a 3-master Redis Cluster on 127.0.0.1 (redis-server
with `--cluster-enabled yes`, slots given out by `redis-cli --cluster create`; a cluster of
one node takes them all with `CLUSTER ADDSLOTSRANGE`), and the settings of each topology
the shard tests run on."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from dispatcher.embedded.redis import find_redis_server
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from tests.helpers import free_port

__all__ = ["LocalCluster", "grown"]


class LocalCluster:
    """Three masters (or `masters`), no replicas, each with its share of the slots."""

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.data_dir = data_dir
        self.ports = [_cluster_port() for _ in range(masters)]
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def start(self, within: float = 20.0) -> str:
        self.ports = [self._node(port, within) for port in self.ports]
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        if len(nodes) == 1:  # `--cluster create` wants three masters at least
            node = redis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=5)
            node.cluster("ADDSLOTSRANGE", "0", "16383")
            node.close()
            self._wait(self._ok, within, "cluster_state:ok")
            return self.url
        subprocess.run(
            [str(Path(_server()).with_name("redis-cli")), "--cluster", "create",
             *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=within,
        )  # fmt: skip
        self._wait(self._ok, within, "cluster_state:ok on every node")
        return self.url

    def _node(self, port: int, within: float, tries: int = 5) -> int:
        """A node answering on `port`, or on another port when something else took `port` or
        its bus port since they were picked (other tests, other processes' connections)."""
        for _ in range(tries):
            process = self._spawn(port)
            deadline = time.monotonic() + within
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(port):
                    self._processes.append(process)
                    return port
                time.sleep(0.02)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
                break
            port = _cluster_port()  # it exited: a port was taken
        raise RuntimeError("the test cluster is not ready: a node did not come up")

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        folder = self.data_dir / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [_server(), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--dir", str(folder), "--save", "",
             "--appendonly", "no", "--logfile", str(folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def _ok(self) -> bool:
        for port in self.ports:
            node = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            info: dict[str, str] = node.cluster("INFO")  # type: ignore[assignment]  # sync|async
            if info.get("cluster_state") != "ok":
                return False
        return True

    def flush(self) -> None:
        """Empty every master (tests start from nothing)."""
        for port in self.ports:
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).flushall()

    def add_replica(self, within: float = 20.0) -> int:
        """One more node, a replica of the first master, once the cluster lists it (in
        `CLUSTER SLOTS`, what clients learn the nodes from); its port."""
        port = self._node(_cluster_port(), within)
        first = redis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=5)
        node = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        # the replica syncs at once (5 s by default), and its offset, which must not be 0 for
        # CLUSTER SLOTS to list it, moves within a second (10 s: the master's pings)
        first.config_set("repl-diskless-sync-delay", 0)
        first.config_set("repl-ping-replica-period", 1)
        node.cluster("MEET", "127.0.0.1", str(self.ports[0]))
        master = first.cluster("MYID")
        master = master.decode() if isinstance(master, bytes) else str(master)

        def replicates() -> bool:  # (refused until the node knows the master)
            return bool(node.cluster("REPLICATE", master))

        def listed() -> bool:
            slots: list[list[object]] = first.cluster("SLOTS")  # type: ignore[assignment]
            return any(len(entry) > 3 for entry in slots)  # a master, then its replicas

        self._wait(replicates, within, "the replica to know its master")
        self._wait(listed, within, "the replica in CLUSTER SLOTS")
        first.close()
        node.close()
        return port

    def kill(self, index: int) -> None:
        """Node `index` gone (SIGKILL): its port refuses connections."""
        self._processes[index].kill()
        self._processes[index].wait(timeout=10)

    def stray_node(self, within: float = 20.0) -> int:
        """One more node, in no cluster (as one `redis-cli --cluster del-node` removed: it
        answers, serving no slot); its port. Stopped with the others."""
        return self._node(_cluster_port(), within)

    def save(self) -> None:
        """Every node's data written to disk (`SAVE`): a restart keeps it."""
        for port in self.ports:
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).save()

    def restart(self, within: float = 20.0) -> None:
        """Every node (stopped) back on its port, with the slots it had (`nodes.conf`) and
        the data of its last `save`."""
        self._processes = [self._spawn(port) for port in self.ports]
        self._wait(lambda: all(_answers(port) for port in self.ports), within, "the nodes back")
        self._wait(self._ok, within, "cluster_state:ok on every node again")

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        self._processes.clear()

    @staticmethod
    def _wait(check: object, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the test cluster is not ready: {what}")


def _server() -> str:
    """redis-server from PATH (Redis 7: its cluster checks the keys a script touches), else
    the one the embedded Redis uses."""
    return shutil.which("redis-server") or find_redis_server()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is a port too."""
    while (port := free_port()) > 55535:
        pass
    return port


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


async def grown(settings: Settings) -> Settings:
    """`settings`, every shard they list in use (`dispatcher shards grow`, no settling)."""
    async with Router.open(settings) as router:
        await Mover(router, lambda _: None, settle_s=0.001).grow()
    return settings
