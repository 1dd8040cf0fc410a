"""Redis connections: one pool per process, with the service's connection policy.

`connect()` is the one place that turns a URL into a client: `redis://`, `rediss://` and
`unix://` (one server), `redis+sentinel://` and `rediss+sentinel://` (the master that Redis
Sentinel names, followed through failovers; see `failover.py`), `redis+cluster://` and
`rediss+cluster://` (a Redis Cluster, one client for all its shards; see `cluster.py`).

Every connection has connect and read timeouts (a hung Redis cannot hold a caller for
longer than `DISPATCHER_REDIS_TIMEOUT`), idempotent commands are retried a few times with
backoff on a refused or reset connection, so a blip is not an error, and a node that
answers as a replica (`READONLY`, `MASTERDOWN`: a failover demoted it) is a lost
connection: the next one goes to the master.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_plus

from arq.connections import RedisSettings
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.cluster import cluster_client, is_cluster_url, parse_cluster_url
from dispatcher.errors import InvalidSetting
from dispatcher.failover import (
    check_sentinels,
    is_sentinel_url,
    parse_sentinel_url,
    primary_connection_class,
    replica_clients,
    sentinel_client,
)
from dispatcher.replication import plain_replicas

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = [
    "NO_ANSWER",
    "REDIS_ERRORS",
    "TRANSIENT_REPLIES",
    "connect",
    "policy",
    "preflight",
    "redis_full",
    "redis_settings",
    "require_url",
    "shown",
    "transient_reply",
    "waited_out",
]

# What a Redis outage looks like to a caller: refused, reset, timed out, LOADING (a
# BusyLoadingError is a ConnectionError), no master known to the sentinels or a demoted one
# (ConnectionErrors too), or the OS-level error beneath them.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)


# Replies that mean "not now" rather than "never", waited out as outages by every caller
# (producers up to DISPATCHER_EMIT_WAIT, a worker's writes until they land): Redis loading
# its data, busy with a script past its time limit (another client's, or a sweep's), full
# (`maxmemory`), unable to persist (MISCONF), a demoted or replica-less master, a cluster
# whose slot is moving or that is down.
TRANSIENT_REPLIES = ("LOADING", "BUSY", "OOM", "MISCONF", "READONLY", "MASTERDOWN",
                     "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")  # fmt: skip
# redis-py's classes for some of them (it drops the code from their messages)
_TRANSIENT_CLASSES = (OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError)


def transient_reply(exc: BaseException) -> bool:
    """Whether `exc` is a reply of `TRANSIENT_REPLIES`: one redis-py has a class for, one
    whose message begins with its code (after what a pipeline that raised prefixes it with:
    `Command # 1 (…) of pipeline caused error: ('BUSY …',)`), or a script's error quoting it
    (Redis 6 wraps a command's refusal: `… -OOM command not allowed …`). A refused or lost
    connection is not a reply (`REDIS_ERRORS`)."""
    if isinstance(exc, _TRANSIENT_CLASSES):
        return True
    if not isinstance(exc, ResponseError):
        return False
    prefix, _, reply = str(exc).rpartition(" of pipeline caused error: ")
    reply = reply.lstrip("('\"") if prefix else reply
    first = reply.partition(" ")[0]
    return first in TRANSIENT_REPLIES or any(f"-{code} " in reply for code in TRANSIENT_REPLIES)


def waited_out(answer: object) -> bool:
    """Whether `answer` (an exception, or one command's answer in a pipeline's) is waited
    out: an outage (`REDIS_ERRORS`), or a reply that means "not now" (`transient_reply`)."""
    return isinstance(answer, REDIS_ERRORS) or (
        isinstance(answer, BaseException) and transient_reply(answer)
    )


def redis_full(exc: BaseException) -> bool:
    """Whether `exc` is Redis at `maxmemory` refusing a write (`noeviction`): an outage to
    wait out, never a reason to drop the write. redis-py raises `OutOfMemoryError` for a
    command and for a script on Redis 7; on Redis 6 a script's refusal is a plain
    `ResponseError` quoting the `-OOM` reply."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "-OOM " in str(exc)
    )


def require_url(settings: Settings, url: str | None = None) -> str:
    target = url or settings.redis_url
    if target is None:
        raise RuntimeError("no Redis URL: start EmbeddedRedis first or set DISPATCHER_REDIS_URL")
    return target


