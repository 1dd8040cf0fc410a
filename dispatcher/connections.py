"""Redis connections: one pool per process, with the service's connection policy.

Every connection has connect and read timeouts (a hung Redis cannot hold a caller for
longer than `DISPATCHER_REDIS_TIMEOUT`), and idempotent commands are retried a few times
with backoff on a refused or reset connection, so a blip is not an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["REDIS_ERRORS", "connect", "redis_full", "redis_settings", "require_url"]

# What a Redis outage looks like to a caller: refused, reset, timed out, LOADING (a
# BusyLoadingError is a ConnectionError), or the OS-level error beneath them.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
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


def connect(settings: Settings, url: str | None = None) -> Redis:
    """The process's pool (connections are opened on first use)."""
    redis: Redis = Redis.from_url(
        require_url(settings, url),
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    )
    return redis


def redis_settings(settings: Settings, url: str | None = None) -> RedisSettings:
    """arq's settings for the same policy."""
    arq_settings = RedisSettings.from_dsn(require_url(settings, url))
    arq_settings.conn_timeout = int(max(1, settings.redis_timeout))
    arq_settings.conn_retries = 30
    arq_settings.conn_retry_delay = 1
    arq_settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]
    arq_settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20)
    return arq_settings
