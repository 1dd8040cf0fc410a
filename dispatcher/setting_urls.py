"""What a setting's URL must be: one Redis (a server, or the master of a Sentinel group), a
Redis Cluster, a shard each, an egress proxy. Checked when `Settings` are read, so a
mistyped URL stops a process at start with a message that names the problem, never the URL
(it may hold a password)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from dispatcher.cluster import is_cluster_url, parse_cluster_url
from dispatcher.failover import is_sentinel_url, parse_sentinel_url

__all__ = ["allowed_hosts", "check_redis_url", "check_shard_urls", "one_redis", "proxy_problem"]

# A host as a browser writes it in Host: a name (letters, digits, `-`, `_`, dots) or an
# address, an IPv6 one in brackets; `*`, any host.
_HOST = re.compile(r"\*|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")


def proxy_problem(url: str) -> str | None:
    """Why `url` cannot be an egress proxy's URL (http:// or https://, a host, maybe a
    port and credentials, nothing else), or None. Checked at start: a mistyped proxy would
    otherwise fail every delivery of its region."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        return "not a URL, or its port is not a number"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://, e.g. http://proxy.internal:3128"
    if not parts.hostname:
        return "names no host"
    try:  # 127.1, 2130706433: the client refuses an address not written a.b.c.d
        if re.fullmatch(r"[0-9.]+|0[xX][0-9a-fA-F.]*", parts.hostname):
            ipaddress.IPv4Address(parts.hostname)
    except ValueError:
        return "an IPv4 address must be written as four numbers, a.b.c.d"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must hold no path, query or fragment"
    return None


def one_redis(url: str) -> bool:
    """Whether `url` names one Redis (a server, or the master of a Sentinel group); a
    malformed Sentinel URL raises, saying what is wrong."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return True
    return url.startswith(("redis://", "rediss://", "unix://"))


def check_redis_url(url: str) -> None:
    """Raise `ValueError` saying what is wrong unless `url` (DISPATCHER_REDIS_URL) names one
    Redis or a Redis Cluster."""
    if is_cluster_url(url):
        parse_cluster_url(url)
    elif not one_redis(url):
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+sentinel://, "
            "rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )


def check_shard_urls(urls: list[str]) -> None:
    """Raise `ValueError` saying what is wrong unless each of `urls` (DISPATCHER_REDIS_SHARDS)
    names one Redis, a different one each."""
    for url in urls:
        if not one_redis(url):
            raise ValueError(
                "each shard must be a redis://, rediss://, unix://, redis+sentinel:// or "
                "rediss+sentinel:// URL (a Redis Cluster goes in DISPATCHER_REDIS_URL)"
            )
    if len(set(urls)) < len(urls):
        raise ValueError("a URL is listed twice: two shards cannot share one Redis")


def allowed_hosts(names: frozenset[str]) -> frozenset[str]:
    """`names` (DISPATCHER_ALLOWED_HOSTS) as the API compares them with a request's Host
    (`api.middleware.host_refusal`): lower case, without a trailing dot. Raise `ValueError`
    for one that is not a host alone: with a scheme, a port or a path it would never match,
    and the proxy it was meant for would be refused at every request."""
    kept = set()
    for name in names:
        host = name.strip().lower().rstrip(".")
        if not _HOST.fullmatch(host):
            raise ValueError(
                f"{name[:64]!r} is not a host name or address alone (no scheme, port or path; "
                "an IPv6 address in brackets), e.g. dispatcher.example.com"
            )
        kept.add(host)
    return frozenset(kept)
