"""Following a failover: Sentinel URLs, discovery whose errors name the setting, and
connections that take a demoted master for a lost connection.

`DISPATCHER_REDIS_URL=redis+sentinel://[user:password@]host:port[,host:port...]/<master>/<db>`
(`rediss+sentinel://`: TLS to the sentinels and to Redis). The user and password are
Redis'; the sentinels' own password, when they have one, is
`DISPATCHER_REDIS_SENTINEL_PASSWORD`. Query options (`?ssl_ca_certs=...`) are redis-py's, as
in a `redis://` URL.

redis-py's `SentinelConnectionPool` does the discovery: a connection asks the sentinels for
the master when it (re)connects, idle connections are dropped when the master's address
changes (here at once when the sentinels switch it, busy ones too: `master_switch`, for a
master paused through its failover), and a `READONLY` reply (the master was demoted) drops
the connection. Here a `MASTERDOWN` reply counts the same (redis-py lets it through as a
plain reply error), so does a `READONLY` that Redis 6 wraps in a Lua script's error, and so
it goes on a plain `redis://` URL too, for a managed Redis whose failover moves a DNS name:
a connection left on the old master would otherwise answer `READONLY` for as long as it
lives. `NOREPLICAS` (a master short of its `min-replicas-to-write`) is an outage to wait out
as well.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import AuthenticationError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.addresses import host_port
from dispatcher.errors import InvalidSetting
from dispatcher.master_switch import FollowingPool, FollowsSwitch
from dispatcher.replication import sentinel_replicas

__all__ = [
    "SENTINEL_SCHEMES",
    "NotMaster",
    "NotWritable",
    "SentinelUrl",
    "check_sentinels",
    "is_sentinel_url",
    "parse_sentinel_url",
    "primary_connection_class",
    "replica_clients",
    "sentinel_client",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


class NotWritable(RedisConnectionError):
    """The node takes no writes now: it lacks the replicas its `min-replicas-to-write`
    asks for (NOREPLICAS). A ConnectionError, so every caller waits it out like an outage
    (the API answers 503, a worker's writes wait)."""


class NotMaster(NotWritable):
    """The node answered as a replica (READONLY, MASTERDOWN): the connection is dropped, and
    the next one finds the master."""


class _FollowsMaster(AbstractConnection):
    """Mixed into a connection class: a connection to the master that drops itself when
    the node answers as a replica."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if _replied(exc, "READONLY", "MASTERDOWN"):
                await self.disconnect()
                reply = f"READONLY {exc}" if isinstance(exc, ReadOnlyError) else str(exc)
                raise NotMaster(f"{self._host_error()} is not the master now ({reply})") from exc
            if _replied(exc, "NOREPLICAS"):
                raise NotWritable(f"{self._host_error()} takes no writes now ({exc})") from exc
            raise


def _replied(exc: ResponseError, *codes: str) -> bool:
    """Whether a reply error has one of `codes`: as the reply itself (redis-py keeps the
    code in the message, but for READONLY, its ReadOnlyError), or wrapped in a script's
    error by Redis 6 ("ERR Error running script ... -READONLY ...")."""
    if isinstance(exc, ReadOnlyError):
        return "READONLY" in codes
    text = str(exc)
    return any(text.startswith(code) or f"-{code} " in text for code in codes)


class _Packing(AbstractConnection):
    """Mixed into a connection class: commands packed by hiredis (C) rather than by
    redis-py's Python loop, which measured as the largest part of the Redis client's CPU
    per delivery (every record, job and script call goes through it). What hiredis does
    not take (a value of another type, a command name with a space in it, a connection
    with another encoding) is packed by redis-py, which raises its own errors."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if self.encoder.encoding == "utf-8" and not (
            isinstance(first, (str, bytes))
            and (" " in first if isinstance(first, str) else b" " in first)
        ):
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]
        return super().pack_command(*args)


class _Primary(_FollowsMaster, _Packing, Connection):
    pass


class _PrimarySSL(_FollowsMaster, _Packing, SSLConnection):
    pass


class _PrimaryUnix(_FollowsMaster, _Packing, UnixDomainSocketConnection):
    pass


class _SentinelPrimary(FollowsSwitch, _FollowsMaster, _Packing, SentinelManagedConnection):
    pass


class _SentinelPrimarySSL(FollowsSwitch, _FollowsMaster, _Packing, SentinelManagedSSLConnection):
    pass


_PRIMARY: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _Primary,
    SSLConnection: _PrimarySSL,
    UnixDomainSocketConnection: _PrimaryUnix,
}


