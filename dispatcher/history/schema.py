"""The PostgreSQL history's schema: versioned migrations and day partitions.

`upgrade(conn)` applies the missing migrations in order, each in its own transaction with
its version row (or, when that would hold a table too long, step by step outside one and
safe to run again: `online.py`), under a session advisory lock: it is idempotent and safe
when several processes run it at once (`dispatcher db upgrade`, `dispatcher run`).
Migrations are append-only: a released one is never edited, a change is a new version
(version 5 was made to run step by step, ending in the schema it made in one transaction).

Tables
    history_schema     version -> applied_at
    history_pairs      (project_id, event, url) -> pair_id, unique by the URL's hash
                       (since version 5); never deleted
    history_attempts   one row per attempt, RANGE-partitioned by UTC day on created_ms;
                       `doc` is the record's JSON as the API returns it; `failed` its
                       status (since version 3); a delivery's attempts indexed newest
                       first (since version 8: the dead letters' test of a later attempt)
    history_counts     exact per-pair counts per minute and per hour, partitioned by day on
                       bucket_ms, written in the shipper's transaction with the rows
    history_shipped    the shipper's watermark: the last stream id committed
    history_set_aside  stream entries the shipper could not store, with why (version 6;
                       `entries.py`), kept for the retention; each entry's fields as the
                       worker wrote them since version 7 (to ship one again)

Retention drops whole day partitions (`drop_expired`), never DELETEs records (only the
rare set-aside entries are deleted, by their time). Both DDL statements
lock the parent table, so they run with a lock timeout and are retried at the next sweep
rather than queue every reader behind a long query.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import structlog

from dispatcher.history.database import SchemaBehind
from dispatcher.history.locate import LOCATE_FUNCTIONS
from dispatcher.history.online import (
    LOCK_TIMEOUT_MS,
    delivery_newest,
    project_failed,
    run,
    url_hash,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dispatcher.history.database import Conn

__all__ = [
    "DAY_MS",
    "MIGRATIONS",
    "NEEDS",
    "drop_expired",
    "ensure_partitions",
    "needed",
    "partitions",
    "require_needed",
    "schema_version",
    "upgrade",
]

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000
_LOCK = 0x6469_7370_6873_7431  # the migrations' advisory lock: "disphst1"
_VERSION_ROW = "INSERT INTO history_schema (version) VALUES ($1)"
_LOCK_POLL_S = 0.2
_LOCK_POLLS_LOGGED = 150  # a wait for the lock is logged every 30 s
PARENTS = ("history_attempts", "history_counts")

_TABLES = """
CREATE TABLE history_pairs (
  pair_id    int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  project_id text NOT NULL,
  event      text NOT NULL,
  url        text NOT NULL,
  UNIQUE (project_id, event, url)
);
CREATE TABLE history_attempts (
  id          bigint  NOT NULL,  -- from Redis (dispatcher:history:seq), as with the Redis store
  created_ms  bigint  NOT NULL,  -- createdTime
  pair_id     int     NOT NULL,
  project_id  text    NOT NULL,
  delivery_id text,
  dead        boolean NOT NULL,  -- the delivery gave up after this attempt
  doc         text    NOT NULL,  -- the record's JSON, id included, as the API returns it
  PRIMARY KEY (id, created_ms)   -- a primary key must hold the partition key
) PARTITION BY RANGE (created_ms);
CREATE INDEX history_attempts_window ON history_attempts (pair_id, created_ms DESC, id DESC);
CREATE INDEX history_attempts_delivery ON history_attempts (delivery_id);
CREATE INDEX history_attempts_dead ON history_attempts (project_id, created_ms DESC, id DESC)
  WHERE dead;
CREATE INDEX history_attempts_dead_all ON history_attempts (created_ms DESC, id DESC)
  WHERE dead;
CREATE INDEX history_attempts_dead_pair ON history_attempts (pair_id, created_ms DESC, id DESC)
  WHERE dead;
