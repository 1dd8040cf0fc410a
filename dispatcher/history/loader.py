"""Records into PostgreSQL, in batches: what the shipper and `dispatcher history migrate`
share. Rows not already stored are inserted (by primary key: a record sent twice is stored
once) and exactly those are added to the per-minute and per-hour counts, in one statement.

Two ways in, both under the caller's transaction, each day's partitions made before it:

- `insert` (the shipper's, and `dispatcher history migrate`'s): rows whose columns are
  known (the stream entries carry them, so nobody reads the JSON), pair ids resolved
  beforehand (inserted in autocommit, so a rollback never leaves the cache holding a
  phantom id; cached, the `PAIRS_KEPT` used last: `PairIds`), COPYed into a temporary
  table.
- `insert_raw` (the shipper's for entries of older workers, which carry the JSON only):
  the records' JSON COPYed as it came; PostgreSQL reads the columns out of it and resolves
  the pairs itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import orjson

from dispatcher.history.schema import DAY_MS, ensure_partitions

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["PAIRS_KEPT", "Loader", "PairIds", "Row", "parse_row"]

Pair = tuple[str, str, str]  # project, event, url
PAIRS_KEPT = 16_384  # pair ids a shipper keeps (as the worker keeps URL hashes)
COLUMNS = ("id", "created_ms", "pair_id", "project_id", "delivery_id", "dead", "failed", "doc")

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS history_staging (
  id bigint, created_ms bigint, pair_id int, project_id text, delivery_id text,
  dead boolean, failed boolean, doc text
) ON COMMIT DELETE ROWS
"""
_RAW_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS history_raw (dead boolean, doc text) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS history_parsed (
  id bigint NOT NULL, created_ms bigint NOT NULL, project_id text NOT NULL, event text NOT NULL,
  url text NOT NULL, delivery_id text, dead boolean, failed boolean, doc text
) ON COMMIT DELETE ROWS
"""
# Each JSON document parsed once (NOT NULL: a document that is no record fails the batch).
_RAW_PARSE = """
INSERT INTO history_parsed
SELECT (j->>'id')::bigint, (j->>'createdTime')::bigint, j->>'projectId', j->>'events',
       j->>'callBackUrl', j->>'deliveryId', dead, j->>'status' = 'FAILED', doc
  FROM (SELECT dead, doc, doc::jsonb AS j FROM history_raw) r
"""
# Its own statement: the next one's snapshot sees the pairs a concurrent shipper just added.
_RAW_PAIRS = """
INSERT INTO history_pairs (project_id, event, url)
SELECT DISTINCT project_id, event, url FROM history_parsed ON CONFLICT DO NOTHING
"""
_FROM_STAGING = f"SELECT {', '.join(COLUMNS)} FROM history_staging"
_FROM_PARSED = """
SELECT r.id, r.created_ms, p.pair_id, r.project_id, r.delivery_id, r.dead, r.failed, r.doc
  FROM history_parsed r JOIN history_pairs p ON p.project_id = r.project_id
   AND p.event = r.event AND p.url_hash = history_url_hash(r.url)"""
# The source's rows not stored yet, and their counts; returns how many were new.
_INSERT_FROM = """
WITH fresh AS (
  INSERT INTO history_attempts ({columns})
  {source}
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
_INSERT_STAGED = _INSERT_FROM.format(columns=", ".join(COLUMNS), source=_FROM_STAGING)
_INSERT_PARSED = _INSERT_FROM.format(columns=", ".join(COLUMNS), source=_FROM_PARSED)
_UPSERT_PAIRS = """
INSERT INTO history_pairs (project_id, event, url)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING
"""
# A pair by its URL's hash (schema version 5; the insert's trigger fills it in).
_SELECT_PAIRS = """
SELECT p.pair_id, k.project_id, k.event, k.url
  FROM unnest($1::text[], $2::text[], $3::text[]) AS k(project_id, event, url)
  JOIN history_pairs p ON p.project_id = k.project_id AND p.event = k.event
   AND p.url_hash = history_url_hash(k.url)
"""


_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}  # fmt: skip


class Row(NamedTuple):
    """One record as stored."""

    id: int
    created_ms: int
    pair: Pair
    delivery_id: str | None
    dead: bool
    doc: str
    failed: bool


def parse_row(raw: bytes, dead: bool | None = None) -> Row:
    """A stored record's JSON as a row; `dead` defaults to "final and FAILED". Raises
    ValueError (or KeyError, TypeError) when it is not a record: JSON that is no object
    (null, a list, a string, a number) too."""
    rec = orjson.loads(raw)
    if not isinstance(rec, dict):
        raise ValueError(f"not a record: its JSON is no object ({_JSON_KIND[type(rec)]})")
    if dead is None:
        dead = bool(rec.get("final")) and rec.get("status") == "FAILED"
    pair = (str(rec["projectId"]), str(rec["events"]), str(rec["callBackUrl"]))
    delivery_id = rec.get("deliveryId")
    return Row(
        int(rec["id"]),
        int(rec["createdTime"]),
        pair,
        None if delivery_id is None else str(delivery_id),
        dead,
        raw.decode(),
        rec.get("status") == "FAILED",
    )


