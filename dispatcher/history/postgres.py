"""The PostgreSQL history backend (`DISPATCHER_HISTORY_URL`), for fleets.

Writes never wait for PostgreSQL: `record` queues an XADD of the record onto
`dispatcher:history:stream`, in the pipeline that already carries the attempt's other
writes (one round trip, as with the Redis backend); the shipper (`shipper.py`) copies the
stream into PostgreSQL in batches and trims it once committed. A record is queryable once
shipped (milliseconds; as long as an outage lasts, during one).

Reads are one statement each, on a pool made at first use. The seed query runs the pair
lookup, `history_locate` (the exact count from the per-minute and per-hour counts, and
where the page lies) and the page itself in one round trip and one snapshot. Every read
hides what is past the retention, even before its day partition is dropped.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from dispatcher import clock
from dispatcher.errors import NotFound
from dispatcher.history import database, window
from dispatcher.history.ids import RecordIds
from dispatcher.history.schema import DAY_MS, drop_expired, ensure_partitions, require_needed
from dispatcher.history.stream import streamed
from dispatcher.history.window import Cursor, Recent, unknown_record
from dispatcher.lua import run_pipeline
from dispatcher.models import DeliveryStatus, HistoryPage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence

    import asyncpg
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord
    from dispatcher.history.stream import StreamRecord
    from dispatcher.keys import Keys
    from dispatcher.models import HistoryRecord
    from dispatcher.settings import Settings

__all__ = ["PostgresHistory", "backlog_of"]

# A pair is found by its URL's hash (schema version 5), never by the URL: a URL may be
# longer than a btree entry.
# $1 project $2 event $3 url $4 start ms $5 end ms $6 offset $7 limit
PAGE_SQL = """
WITH p AS (SELECT pair_id FROM history_pairs
            WHERE project_id = $1 AND event = $2 AND url_hash = history_url_hash($3)),
     w AS (SELECT p.pair_id, l.* FROM p, history_locate(p.pair_id, $4, $5, $6, $7) l)
SELECT w.total, r.doc
  FROM w LEFT JOIN LATERAL (
    SELECT a.doc FROM history_attempts a
     WHERE a.pair_id = w.pair_id AND a.created_ms BETWEEN w.lo AND w.hi
     ORDER BY a.created_ms DESC, a.id DESC OFFSET w.skip LIMIT $7) r ON true
"""
GET_SQL = "SELECT doc, project_id FROM history_attempts WHERE id = $1 AND created_ms >= $2"
MAX_ID = 2**63 - 1  # a record id is a bigint
# The dead letters: the newest dead rows (a partial index of them), at most $3 looked at,
# each kept when no later attempt of its delivery is (one probe of the index on
# (delivery_id, created_ms, id), schema version 8): one row a delivery, its newest
# attempt, none redelivered since. $1 oldest ms $2 limit $3 rows looked at {project}: the
# project's ($4), or nothing (every project's).
_DEAD = """
SELECT d.doc FROM (
  SELECT doc, project_id, delivery_id, created_ms, id FROM history_attempts
   WHERE {project} dead AND created_ms >= $1 ORDER BY created_ms DESC, id DESC LIMIT $3) d
 WHERE NOT EXISTS (
   SELECT FROM history_attempts n
    WHERE n.delivery_id = d.delivery_id AND n.project_id = d.project_id
      AND n.created_ms >= d.created_ms AND (n.created_ms, n.id) > (d.created_ms, d.id))
 ORDER BY d.created_ms DESC, d.id DESC LIMIT $2
"""
DEAD_SQL = _DEAD.format(project="project_id = $4 AND")
DEAD_ALL_SQL = _DEAD.format(project="")
ATTEMPTS_SQL = """
SELECT doc FROM history_attempts WHERE delivery_id = $1 AND project_id = $2 AND created_ms >= $3
 ORDER BY created_ms DESC, id DESC LIMIT $4
"""
# A window's final failures, newest first, keyset-paged by (created_ms, id) after ($6, $7).
FAILED_SQL = """
SELECT a.doc, a.created_ms, a.id FROM history_attempts a
 WHERE a.pair_id = (SELECT pair_id FROM history_pairs
                     WHERE project_id = $1 AND event = $2 AND url_hash = history_url_hash($3))
   AND a.dead AND a.created_ms BETWEEN $4 AND $5 AND (a.created_ms, a.id) < ($6, $7)
 ORDER BY a.created_ms DESC, a.id DESC LIMIT $8
"""
FAILED_BATCH = 500
# The newest attempts to some of a project's URLs (any event) before a cursor: per pair,
# an index range read; merged. $1 project $2 urls $3 start ms $4 end ms $5, $6 the cursor
# (ms, id) $7 limit. {status}: nothing, or a condition on `failed` (its partial index).
RECENT_SQL = """
SELECT r.doc FROM history_pairs p CROSS JOIN LATERAL (
    SELECT a.doc, a.created_ms, a.id FROM history_attempts a
     WHERE a.pair_id = p.pair_id AND a.created_ms BETWEEN $3 AND $4
       AND (a.created_ms, a.id) < ($5, $6) {status}
     ORDER BY a.created_ms DESC, a.id DESC LIMIT $7) r
 WHERE p.project_id = $1
   AND p.url_hash = ANY(ARRAY(SELECT history_url_hash(u) FROM unnest($2::text[]) u))
 ORDER BY r.created_ms DESC, r.id DESC LIMIT $7