CREATE TABLE history_counts (
  pair_id   int    NOT NULL,
  span      int    NOT NULL,     -- 60000 (a minute) or 3600000 (an hour)
  bucket_ms bigint NOT NULL,     -- its start
  n         bigint NOT NULL,
  PRIMARY KEY (pair_id, span, bucket_ms)
) PARTITION BY RANGE (bucket_ms);
CREATE TABLE history_shipped (
  stream  text PRIMARY KEY,
  last_id text NOT NULL,         -- 'ms-seq' of the last stream entry committed
  shipped bigint NOT NULL DEFAULT 0
);
"""

# A callback's "Recent deliveries" across its events, filtered by status. The column is
# NULL for rows shipped before this version (they show unfiltered only); adding it is a
# catalog change, and the partial index holds only the failed rows shipped from now on.
_FAILED = """
ALTER TABLE history_attempts ADD COLUMN failed boolean;
CREATE INDEX history_attempts_failed ON history_attempts (pair_id, created_ms DESC, id DESC)
  WHERE failed;
CREATE INDEX history_pairs_url ON history_pairs (project_id, url);
"""

# What the shipper could not store (refused alone by PostgreSQL, or no record), kept for
# the operator with why (`entries.py`); found by its stream id, nothing else indexed.
_SET_ASIDE = """
CREATE TABLE history_set_aside (
  stream       text NOT NULL,   -- the stream's name (its row in history_shipped)
  stream_id    text NOT NULL,   -- the entry's id in it
  record_id    text,            -- the record's id and project, when they could be read
  project_id   text,
  error        text NOT NULL,   -- why it was set aside
  entry        bytea NOT NULL,  -- the record's JSON as written (or the entry's fields)
  set_aside_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (stream, stream_id)
);
"""


# The entry's fields as the worker wrote them (a JSON object, in their order), beside the
# record's JSON: what is appended to the stream again to ship it. NULL
# for what was set aside before.
_SET_ASIDE_FIELDS = "ALTER TABLE history_set_aside ADD COLUMN fields bytea"


# A step is SQL run in one transaction with its version row, or (when it must not hold its
# locks that long) a function run outside one, which must be safe to run again.
MIGRATIONS: list[tuple[int, str | Callable[[Conn], Awaitable[None]]]] = [
    (1, _TABLES), (2, LOCATE_FUNCTIONS), (3, _FAILED), (4, project_failed), (5, url_hash),
    (6, _SET_ASIDE), (7, _SET_ASIDE_FIELDS), (8, delivery_newest),
]  # fmt: skip

# For each version, the lowest version the shipper's inserts and the reads need while it is
# the latest: itself when it changes tables, columns or functions; the version before's
# when it only adds indexes (4 and 8, built CONCURRENTLY, for hours on a big history).
# The processes of a new version check this, not the latest, so that they ship and answer
# while such a migration runs; `upgrade` (and `heal`) still go on to the latest. A new
# version adds its row.
NEEDS: dict[int, int] = {1: 1, 2: 2, 3: 3, 4: 3, 5: 5, 6: 6, 7: 7, 8: 7}


class Busy(Exception):
    """Another process holds the migrations' lock: it is upgrading (`upgrade(wait=False)`)."""


async def upgrade(conn: Conn, *, wait: bool = True) -> list[int]:
    """Apply the missing migrations; returns the versions applied now. Holds a session
    advisory lock throughout: even `CREATE TABLE IF NOT EXISTS` fails when two sessions
    run it at once (a unique violation in pg_type), so nothing runs outside the lock.
    Not `wait`: `Busy` at once when another process holds it."""
    applied: list[int] = []
    if not await _lock(conn, wait=wait):
        raise Busy("another process is upgrading the history schema")
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS history_schema"
            " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM history_schema")}
        for version, step in MIGRATIONS:
            if version in done:
                continue
            if isinstance(step, str):
                async with conn.transaction():  # the DDL and its version row, or neither
                    await run(conn, step)
                    await conn.execute(_VERSION_ROW, version)
            else:  # its work, then its row: a crash between runs it again
                await step(conn)
                await conn.execute(_VERSION_ROW, version)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    return applied


