"""The history's migrations that must not hold a table for long (versions 4, 5 and 8): run
outside one transaction, step by step, so that reads and the shipper's writes go on, and
each safe to run again after a crash (`schema.upgrade` runs them under its advisory lock
and writes the version row once one returns).

A lock that stops readers (ALTER TABLE's) is held for catalog changes only, in a short
transaction that waits at most `LOCK_TIMEOUT_MS` for it (`_locked`: every query queues
behind a waiting ALTER TABLE, so it gives way to a long query and tries again); the long
work takes no lock a reader or a writer waits for: rows rewritten in committed batches,
indexes built CONCURRENTLY, a constraint validated apart.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
import structlog

if TYPE_CHECKING:
    from dispatcher.history.database import Conn

__all__ = [
    "LOCK_TIMEOUT_MS",
    "MIGRATION_TIMEOUT_S",
    "UNINDEXED_SQL",
    "delivery_newest",
    "project_failed",
    "run",
    "url_hash",
]

log = structlog.get_logger(__name__)

LOCK_TIMEOUT_MS = 2000
# A migration's statements may build an index over the whole history: not the connection's
# command timeout (DISPATCHER_HISTORY_TIMEOUT, seconds) but an hour.
MIGRATION_TIMEOUT_S = 3600
_LOCK_TRIES = 30  # a catalog change given way to a long query this often, then an error
_LOCK_PAUSE_S = 1.0
_BATCH = 10_000  # pairs hashed per committed UPDATE

# A project's failures of every URL ("Failures, last hour"): one index range per day,
# whatever the number of its (event, url) pairs.
_PROJECT_FAILED = "(project_id, created_ms DESC, id DESC) WHERE failed"
# The day partitions of history_attempts with no index attached to the parent index $1
# (a name), newest first (the last hour's first, and the next to expire last).
UNINDEXED_SQL = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'history_attempts'::regclass AND NOT EXISTS (
   SELECT 1 FROM pg_index x JOIN pg_inherits xi ON xi.inhrelid = x.indexrelid
    WHERE x.indrelid = c.oid AND xi.inhparent = $1::regclass)
 ORDER BY c.relname DESC
"""
# An index of that name, left by a run a crash stopped: valid or not, and how.
_LEFT_SQL = """
SELECT x.indisvalid AS valid, x.indisunique AS is_unique, pg_get_indexdef(x.indexrelid) AS made
  FROM pg_index x WHERE x.indexrelid = to_regclass($1)
"""
_PARENT_VALID_SQL = "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass"


async def run(conn: Conn, sql: str, *args: object) -> None:
    await conn.execute(sql, *args, timeout=MIGRATION_TIMEOUT_S)


async def _built(conn: Conn, index: str, table: str, columns: str, *, unique: bool = False) -> None:
    """The index `index` on `table` `columns`, built CONCURRENTLY unless a run before
    finished it; one a crash left invalid, or that is not this one, is built again."""
    left = await conn.fetchrow(_LEFT_SQL, index)
    if (
        left is None
        or not left["valid"]
        or left["is_unique"] != unique
        or columns not in left["made"]
    ):
        await run(conn, f'DROP INDEX CONCURRENTLY IF EXISTS "{index}"')
        kind = "UNIQUE INDEX" if unique else "INDEX"
        await run(conn, f'CREATE {kind} CONCURRENTLY "{index}" ON "{table}" {columns}')