def primary_connection_class(plain: type[AbstractConnection]) -> type[AbstractConnection]:
    """The connection class of a plain URL's pool, made to follow the master."""
    return _PRIMARY.get(plain, plain)


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed `redis+sentinel://` URL: the sentinels, the master's name, TLS, and the
    options of the master's connections (db, username, password, query options)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    tls: bool
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """`master 'm' (sentinels h:p, h:p)`, without credentials."""
        return f"master {self.master!r} (sentinels {_addresses(self.sentinels)})"


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a sentinel URL; ValueError saying what is wrong (never echoing a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("a sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    netloc, slash, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    if not slash or not path.strip("/"):
        raise ValueError(
            "a sentinel URL names its master: "
            f"{scheme}://host:port[,host:port...]/<master name>/<db>"
        )
    tls = scheme.lower() == "rediss+sentinel"
    sentinels = tuple(_sentinel_address(entry) for entry in hosts.split(","))
    master, db = _master_and_db(path)
    # redis-py reads the rest as it reads a redis:// URL: credentials, query options.
    plain = f"{'rediss' if tls else 'redis'}://{userinfo}{at}sentinel/{db}"
    options = dict(parse_url(plain + (f"?{query}" if query else "")))
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    return SentinelUrl(sentinels, master, tls, options)


def _sentinel_address(entry: str) -> tuple[str, int]:
    entry = entry.strip()
    if not entry:
        raise ValueError("a sentinel URL lists its sentinels as host:port,host:port (one empty)")
    if entry.startswith("["):  # [IPv6]:port
        host, close, port = entry[1:].partition("]")
        if not close or (port and not port.startswith(":")):
            raise ValueError(f"sentinel {entry!r}: an IPv6 address is written [address]:port")
        port = port[1:]
    else:
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
    if not host:
        raise ValueError(f"sentinel {entry!r} has no host")
    if not port:
        return host, SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sentinel {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _master_and_db(path: str) -> tuple[str, int]:
    parts = path.rstrip("/").split("/")
    if len(parts) > 2:
        raise ValueError("a sentinel URL's path is /<master name>/<db>, nothing more")
    master = unquote(parts[0])
    if not master or any(c.isspace() for c in master):
        raise ValueError("the master name must not be empty or hold spaces")
    db = parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the database after the master name must be a number, not {db!r}")
    return master, int(db)


def _addresses(sentinels: tuple[tuple[str, int], ...] | list[tuple[str, int]]) -> str:
    return ", ".join(host_port(host, port) for host, port in sentinels)


class _Sentinels(Sentinel):
    """redis-py's Sentinel, whose "no master" error says which setting to look at."""

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except MasterNotFoundError as exc:
            raise MasterNotFoundError(
                f"DISPATCHER_REDIS_URL: no sentinel of {self.addresses()} names a master "
                f"{service_name!r} that is up (a failover under way, a wrong master name, or "
                f"no sentinel reachable): {exc}"
            ) from None

    def addresses(self) -> str:
        return _addresses([_address_of(sentinel) for sentinel in self.sentinels])


def _address_of(client: Redis) -> tuple[str, int]:
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs.get("host")), int(kwargs.get("port") or 0)


class SentinelRedis(Redis):
    """The master's client; closing it also stops its pool's following of the sentinels
    (a follower a command started while it closed too) and closes its connections to
    them, whatever closing the pool's connections raised."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        try:
            await super().aclose(close_connection_pool)  # (the pool's disconnect stops it)
        finally:
            if isinstance(pool, FollowingPool):
                await pool.stop_following()
            if isinstance(pool, SentinelConnectionPool):
                await asyncio.gather(*(s.aclose() for s in pool.sentinel_manager.sentinels))


def sentinel_kwargs(
    target: SentinelUrl, policy: dict[str, Any], password: str | None
) -> dict[str, Any]:
    """Connection options of the sentinels themselves: the same timeouts, TLS as Redis',
    their own password."""
    kwargs = {k: v for k, v in policy.items() if k.startswith("socket_")}
    if target.tls:
        kwargs["ssl"] = True
        kwargs.update({k: v for k, v in target.options.items() if k.startswith("ssl_")})
    if password:
        kwargs["password"] = password
    return kwargs


def sentinels_of(target: SentinelUrl, policy: dict[str, Any], password: str | None) -> _Sentinels:
    """redis-py's Sentinel for `target`, every connection with `policy` (timeouts, retry)."""
    return _Sentinels(  # type: ignore[no-untyped-call]  # redis-py's __init__ is untyped
        list(target.sentinels),
        sentinel_kwargs=sentinel_kwargs(target, policy, password),
        **{**policy, **target.options},
    )


def sentinel_client(target: SentinelUrl, policy: dict[str, Any], password: str | None) -> Redis:
    """A client of `target`'s master, wherever the sentinels say it is now."""
    client: Redis = sentinels_of(target, policy, password).master_for(
        target.master,
        redis_class=SentinelRedis,
        connection_pool_class=FollowingPool,
        connection_class=_SentinelPrimarySSL if target.tls else _SentinelPrimary,
    )
    return client


async def check_sentinels(
    target: SentinelUrl, policy: dict[str, Any], password: str | None, min_replicas: int
) -> list[str]:
    """Ask every sentinel about the master: InvalidSetting when none answers or none knows
    it; returns warnings (fewer replicas up than `min_replicas`, or more:
    `replication.sentinel_replicas`)."""
    replicas = await _ask_sentinels(target, policy, password, replicas=min_replicas > 0)
    return sentinel_replicas(target.describe(), replicas, min_replicas)


async def _ask_sentinels(
    target: SentinelUrl, policy: dict[str, Any], password: str | None, *, replicas: bool
) -> list[dict[str, Any]]:
    """InvalidSetting when no sentinel answers, or none knows the master; with
    `replicas`, the master's replicas as the first sentinel that knows it sees them."""
    sentinels = sentinels_of(target, policy, password)
    answers: list[tuple[Redis, dict[str, Any]]] = []
    errors: list[tuple[str, Exception]] = []
    try:
        for client in sentinels.sentinels:
            try:
                masters = await client.sentinel_masters()  # type: ignore[no-untyped-call]
                answers.append((client, masters))
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                errors.append((_addresses([_address_of(client)]), exc))
        if not answers:
            raise _unanswered(target, errors, password)
        known = [client for client, masters in answers if target.master in masters]
        _refuse_unless_known(target, known, answers)
        if not replicas:
            return []
        seen = await known[0].sentinel_slaves(target.master)  # type: ignore[no-untyped-call]
        return list(seen)
    finally:
        await asyncio.gather(*(s.aclose() for s in sentinels.sentinels))


async def replica_clients(
    target: SentinelUrl, policy: dict[str, Any], password: str | None
) -> list[tuple[str, Redis | None]]:
    """Each replica of `target`'s master as the sentinels see it now, by its `host:port`,
    with a client (the master's options: credentials, TLS, timeouts), or None when the
    sentinels hold it down: a failover promotes one of them."""
    found: list[tuple[str, Redis | None]] = []
    options: dict[str, Any] = {**policy, **target.options, **({"ssl": True} if target.tls else {})}
    for replica in await _ask_sentinels(target, policy, password, replicas=True):
        host, port = str(replica["ip"]), int(replica["port"])
        down = replica["is_sdown"] or replica["is_odown"] or replica["is_disconnected"]
        client = None if down else Redis(host=host, port=port, **options)
        found.append((host_port(host, port), client))
    return found


def _unanswered(
    target: SentinelUrl, errors: list[tuple[str, Exception]], password: str | None
) -> InvalidSetting:
    """Why no sentinel answered: their password (each refused it, or asked for one), or,
    a timeout over TLS: the sentinels may not take TLS (it said "Timeout connecting")."""
    said = "; ".join(f"{where}: {exc}" for where, exc in errors)
    if errors and all(isinstance(exc, AuthenticationError) for _, exc in errors):
        wrong = "is not set" if password is None else "is refused (or they have none: unset it)"
        return InvalidSetting(
            f"every sentinel asks for a password, and DISPATCHER_REDIS_SENTINEL_PASSWORD "
            f"{wrong}: {said}",
            param="DISPATCHER_REDIS_SENTINEL_PASSWORD",
        )
    tls = " over TLS (rediss+sentinel://: do the sentinels take TLS? redis+sentinel:// is without)"
    return InvalidSetting(
        f"no sentinel answered{tls if target.tls else ''} ({said}); check the hosts and ports "
        "(and DISPATCHER_REDIS_SENTINEL_PASSWORD when the sentinels have one)",
        param="DISPATCHER_REDIS_URL",
    )


def _refuse_unless_known(
    target: SentinelUrl, known: list[Redis], answers: list[tuple[Redis, dict[str, Any]]]
) -> None:
    if not known:
        names = sorted({str(name) for _, masters in answers for name in masters})
        raise InvalidSetting(
            f"no sentinel knows a master named {target.master!r} (they know: "
            f"{', '.join(map(repr, names)) or 'none'})",
            param="DISPATCHER_REDIS_URL",
        )
