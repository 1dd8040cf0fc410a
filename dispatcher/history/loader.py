"""Records into PostgreSQL, in batches: what the shipper and `dispatcher history migrate`
share.

Before a batch's transaction: each (project, event, url) gets its pair id (cached; inserted
with ON CONFLICT DO NOTHING in autocommit, so a rollback never leaves the cache holding an
id that does not exist) and each day its partitions. Inside it: one COPY into a temporary
staging table, then one statement that inserts the rows not already stored (by primary key:
a record sent twice is stored once) and adds exactly those to the per-minute and per-hour
counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import orjson

from dispatcher.history.schema import DAY_MS, ensure_partitions

if TYPE_CHECKING:
    from collections.abc import Iterable

    import asyncpg

__all__ = ["Loader", "Row", "parse_row"]

Pair = tuple[str, str, str]  # project, event, url
COLUMNS = ("id", "created_ms", "pair_id", "project_id", "delivery_id", "dead", "doc")

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS history_staging (
  id bigint, created_ms bigint, pair_id int, project_id text, delivery_id text,
  dead boolean, doc text
) ON COMMIT DELETE ROWS
"""
# The staged rows not stored yet, and their counts; returns how many were new.
_INSERT = """
WITH fresh AS (
  INSERT INTO history_attempts (id, created_ms, pair_id, project_id, delivery_id, dead, doc)
  SELECT id, created_ms, pair_id, project_id, delivery_id, dead, doc FROM history_staging
  ON CONFLICT DO NOTHING
  RETURNING pair_id, created_ms
), counted AS (
  INSERT INTO history_counts (pair_id, span, bucket_ms, n)
  SELECT f.pair_id, s.span, f.created_ms - f.created_ms % s.span, count(*)
    FROM fresh f CROSS JOIN (VALUES (60000), (3600000)) AS s(span)
   GROUP BY 1, 2, 3
  ON CONFLICT (pair_id, span, bucket_ms) DO UPDATE SET n = history_counts.n + EXCLUDED.n
)
SELECT count(*) FROM fresh
"""
_UPSERT_PAIRS = """
INSERT INTO history_pairs (project_id, event, url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING
"""
_SELECT_PAIRS = """
SELECT p.pair_id, p.project_id, p.event, p.url FROM history_pairs p
  JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(project_id, event, url)
 USING (project_id, event, url)
"""


class Row(NamedTuple):
    """One record as stored."""

    id: int
    created_ms: int
    pair: Pair
    delivery_id: str | None
    dead: bool
    doc: str


def parse_row(raw: bytes, dead: bool | None = None) -> Row:
    """A stored record's JSON as a row; `dead` defaults to "final and FAILED". Raises
    ValueError (or KeyError, TypeError) when it is not a record."""
    rec = orjson.loads(raw)
    if dead is None:
        dead = bool(rec.get("final")) and rec.get("status") == "FAILED"
    pair = (str(rec["projectId"]), str(rec["events"]), str(rec["callBackUrl"]))
    delivery_id = rec.get("deliveryId")
    return Row(int(rec["id"]), int(rec["createdTime"]), pair,
               None if delivery_id is None else str(delivery_id), dead,
               raw.decode())  # fmt: skip


class Loader:
    """Stores rows on one connection (its pair ids and days are cached)."""

    def __init__(self, conn: asyncpg.Connection, pairs: dict[Pair, int] | None = None) -> None:
        self.conn = conn
        self.pairs = {} if pairs is None else pairs  # ids never change: share across reconnects
        self.days: set[int] = set()
        self._staging = False

    async def prepare(self, rows: Iterable[Row]) -> None:
        """Outside the batch's transaction: pair ids, partitions, the staging table."""
        rows = list(rows)
        await self._resolve_pairs({row.pair for row in rows})
        for day in sorted({row.created_ms // DAY_MS for row in rows} - self.days):
            await ensure_partitions(self.conn, day * DAY_MS, day * DAY_MS)
            self.days.add(day)
        if not self._staging:
            await self.conn.execute(_STAGING)
            self._staging = True

    async def insert(self, rows: list[Row]) -> int:
        """Inside the caller's transaction, after `prepare`: store the rows not stored yet
        and count them; returns how many were new."""
        if not rows:
            return 0
        await self.conn.copy_records_to_table(
            "history_staging",
            records=[
                (r.id, r.created_ms, self.pairs[r.pair], r.pair[0], r.delivery_id, r.dead, r.doc)
                for r in rows
            ],
            columns=COLUMNS,
        )
        return int(await self.conn.fetchval(_INSERT))

    async def store(self, rows: list[Row]) -> int:
        """`prepare` and `insert` in a transaction of their own."""
        await self.prepare(rows)
        async with self.conn.transaction():
            return await self.insert(rows)

    async def _resolve_pairs(self, wanted: set[Pair]) -> None:
        missing = [pair for pair in wanted if pair not in self.pairs]
        if not missing:
            return
        columns = [list(c) for c in zip(*missing, strict=True)]
        await self.conn.execute(_UPSERT_PAIRS, *columns)  # autocommit: never rolled back
        for r in await self.conn.fetch(_SELECT_PAIRS, *columns):
            self.pairs[(r["project_id"], r["event"], r["url"])] = int(r["pair_id"])