def shown(url: str) -> str:
    """`url` for logs and messages, every password a client could read in it masked whole:
    its user info's (all up to the last `@` before the query, as redis-py's parser splits
    it, a `/` in the password included; a user name alone too: it may be meant as one),
    and each query option's whose name holds `password` (`?password=`, `ssl_password`,
    spelled in any case or percent-encoded). Any scheme: `redis://`, `rediss://`,
    `unix://`, sentinel and cluster URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, question, query = rest.partition("?")
    userinfo, at, hosts = head.rpartition("@")
    if at and not head.startswith("/"):  # `unix:///a@b`: a path, no user info
        user, colon, _ = userinfo.partition(":")
        head = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    options = [
        f"{name}=***" if "password" in unquote_plus(name).lower() else option
        for option in query.split("&")
        for name in (option.partition("=")[0],)
    ]
    return f"{scheme}{sep}{head}{question}{'&'.join(options)}"


def policy(settings: Settings) -> dict[str, Any]:
    """The options of every connection to Redis: timeouts, keepalive, retries. No health
    check (a PING before a command on a connection idle for a while): an idle connection
    found dead is a lost connection like any other, which the retries reconnect once; and
    with redis-py 5 a new connection's first command ran the check, whose PING to a Redis
    that never answers timed out, whose retry reconnected, whose first command ran the
    check...: a RecursionError after ~120 timeouts (`tests/faults/test_silent_redis.py`)."""
    return {
        "socket_connect_timeout": settings.redis_timeout,
        "socket_timeout": settings.redis_timeout,
        "socket_keepalive": True,
        "health_check_interval": 0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    }


def connect(settings: Settings, url: str | None = None) -> Redis:
    """The process's pool (connections are opened on first use) for `url`, by default
    `DISPATCHER_REDIS_URL`."""
    target = require_url(settings, url)
    if is_sentinel_url(target):
        return sentinel_client(parse_sentinel_url(target), policy(settings), _sentinels(settings))
    if is_cluster_url(target):
        return cluster_client(parse_cluster_url(target), policy(settings))
    pool = ConnectionPool.from_url(target, **policy(settings))
    pool.connection_class = primary_connection_class(pool.connection_class)
    return Redis.from_pool(pool)


def _sentinels(settings: Settings) -> str | None:
    """The sentinels' own password."""
    password = settings.redis_sentinel_password
    return None if password is None else password.get_secret_value()


def redis_settings(settings: Settings, url: str | None = None) -> RedisSettings:
    """arq's settings for the same Redis (for arq's own tools and the bench's baseline).
    With a sentinel URL, arq's pool has no socket timeouts (arq passes none to its
    Sentinel): the service's processes never use it."""
    target = require_url(settings, url)
    if is_sentinel_url(target):
        parsed = parse_sentinel_url(target)
        return RedisSettings(
            host=list(parsed.sentinels),
            sentinel=True,
            sentinel_master=parsed.master,
            database=parsed.options.get("db", 0),
            username=parsed.options.get("username"),
            password=parsed.options.get("password"),
            ssl=parsed.tls,
        )
    arq_settings = RedisSettings.from_dsn(target)
    arq_settings.conn_timeout = int(max(1, settings.redis_timeout))
    arq_settings.conn_retries = 30
    arq_settings.conn_retry_delay = 1
    arq_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    arq_settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20)
    return arq_settings


async def preflight(settings: Settings, url: str | None = None) -> list[str]:
    """What a process checks when it starts, of `url` (by default `DISPATCHER_REDIS_URL`):
    with a sentinel URL, that a sentinel answers and knows the master, and with
    `DISPATCHER_REDIS_MIN_REPLICAS` > 0 that the sentinels list that many replicas; that it
    keeps its keys when full (`_keeps_keys`). InvalidSetting (naming the setting) when
    not; returns warnings (a replica down, more replicas listed than confirm an emit, a
    plain URL's master with fewer connected than asked for: `replication`). A Redis that
    does not answer is an outage, waited out as ever, not a wrong setting."""
    target = require_url(settings, url)
    warnings = await _replicas(settings, target)
    return warnings + await _keeps_keys(settings, target)


async def _replicas(settings: Settings, target: str) -> list[str]:
    """The topology's part of `preflight`: sentinels, and the replicas asked for."""
    wanted = settings.redis_min_replicas
    if is_cluster_url(target):
        if wanted:
            raise InvalidSetting(
                "a Redis Cluster cannot confirm writes with WAIT here: set it to 0 with a "
                "redis+cluster:// URL (the cluster's replicas still take every write)",
                param="DISPATCHER_REDIS_MIN_REPLICAS",
            )
        return []
    if is_sentinel_url(target):
        parsed, password = parse_sentinel_url(target), _sentinels(settings)
        return await check_sentinels(parsed, policy(settings), password, wanted)
    if not wanted:
        return []
    redis = connect(settings, target)
    try:
        info = await redis.info("replication")
    except REDIS_ERRORS:
        return []
    finally:
        await redis.aclose()
    return plain_replicas(info, wanted)