"""
# A project's newest failed attempts, every URL and event: one range of its partial index.
# $1 project $2 start ms $3 end ms $4, $5 the cursor $6 limit.
FAILURES_SQL = """
SELECT doc FROM history_attempts
 WHERE project_id = $1 AND failed AND created_ms BETWEEN $2 AND $3 AND (created_ms, id) < ($4, $5)
 ORDER BY created_ms DESC, id DESC LIMIT $6
"""
RECENT_BY_STATUS = {
    None: RECENT_SQL.format(status=""),
    DeliveryStatus.FAILED: RECENT_SQL.format(status="AND a.failed"),
    DeliveryStatus.SUCCESS: RECENT_SQL.format(status="AND NOT a.failed"),
}


class PostgresHistory:
    """Attempt records in PostgreSQL, written through a Redis stream."""

    sweep_unit = "day partitions"

    def __init__(self, redis: Redis, settings: Settings, keys: Keys, id_floor: int = 0) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys
        self._ids = RecordIds(redis, keys, id_floor)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    # ---- writes ------------------------------------------------------------------------

    async def assign_ids(self, records: Iterable[AttemptRecord]) -> None:
        """Give each record without an `id` a new one (see `RecordIds`)."""
        await self._ids.assign(records)

    def recording(
        self, record: AttemptRecord, *, dead: bool = False, ending: Ending | None = None
    ) -> StreamRecord:
        """The script that appends the record (id assigned) to the stream, and writes what
        its attempt ends with (`ending`). Sent twice (a pipeline whose answer was lost), it
        is stored once: the shipper skips an id it already has."""
        return streamed(self.keys.HISTORY_STREAM, record, dead, ending)

    def record(
        self,
        pipe: Pipeline,
        record: AttemptRecord,
        *,
        dead: bool = False,
        ending: Ending | None = None,
    ) -> None:
        """Queue `recording` on `pipe`."""
        self.recording(record, dead=dead, ending=ending).queue_on(pipe)

    async def add(self, record: AttemptRecord, *, dead: bool = False) -> int:
        """Append one record now; returns its id (queryable once shipped)."""
        await self.assign_ids([record])
        await run_pipeline(self.redis, lambda pipe: self.record(pipe, record, dead=dead))
        return int(record["id"])

    async def backlog(self) -> tuple[int, float]:
        """Records in the stream not yet shipped (and trimmed), and the oldest one's age."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.ask_backlog(pipe)
            return backlog_of(*await pipe.execute())

    def ask_backlog(self, pipe: Pipeline) -> None:
        """Queue `backlog`'s reads on `pipe` (a caller's, with reads of its own); their two
        replies are `backlog_of`'s."""
        pipe.xlen(self.keys.HISTORY_STREAM)
        pipe.xrange(self.keys.HISTORY_STREAM, count=1)

    # ---- reads -------------------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        """The process's pool, made at first use, its schema checked (an outage or an
        older schema: `Unavailable`, and the next call tries again)."""
        async with self._pool_lock:
            if self._pool is None:
                with database.unavailable():
                    pool = await database.create_pool(self.settings)
                    try:
                        async with pool.acquire() as conn:
                            await require_needed(conn)
                    except BaseException:
                        pool.terminate()
                        raise
                    self._pool = pool
            return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self.pool()
        with database.unavailable():
            rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
        return rows

    def _cutoff(self, now_ms: int | None) -> int:
        return (clock.now_ms() if now_ms is None else now_ms) - self.settings.retention_ms

    async def query(
        self,
        project_id: str,
        url: str,
        event: str,
        *,
        start_ms: int,
        end_ms: int,
        page: int = 1,
        page_size: int = 20,
        now_ms: int | None = None,
    ) -> HistoryPage:
        """One page of the window, newest first, with its exact count. Records past the
        retention are not shown, even before their day is dropped, so `count` stays exact."""
        page_size = window.check_page(page, page_size, self.settings.history_max_page_size)
        start_ms = max(start_ms, self._cutoff(now_ms))
        rows: list[asyncpg.Record] = []
        if start_ms <= end_ms:
            rows = await self._fetch(
                PAGE_SQL,
                project_id,
                event,
                url,
                start_ms,
                end_ms,
                (page - 1) * page_size,
                page_size,
            )
        total = int(rows[0]["total"]) if rows else 0
        return HistoryPage(
            records=_records(rows),
            count=total,
            total_pages=math.ceil(total / page_size),
            page_size=page_size,
            page=page,
        )

    async def get(self, record_id: int, project_id: str | None = None) -> HistoryRecord:
        if record_id > MAX_ID:  # no such id (a path takes 19 digits): not a bigint's error
            raise NotFound(unknown_record(record_id, project_id))
        rows = await self._fetch(GET_SQL, record_id, self._cutoff(None))
        records = _records(rows)  # none when the model refuses it (`window.parse_record`)
        if not records or project_id not in (None, rows[0]["project_id"]):
            raise NotFound(unknown_record(record_id, project_id))
        return records[0]

    async def dead(self, project_id: str | None = None, limit: int = 50) -> list[HistoryRecord]:
        """The latest deliveries that gave up, of one project or of all, newest first: one
        row a delivery, its newest attempt, none redelivered since, in one statement (the
        newest `DEAD_LETTERS_SCANNED` dead rows looked at, at most: `DEAD_SQL`)."""
        head = (self._cutoff(None), limit, window.DEAD_LETTERS_SCANNED)
        if project_id is None:
            return _records(await self._fetch(DEAD_ALL_SQL, *head))
        return _records(await self._fetch(DEAD_SQL, *head, project_id))

    async def attempts(
        self,
        delivery_id: str,
        project_id: str,
        *,
        now_ms: int | None = None,
        limit: int = window.MAX_ATTEMPTS_SHOWN,
    ) -> list[HistoryRecord]:
        """The attempts of one delivery within the retention, newest first."""
        rows = await self._fetch(ATTEMPTS_SQL, delivery_id, project_id, self._cutoff(now_ms), limit)
        return _records(rows)

    async def recent(
        self,
        project_id: str,
        urls: Sequence[str],
        *,
        start_ms: int,
        end_ms: int,
        status: DeliveryStatus | None = None,
        before: Cursor | None = None,
        limit: int = 50,
        now_ms: int | None = None,
    ) -> Recent:
        """The newest attempts to any of `urls`, in one statement. Rows shipped before
        schema version 3 have no status column and show only unfiltered."""
        if not urls:
            return Recent([], None)
        sql, head = RECENT_BY_STATUS[status], (project_id, list(urls))
        return await self._newest(sql, head, start_ms, end_ms, before, limit, now_ms)

    async def failures(
        self,
        project_id: str,
        *,
        start_ms: int,
        end_ms: int,
        before: Cursor | None = None,
        limit: int = 50,
        now_ms: int | None = None,
    ) -> Recent:
        """The project's newest failed attempts, every URL and event, in one statement."""
        head = (project_id,)
        return await self._newest(FAILURES_SQL, head, start_ms, end_ms, before, limit, now_ms)

    async def _newest(
        self,
        sql: str,
        head: tuple[Any, ...],
        start_ms: int,
        end_ms: int,
        before: Cursor | None,
        limit: int,
        now_ms: int | None,
    ) -> Recent:
        """The newest `limit` rows of a keyset-paged `sql` (arguments: `head`, then the
        window within the retention, the cursor's (ms, id), the row count)."""
        start_ms = max(start_ms, self._cutoff(now_ms))
        after = (end_ms + 1, 0) if before is None else min((end_ms + 1, 0), tuple(before))
        if start_ms > end_ms:
            return Recent([], None)
        rows = await self._fetch(sql, *head, start_ms, end_ms, *after, limit + 1)
        return Recent.of(_records(rows), limit)

    async def final_failures(
        self, project_id: str, url: str, event: str, *, start_ms: int, end_ms: int
    ) -> AsyncIterator[HistoryRecord]:
        """Every attempt of the window after which its delivery gave up, newest first; each
        batch an index range read after the last one seen (never an OFFSET walk)."""
        start_ms = max(start_ms, self._cutoff(None))
        after = (end_ms + 1, 0)
        while True:
            rows = await self._fetch(
                FAILED_SQL, project_id, event, url, start_ms, end_ms, *after, FAILED_BATCH
            )
            for record in _records(rows):
                yield record
            if len(rows) < FAILED_BATCH:
                return
            after = (int(rows[-1]["created_ms"]), int(rows[-1]["id"]))

    # ---- retention ---------------------------------------------------------------------

    async def sweep(
        self,
        *,
        now_ms: int | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Create the day partitions from yesterday to two days ahead, and drop those wholly
        past the retention (both tables); returns how many were dropped. Each statement
        waits at most a few seconds for its lock; what could not be done is done next time."""
        now = clock.now_ms() if now_ms is None else now_ms
        pool = await self.pool()
        with database.unavailable():
            async with pool.acquire() as conn:
                await ensure_partitions(conn, now - DAY_MS, now + 2 * DAY_MS)
                dropped = await drop_expired(conn, now - self.settings.retention_ms)
        if on_batch is not None:
            on_batch(len(dropped))
        return len(dropped)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def _records(rows: list[asyncpg.Record]) -> list[HistoryRecord]:
    return window.parse_records(row["doc"].encode() for row in rows if row["doc"] is not None)


def backlog_of(length: Any, first: Any) -> tuple[int, float]:
    """`PostgresHistory.backlog` from the replies `ask_backlog` queued."""
    if not first:
        return int(length), 0.0
    oldest_ms = int(first[0][0].split(b"-")[0])
    return int(length), max(0.0, (clock.now_ms() - oldest_ms) / 1000)
