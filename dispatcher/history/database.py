"""PostgreSQL connections of the history, with the service's connection policy: every
connection and statement bounded by `DISPATCHER_HISTORY_TIMEOUT`, and an outage (refused,
reset, hung, shutting down) or a missing schema reported as `Unavailable` (503) with a
message a person can act on, never as a stack trace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher.errors import InvalidInput, Unavailable
from dispatcher.settings import EMBEDDED

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = [
    "OUTAGE",
    "SCHEMA_MISSING",
    "Conn",
    "SchemaBehind",
    "connect",
    "create_pool",
    "unavailable",
]

# A connection of its own, or one lent by a pool.
Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy

# What a PostgreSQL outage looks like to a caller (class 08 connection exceptions, class 57
# operator intervention: shutting down, cannot connect now, statement timeout).
OUTAGE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)


class SchemaBehind(Exception):
    """The history database's schema is older than this version's code needs (checked
    once per pool and at each shipper's start: `schema.require_needed`)."""


# A schema older than the code: found by the version check, or by a statement that names
# what a later migration adds (a table, a function, a column).
SCHEMA_MISSING: tuple[type[BaseException], ...] = (
    SchemaBehind,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedFunctionError,
    asyncpg.UndefinedColumnError,
)
# The server finds a vanished client within ~1 min (the OS default is 2 h): a shipper cut
# off by the network must not hold the shipping lock that long.
_APP = {
    "application_name": "callback-dispatcher",
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


def _url(settings: Settings) -> str:
    if not settings.history_url:
        raise RuntimeError("no DISPATCHER_HISTORY_URL: history lives in Redis")
    if settings.history_url == EMBEDDED:  # the entry point replaces it with the server's URL
        raise RuntimeError("DISPATCHER_HISTORY_URL=embedded: start `dispatcher run` first")
    return settings.history_url


async def connect(settings: Settings) -> asyncpg.Connection:
    """One connection of its own (the shipper's, migrations')."""
    timeout = settings.history_timeout
    conn: asyncpg.Connection = await asyncpg.connect(
        _url(settings), timeout=timeout, command_timeout=timeout, server_settings=_APP
    )
    return conn


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """The pool of a process's reads (API, console, CLI)."""
    timeout = settings.history_timeout
    pool: asyncpg.Pool = await asyncpg.create_pool(
        _url(settings),
        min_size=1,
        max_size=10,
        timeout=timeout,
        command_timeout=timeout,
        server_settings=_APP,
    )
    return pool


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """Turn an outage or a missing schema into `Unavailable` (503), a value PostgreSQL
    cannot take (a NUL in text, past a bigint) into `InvalidInput` (400)."""
    try:
        yield
    except asyncpg.DataError as exc:
        raise InvalidInput(f"a value the history database cannot take: {exc}") from exc
    except SCHEMA_MISSING as exc:
        raise Unavailable(
            f"the history database has no (or an old) schema: run `dispatcher db upgrade` ({exc})"
        ) from exc
    except OUTAGE as exc:
        raise Unavailable(
            f"the history database (PostgreSQL) is unreachable; retry in a few seconds "
            f"({type(exc).__name__}: {exc})"
        ) from exc