async def _lock(conn: Conn, *, wait: bool = True) -> bool:
    """Take the migrations' lock, waiting as long as another process holds it (a
    migration may run for hours: version 4 builds an index per day), by asking again and
    again, never inside a statement: its snapshot would hold up the CONCURRENTLY build of
    the session that has the lock, while that session held up this one (a deadlock).
    Not `wait`: False at once when another holds it."""
    polls = 0
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK):
        if not wait:
            return False
        if polls % _LOCK_POLLS_LOGGED == 0:  # the first wait, then every 30 s
            log.info("history.migrations_waiting", seconds=round(polls * _LOCK_POLL_S))
        await asyncio.sleep(_LOCK_POLL_S)
        polls += 1
    return True


async def schema_version(conn: Conn) -> int:
    """The latest version applied (0: none)."""
    if not await conn.fetchval("SELECT to_regclass('history_schema') IS NOT NULL"):
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM history_schema"))


def needed() -> int:
    """The lowest schema version this version's statements work on (`NEEDS`)."""
    return NEEDS[MIGRATIONS[-1][0]]


async def require_needed(conn: Conn) -> None:
    """Raise `SchemaBehind` (a 503 saying to run `dispatcher db upgrade`) when the schema
    is older than this version's statements need (`needed`): they would fail one by one (a
    column not there: a 500). A schema whose latest migration only adds an index, still
    building, is not behind: the shipper ships and reads are answered meanwhile (they were
    refused until it ended, and records piled up in Redis up to the backlog limit)."""
    version, least = await schema_version(conn), needed()
    if version < least:
        raise SchemaBehind(f"the history schema is version {version}, this version needs {least}")


def day_suffix(day: int) -> str:
    """`pYYYYMMDD` of a UTC day number (epoch ms // DAY_MS)."""
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("p%Y%m%d")


async def ensure_partitions(conn: Conn, from_ms: int, to_ms: int) -> list[str]:
    """Create the missing day partitions of both tables covering [from_ms, to_ms]; returns
    the names created. Raises `asyncpg.LockNotAvailableError` when a long query holds the
    parent past the lock timeout (try again later)."""
    created: list[str] = []
    for day in range(from_ms // DAY_MS, to_ms // DAY_MS + 1):
        for parent in PARENTS:
            name = f"{parent}_{day_suffix(day)}"
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                continue
            fill = " WITH (fillfactor = 90)" if parent == "history_counts" else ""  # HOT n = n + k
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {parent}"
                        f" FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS}){fill}"
                    )
            except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                continue  # another process made it at the same moment (IF NOT EXISTS races)
            created.append(name)
    return created


async def partitions(conn: Conn) -> list[tuple[str, int, int]]:
    """Every day partition of both tables: (name, from ms, to ms), oldest first."""
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent IN ('history_attempts'::regclass, 'history_counts'::regclass)"""
    )
    found = []
    for row in rows:  # FOR VALUES FROM ('1764374400000') TO ('1764460800000')
        bound = str(row["bound"])
        low = int(bound.split("FROM ('", 1)[1].split("'", 1)[0])
        high = int(bound.split("TO ('", 1)[1].split("'", 1)[0])
        found.append((str(row["relname"]), low, high))
    return sorted(found, key=lambda p: (p[1], p[0]))


async def drop_expired(conn: Conn, cutoff_ms: int) -> list[str]:
    """Drop the day partitions wholly older than `cutoff_ms` (now - retention); returns
    their names. Reads clamp their window to the cutoff, so what a day that is partly
    past it still holds is never shown, and counts stay exact. The entries set aside
    before the cutoff are deleted (a few rows, no partitions)."""
    dropped: list[str] = []
    await conn.execute(
        "DELETE FROM history_set_aside WHERE set_aside_at < to_timestamp($1::bigint / 1000.0)",
        cutoff_ms,
    )
    for name, _, high in await partitions(conn):
        if high <= cutoff_ms:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
            dropped.append(name)
    return dropped