async def _keeps_keys(settings: Settings, target: str) -> list[str]:
    """InvalidSetting (`maxmemory-policy`) unless the Redis of `target` keeps its keys when
    full: `noeviction`. Under any other policy a full Redis evicts keys, the queue's jobs
    first under a `volatile-*` one (they carry a time to live): accepted events dropped as
    "job data expired". Without a `maxmemory` (0: no limit) Redis never evicts: a warning,
    as it would once a limit is set. Asked: the server, the master a sentinel URL names
    now (not its replicas), each node of a cluster (masters and replicas: a node that does
    not answer is a warning naming it). Read from INFO (managed Redis answer it, not
    always CONFIG GET); a warning when it cannot be read."""
    redis = connect(settings, target)
    try:
        nodes, warnings = await _memory(redis, target, settings)
    except REDIS_ERRORS:
        return []  # an outage: waited out by whoever uses it
    except ResponseError as exc:  # INFO refused (an ACL): this check cannot be made
        return [f"the maxmemory-policy of {shown(target)} could not be read ({exc})"]
    finally:
        await redis.aclose()
    evicting: set[str] = set()  # the policies that evict keys: under a limit,
    unlimited: set[str] = set()  # and without one
    where: set[str] = set()  # the sentinel URL's replicas among the evicting
    for node in nodes:
        if (policy := str(node.get("maxmemory_policy", "noeviction"))) == "noeviction":
            continue
        limited = int(node.get("maxmemory", 0)) > 0
        (evicting if limited else unlimited).add(policy)
        where |= {node[REPLICA]} if limited and REPLICA in node else set()
    if evicting:
        at = (
            f" (its replica {', '.join(sorted(where))}, which a failover promotes)" if where else ""
        )
        raise InvalidSetting(
            f"the Redis at {shown(target)}{at} evicts keys when full (maxmemory-policy "
            f"{', '.join(sorted(evicting))}): it would drop queued events. Set "
            f"maxmemory-policy {_NOEVICTION}; a full Redis is then an outage that emits and "
            "workers wait out, not lost data",
            param="maxmemory-policy",
        )
    if unlimited:
        warnings.append(
            f"the Redis at {shown(target)} has no maxmemory limit: it never evicts keys now, "
            f"but under maxmemory-policy {', '.join(sorted(unlimited))} it would drop "
            f"queued events once a limit is set. Set maxmemory-policy {_NOEVICTION}"
        )
    return warnings


_NOEVICTION = (
    "noeviction (CONFIG SET maxmemory-policy noeviction and its configuration file; on a "
    "managed Redis, its parameter group)"
)


async def _memory(
    redis: Redis, target: str, settings: Settings
) -> tuple[list[dict[str, Any]], list[str]]:
    """`INFO memory` of the server, or of each node of a cluster (masters and replicas),
    asked one by one (asked for all its nodes at once, redis-py's cluster client answers
    one node's reply as it is rather than one per node: a cluster of one node); with a
    warning for each node that does not answer, or refuses INFO."""
    if is_sentinel_url(target):
        return await _with_replicas(redis, target, settings)
    if not is_cluster_url(target):
        return [await redis.info("memory")], []
    client = cast("RedisCluster", redis)
    await client.initialize()  # its nodes are known once it has asked one
    found, warnings = [], []
    for name in [node.name for node in client.get_nodes()]:
        await client.initialize()  # (again once a node failed: the client was reset)
        if (node := client.get_node(node_name=name)) is None:
            continue  # no longer in the cluster
        try:
            found.append(await client.info("memory", target_nodes=node))
        except REDIS_ERRORS as exc:
            warnings.append(
                f"node {name} of {shown(target)} did not answer ({exc}): its "
                "maxmemory-policy not checked"
            )
        except ResponseError as exc:  # INFO refused (an ACL)
            warnings.append(
                f"the maxmemory-policy of node {name} of {shown(target)} could not be read ({exc})"
            )
    return found, warnings


REPLICA = "_replica"  # a sentinel URL's replica's INFO: its host:port, for the refusal

# Away, or answering with a refusal (NOAUTH, an ACL refusing INFO, ...)
NO_ANSWER: tuple[type[Exception], ...] = (*REDIS_ERRORS, ResponseError)


async def _with_replicas(
    redis: Redis, target: str, settings: Settings
) -> tuple[list[dict[str, Any]], list[str]]:
    """`INFO memory` of a sentinel URL's master and of each replica the sentinels list: a
    failover promotes one, and an evicting one would then drop queued events; a warning
    for each replica that is down or does not answer INFO within `DISPATCHER_REDIS_TIMEOUT`
    (a paused one would hold a start through every retry of every connection: ~8 s at 0.3)."""
    found, warnings = [await redis.info("memory")], []
    parsed, unchecked = parse_sentinel_url(target), "its maxmemory-policy not checked"
    for name, replica in await replica_clients(parsed, policy(settings), _sentinels(settings)):
        if replica is None:
            warnings.append(f"replica {name} of {parsed.describe()} is down: {unchecked}")
            continue
        try:
            async with asyncio.timeout(settings.redis_timeout):  # not the retries' sum
                found.append({**await replica.info("memory"), REPLICA: name})
        except NO_ANSWER as exc:
            warnings.append(
                f"replica {name} of {parsed.describe()} did not answer INFO ({exc}): {unchecked}"
            )
        finally:
            await replica.aclose()
    return found, warnings