class PairIds:
    """Pair ids by project, event and the URL's hash, the `most` used last kept (ids never
    change; a miss costs one indexed lookup). The leading shipper kept every pair it ever
    met for the life of its process: 8.5 KB a pair of a long URL, 32 MiB for 4,000 (review);
    now at most `most` keys of ~200 bytes, whatever the URLs' length."""

    def __init__(self, most: int | None = None) -> None:
        self.most = PAIRS_KEPT if most is None else most
        self._ids: OrderedDict[tuple[str, str, bytes], int] = OrderedDict()  # by use

    def __len__(self) -> int:
        return len(self._ids)

    @staticmethod
    def _key(pair: Pair) -> tuple[str, str, bytes]:
        url = pair[2].encode(errors="surrogatepass")
        return pair[0], pair[1], hashlib.blake2b(url, digest_size=16).digest()

    def get(self, pair: Pair) -> int | None:
        """The pair's id, if kept (a use)."""
        key = self._key(pair)
        found = self._ids.get(key)
        if found is not None:
            self._ids.move_to_end(key)
        return found

    def put(self, pair: Pair, pair_id: int) -> None:
        key = self._key(pair)
        self._ids[key] = pair_id
        self._ids.move_to_end(key)
        while len(self._ids) > self.most:
            self._ids.popitem(last=False)


class Loader:
    """Stores rows on one connection (its pair ids and days are cached)."""

    def __init__(self, conn: asyncpg.Connection, pairs: PairIds | None = None) -> None:
        self.conn = conn
        self.pairs = PairIds() if pairs is None else pairs  # ids never change: share them
        self.days: set[int] = set()
        self._made: set[str] = set()  # temporary tables made on this connection

    async def prepare_days(self, created_ms: Iterable[int]) -> None:
        """Outside the batch's transaction: the partitions of the records' days."""
        for day in sorted({ms // DAY_MS for ms in created_ms} - self.days):
            await ensure_partitions(self.conn, day * DAY_MS, day * DAY_MS)
            self.days.add(day)

    def refused(self, exc: BaseException) -> None:
        """After a batch PostgreSQL refused: when no partition took a row (its day dropped
        since this loader made it: the retention, by hand), every day is looked up again
        and made at the next `prepare`. The days stayed cached, and that day's entries were
        set aside again and again until the leader restarted."""
        if isinstance(exc, asyncpg.CheckViolationError):  # "no partition ... found for row"
            self.days.clear()

    async def prepare(self, rows: Iterable[Row]) -> None:
        """Outside the batch's transaction: pair ids, partitions, the staging table."""
        rows = list(rows)
        await self._resolve_pairs({row.pair for row in rows})
        await self.prepare_days(row.created_ms for row in rows)
        await self._temporary(_STAGING)

    async def prepare_raw(self, created_ms: Iterable[int]) -> None:
        """Outside the batch's transaction: the partitions of the records' days, the
        tables of `insert_raw`."""
        await self.prepare_days(created_ms)
        await self._temporary(_RAW_TABLES)

    async def _temporary(self, sql: str) -> None:
        """Outside a transaction: made inside one, a rollback would drop the tables this
        connection counts as made (the next batch failed as if the schema were missing)."""
        if sql not in self._made:
            await self.conn.execute(sql)
            self._made.add(sql)

    async def insert_raw(self, records: list[tuple[bool, str]]) -> int:
        """Inside the caller's transaction, after `prepare_raw`: (dead, JSON) records
        stored as `insert` would; returns how many were new. Raises `asyncpg.DataError` or
        `asyncpg.IntegrityConstraintViolationError` when one of them is not a record."""
        if not records:
            return 0
        await self.conn.copy_records_to_table(
            "history_raw", records=records, columns=("dead", "doc")
        )
        await self.conn.execute(_RAW_PARSE)
        await self.conn.execute(_RAW_PAIRS)
        return int(await self.conn.fetchval(_INSERT_PARSED))

    async def insert(self, rows: list[Row]) -> int:
        """Inside the caller's transaction, after `prepare`: store the rows not stored yet
        and count them; returns how many were new."""
        if not rows:
            return 0
        ids = await self._ids({r.pair for r in rows})
        await self.conn.copy_records_to_table(
            "history_staging",
            records=[
                (
                    r.id,
                    r.created_ms,
                    ids[r.pair],
                    r.pair[0],
                    r.delivery_id,
                    r.dead,
                    r.failed,
                    r.doc,
                )
                for r in rows
            ],
            columns=COLUMNS,
        )
        return int(await self.conn.fetchval(_INSERT_STAGED))

    async def insert_one(self, row: Row) -> int:
        """`insert` of one row, the staging table emptied after it: rows stored one by one
        under savepoints of one transaction would pile up there until its commit."""
        stored = await self.insert([row])
        await self.conn.execute("DELETE FROM history_staging")
        return stored

    async def store(self, rows: list[Row]) -> int:
        """`prepare` and `insert` in a transaction of their own."""
        await self.prepare(rows)
        async with self.conn.transaction():
            return await self.insert(rows)

    async def _resolve_pairs(self, wanted: set[Pair]) -> None:
        missing = [pair for pair in wanted if self.pairs.get(pair) is None]
        if missing:
            await self.conn.execute(_UPSERT_PAIRS, *_columns(missing))  # autocommit
            await self._look_up(missing)

    async def _ids(self, pairs: set[Pair]) -> dict[Pair, int]:
        """The ids of `pairs` (resolved by `prepare`): kept, or looked up again when let go
        since (a batch of more pairs than are kept)."""
        ids, gone = {}, []
        for pair in pairs:
            found = self.pairs.get(pair)
            if found is None:
                gone.append(pair)
            else:
                ids[pair] = found
        if gone:
            ids.update(await self._look_up(gone))
        return ids

    async def _look_up(self, pairs: list[Pair]) -> dict[Pair, int]:
        found = {}
        for r in await self.conn.fetch(_SELECT_PAIRS, *_columns(pairs)):
            pair, pair_id = (r["project_id"], r["event"], r["url"]), int(r["pair_id"])
            self.pairs.put(pair, pair_id)
            found[pair] = pair_id
        return found


def _columns(pairs: list[Pair]) -> list[list[str]]:
    """Pairs as the three arrays the statements take."""
    return [list(c) for c in zip(*pairs, strict=True)]
