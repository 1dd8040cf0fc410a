"""Redis Cluster URLs: `redis+cluster://[user:password@]host:port[,host:port...]/`
(`rediss+cluster://` for TLS), in `DISPATCHER_REDIS_URL`.

The nodes listed are where the client starts: it learns the slot map from them and follows
the cluster's own resharding and failovers (MOVED, ASK, a new master). Each shard of a
cluster lives in one hash slot (see `keys.py`), so every script and pipeline of a shard
goes to one master, and the number of shards (`DISPATCHER_REDIS_CLUSTER_SHARDS`) is how
many masters can share the work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.errors import InvalidSetting

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterUrl",
    "cluster_client",
    "is_cluster_url",
    "parse_cluster_url",
    "scan_shard",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SETTING = "DISPATCHER_REDIS_URL"


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A parsed cluster URL: its start-up nodes and credentials."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and str(url).split("://", 1)[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """The nodes and credentials of a cluster URL; InvalidSetting naming the setting when
    it has no node, or a node without a port."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0]
    credentials, _, hosts = netloc.rpartition("@")
    user, _, password = credentials.partition(":")
    nodes = []
    for entry in filter(None, hosts.split(",")):
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise InvalidSetting(
                f"a cluster node must be host:port, got {entry!r} in {scheme}://...",
                param=SETTING,
            )
        nodes.append((parts.hostname, port))
    if not nodes:
        raise InvalidSetting(f"{scheme}:// needs at least one host:port", param=SETTING)
    return ClusterUrl(
        nodes=tuple(nodes),
        username=unquote(user) or None,
        password=unquote(password) or None,
        tls=scheme.startswith("rediss"),
    )


# What redis-py's cluster client found when no node it was given answered (the outages of
# `connections.REDIS_ERRORS`, which cannot be imported here: that module imports this one)
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# How redis-py says it reached no node (its cause the last node's error, or none: other
# callers' failures took every node off its list meanwhile; not a node that refused to
# be a cluster's), or that the nodes that answered serve no slot at all (the masters are
# away: a node the URL lists has left the cluster and answers with none; review). Slots
# left unserved on purpose, or a Redis that is no cluster, stay errors (review).
_NO_NODE = "Redis Cluster cannot be connected"
_NO_SLOT = "All slots are not covered after query all startup_nodes. 0 of "
AGAIN_AFTER_S = 1.0  # a start that found no node is not tried again sooner


class _Cluster(RedisCluster):
    """redis-py's cluster client, but a cluster none of whose nodes answers is an outage,
    as a single Redis that does not answer: a `ConnectionError`, which every caller waits
    out, until the cluster is back. redis-py raises its `RedisClusterException` then (its
    cause the last node's connection error, or no slot served by the nodes that
    answered), which no caller took for an outage: a worker, the API and every command
    stopped with a traceback (review). And it forgets each node a command could not
    reach, so once every node had failed it had none left to ask and stayed broken after
    the cluster came back (review): a client that starts again starts from every node the
    URL lists. A start that failed is not tried again for `AGAIN_AFTER_S`: the callers
    waiting their turn get its error at once (each walked every node listed in turn,
    so with the cluster hung the k-th waited k times its Redis timeouts; review)."""

    def __init__(self, *, startup_nodes: list[ClusterNode], **kwargs: Any) -> None:
        super().__init__(startup_nodes=startup_nodes, **kwargs)
        self._listed = [(node.host, node.port) for node in startup_nodes]
        self._starting = asyncio.Lock()
        self._failed: tuple[float, str] | None = None  # when the last start failed, why

    async def initialize(self) -> RedisCluster:
        if not self._initialize:
            return self
        async with self._starting:
            if self._failed and time.monotonic() - self._failed[0] < AGAIN_AFTER_S:
                raise RedisConnectionError(self._failed[1])
            known = self.nodes_manager.startup_nodes  # (it starts from the nodes listed)
            for host, port in self._listed:
                node = ClusterNode(host, port, **self.connection_kwargs)
                known.setdefault(node.name, node)
            try:
                started = await super().initialize()
            except RedisClusterException as exc:
                if not _away(exc):
                    raise
                self._failed = (time.monotonic(), str(exc))
                raise RedisConnectionError(str(exc)) from exc
            except _UNREACHABLE as exc:
                self._failed = (time.monotonic(), str(exc))
                raise
            self._failed = None
            return started


def _away(exc: RedisClusterException) -> bool:
    """Whether `exc`, from a start, says the cluster is away (an outage), not wrong."""
    said, cause = str(exc), exc.__cause__
    if said.startswith(_NO_NODE):
        return cause is None or isinstance(cause, _UNREACHABLE)
    return said.startswith(_NO_SLOT)


def cluster_client(target: ClusterUrl, policy: dict[str, Any]) -> Redis:
    """A client of the whole cluster, with the service's connection policy. Typed as a
    `Redis`: the service uses only what both have (commands, scripts, pipelines)."""
    client = _Cluster(  # type: ignore[abstract]  # (redis-py declares connection_pool so)
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **policy,
    )
    return cast("Redis", client)


async def masters_of(client: Redis, slots: list[int]) -> list[str]:
    """The master (`host:port`) serving each of `slots` now."""
    cluster = cast("RedisCluster", client)
    await cluster.initialize()
    found = []
    for slot in slots:
        node = cluster.nodes_manager.get_node_from_slot(slot)
        found.append(f"{node.host}:{node.port}")
    return found


async def scan_shard(
    redis: Redis, key: str, cursor: int, match: str, count: int
) -> tuple[int, list[bytes]]:
    """One `SCAN` page (from `cursor`, about `count` keys) of the shard that holds `key`:
    on a cluster, of the master that owns its slot (a shard's keys all share it; a
    cluster client's `SCAN` goes to every master and answers a cursor per node)."""
    if isinstance(redis, RedisCluster):
        client = cast(Any, redis)
        node = client.get_node_from_key(key)
        cursors, found = await client.scan(cursor, match=match, count=count, target_nodes=node)
        return int(cursors[node.name]), list(found)
    cursor, found = await redis.scan(cursor, match=match, count=count)
    return int(cursor), list(found)