async def _locked(conn: Conn, sql: str) -> None:
    """`sql` in a transaction that waits at most `LOCK_TIMEOUT_MS` for its locks, tried
    again a second later while a long query holds them (up to `_LOCK_TRIES` times)."""
    for tried in range(1, _LOCK_TRIES + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                await run(conn, sql)
            return
        except asyncpg.LockNotAvailableError as exc:
            if tried == _LOCK_TRIES:
                raise RuntimeError(
                    f"a query held the history's tables past {_LOCK_TRIES} tries of"
                    f" {LOCK_TIMEOUT_MS} ms: run `dispatcher db upgrade` again once it ends"
                ) from exc
            log.info("history.migration_lock_waiting", tried=tried)
            await asyncio.sleep(_LOCK_PAUSE_S)


# ---- versions 4 and 8 --------------------------------------------------------------------


async def project_failed(conn: Conn) -> None:
    """Version 4: the index of a project's failures of every URL, a day at a time
    (`_partitioned_index`)."""
    await _partitioned_index(conn, "history_attempts_project_failed", _PROJECT_FAILED)


# A delivery's newest attempt, one index probe: the dead-letter view's test of each of its
# entries (a later attempt of its delivery?), and a delivery's attempts newest first. It
# holds the index on (delivery_id) it replaces: a delivery id is the same on every
# emission of its event id again, whose attempts that index gave in no order.
_DELIVERY_NEWEST = "(delivery_id, created_ms DESC, id DESC)"


async def delivery_newest(conn: Conn) -> None:
    """Version 8: the index of a delivery's attempts newest first, a day at a time
    (`_partitioned_index`); then the index on (delivery_id) alone dropped (a catalog
    change: `_locked`)."""
    await _partitioned_index(conn, "history_attempts_delivery_newest", _DELIVERY_NEWEST)
    await _locked(conn, "DROP INDEX IF EXISTS history_attempts_delivery")


async def _partitioned_index(conn: Conn, name: str, columns: str) -> None:
    """The index `name` of history_attempts on `columns`: made on the parent alone, then
    each day partition's built CONCURRENTLY and attached (a partition made meanwhile gets
    its own with it). Run again after a crash, it goes on: a partition's finished build
    is attached, one left invalid is made again."""
    await run(conn, f"CREATE INDEX IF NOT EXISTS {name} ON ONLY history_attempts {columns}")
    for row in await conn.fetch(UNINDEXED_SQL, name):
        await _index_day(conn, name, columns, row["relname"])
    if not await conn.fetchval(_PARENT_VALID_SQL, name):  # every day has its own, none attached
        raise RuntimeError(
            f"{name} is invalid though every day partition has its index: DROP INDEX {name},"
            " then `dispatcher db upgrade`"
        )


async def _index_day(conn: Conn, name: str, columns: str, table: str) -> None:
    """One day partition's index of the parent index `name`, built (unless a run before
    finished it) and attached; nothing when the day is dropped meanwhile (retention)."""
    index = f"{table}_{name.removeprefix('history_attempts_')}"
    try:
        await _built(conn, index, table, columns)
        await run(conn, f'ALTER INDEX {name} ATTACH PARTITION "{index}"')
    except asyncpg.UndefinedTableError:
        if not await conn.fetchval("SELECT to_regclass($1) IS NULL", table):
            raise


# ---- version 5 ---------------------------------------------------------------------------

# A pair is found by its URL's hash (sha256 of its UTF-8 bytes), the URL kept unindexed:
# a btree entry holds at most 2,704 bytes, and a URL the registry took could be longer
# (2,048 characters of up to four bytes): its pair's insert failed, and with it every
# batch of the shipper (review). The trigger fills the hash in on every insert, an older
# version's during a rolling upgrade too; the check (not valid yet: no scan) keeps every
# new row hashed while the rows before are.
_HASH_COLUMN = """
CREATE OR REPLACE FUNCTION history_url_hash(url text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$ SELECT sha256(convert_to(url, 'UTF8')) $fn$;
CREATE OR REPLACE FUNCTION history_pairs_hashed() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN NEW.url_hash := history_url_hash(NEW.url); RETURN NEW; END $fn$;
ALTER TABLE history_pairs ADD COLUMN IF NOT EXISTS url_hash bytea;
ALTER TABLE history_pairs DROP CONSTRAINT IF EXISTS history_pairs_url_hashed;
ALTER TABLE history_pairs ADD CONSTRAINT history_pairs_url_hashed
  CHECK (url_hash IS NOT NULL) NOT VALID;
DROP TRIGGER IF EXISTS history_pairs_hashed ON history_pairs;
CREATE TRIGGER history_pairs_hashed BEFORE INSERT OR UPDATE OF url ON history_pairs
  FOR EACH ROW EXECUTE FUNCTION history_pairs_hashed();
"""
# The rows stored before, a range of pair ids at a time (rows made since are hashed).
_HASH_ROWS = """
UPDATE history_pairs SET url_hash = history_url_hash(url)
 WHERE pair_id > $1 AND pair_id <= $2 AND url_hash IS NULL
"""
# SET NOT NULL reads no row: the validated check proves it. The unique index becomes the
# constraint version 5 made in one transaction (the same schema, whichever way it came).
_HASH_KEYED = """
ALTER TABLE history_pairs ALTER COLUMN url_hash SET NOT NULL;
ALTER TABLE history_pairs DROP CONSTRAINT history_pairs_url_hashed,
  DROP CONSTRAINT IF EXISTS history_pairs_project_id_event_url_key,
  ADD CONSTRAINT history_pairs_url_hash_key UNIQUE USING INDEX history_pairs_url_hash_key;
DROP INDEX IF EXISTS history_pairs_url;
"""
_KEYED_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'history_pairs'::regclass
                  AND conname = 'history_pairs_url_hash_key')
"""


async def url_hash(conn: Conn) -> None:
    """Version 5: pairs keyed by their URL's hash. The column, its function and trigger
    (a catalog change), the rows before hashed in batches, the check validated, both
    indexes built CONCURRENTLY, then the keys swapped (a catalog change). Each step is
    done again, or skipped, by a run after a crash; none holds the table while it works."""
    if await conn.fetchval(_KEYED_SQL):  # a run before finished, and died before its row
        return
    await _locked(conn, _HASH_COLUMN)
    await _backfill(conn)
    await run(conn, "ALTER TABLE history_pairs VALIDATE CONSTRAINT history_pairs_url_hashed")
    columns = "(project_id, event, url_hash)"
    await _built(conn, "history_pairs_url_hash_key", "history_pairs", columns, unique=True)
    await _built(conn, "history_pairs_url_hash", "history_pairs", "(project_id, url_hash)")
    await _locked(conn, _HASH_KEYED)


async def _backfill(conn: Conn) -> None:
    """The pairs stored before the trigger, hashed `_BATCH` at a time, each batch
    committed: no lock but the rows' own, held for one batch."""
    top = int(await conn.fetchval("SELECT coalesce(max(pair_id), 0) FROM history_pairs"))
    for low in range(0, top, _BATCH):
        await run(conn, _HASH_ROWS, low, low + _BATCH)
        if low and low % (100 * _BATCH) == 0:
            log.info("history.migration_progress", version=5, pairs=low, of=top)
