"""`dispatcher history migrate`: the history kept in Redis, copied into PostgreSQL.

Reads every record key of the Redis backend (SCAN, MGET by a thousand) and stores the
records with their ids through the shipper's loader, so running it twice, or while workers
already ship new records, stores each record once. Records past the retention are left
out. The Redis copies are not deleted: they expire by their TTL (retention + 1 day).

One record never stops the copy, as one entry never stops the shipper: a record it cannot
read (not JSON, no object, a field missing: edited by hand, another version's) is skipped,
logged with its key (`history.migrate_unreadable`) and counted; a batch PostgreSQL refuses
for one record's own sake is stored again record by record, and each refused alone is set
aside in `history_set_aside` (under the shard's stream, stream id `0-{record id}`, its
fields an entry the shipper reads: `dispatcher history set-aside retry` appends it to the
shard's stream once fixed), logged (`history.migrate_set_aside`) and counted. It stopped
at the first record it could not read, a bare KeyError, and at the same one at every run
(review).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, NamedTuple

import structlog

from dispatcher.clock import now_ms
from dispatcher.history import database
from dispatcher.history.entries import ENTRY_ERRORS, Aside, Entry, set_aside, sid_text
from dispatcher.history.kept import with_bodies
from dispatcher.history.loader import Loader, Row, parse_row

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = ["Migrated", "migrate"]

log = structlog.get_logger("dispatcher.history")

SCAN_COUNT = 1000
_BIGINT = 2**63
# What putting a record's body back raises for a record that is not one (not JSON, no object).
_UNREADABLE = (ValueError, TypeError, AttributeError, KeyError)


class Migrated(NamedTuple):
    """What a copy did: records read (within the retention), stored now (the others were
    there already, or set aside), skipped as unreadable, set aside (refused alone)."""

    read: int = 0
    stored: int = 0
    unreadable: int = 0
    set_aside: int = 0


async def migrate(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    stream: str,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Migrated:
    """Copy the Redis history of the shard whose stream is `stream` (its name: its row in
    history_shipped) into PostgreSQL."""
    dead = {int(m) for m in await redis.zrange(keys.HISTORY_DEAD, 0, -1)}
    conn = await database.connect(settings)
    copy = _Copy(redis, keys, Loader(conn), stream, dead, now_ms() - settings.retention_ms)
    try:
        names: list[bytes] = []
        async for name in redis.scan_iter(match=keys.HISTORY_RECORD_PREFIX + "*", count=SCAN_COUNT):
            names.append(name)
            if len(names) >= SCAN_COUNT:
                n, names = await copy.batch(names), []
                if on_batch is not None:
                    on_batch(n)
        if names:
            n = await copy.batch(names)
            if on_batch is not None:
                on_batch(n)
    finally:
        await conn.close()
    return copy.done


class _Copy:
    """One shard's copy, batch by batch, and its counts."""

    def __init__(
        self, redis: Redis, keys: Keys, loader: Loader, stream: str, dead: set[int], cutoff: int
    ) -> None:
        self.redis, self.keys, self.loader, self.stream = redis, keys, loader, stream
        self.dead, self.cutoff = dead, cutoff
        self.done = Migrated()

    async def batch(self, names: list[bytes]) -> int:
        """Copy the records of `names`; returns how many were read."""
        raws = await self.redis.mget(names)
        found = [(name, raw) for name, raw in zip(names, raws, strict=True) if raw is not None]
        rows: list[Row] = []
        for (name, _), raw in zip(found, await self._bodies([r for _, r in found]), strict=True):
            try:
                row = parse_row(raw)
            except Exception as exc:  # the record's own, whatever it is
                self._unreadable(name, exc)
                continue
            if row.created_ms >= self.cutoff:
                rows.append(row._replace(dead=row.id in self.dead))
        stored, refused = await self._store(rows)
        d = self.done
        self.done = d._replace(read=d.read + len(rows), stored=d.stored + stored,
                               set_aside=d.set_aside + refused)  # fmt: skip
        return len(rows)

    async def _bodies(self, raws: list[bytes]) -> list[bytes]:
        """The records with their kept bodies put back; one that is no record, as it is
        (`parse_row` says why)."""
        try:
            return _found(await with_bodies(self.redis, self.keys, raws, keep_name=False))
        except _UNREADABLE:  # one of them: each alone
            pass
        whole: list[bytes] = []
        for raw in raws:
            try:
                whole += _found(await with_bodies(self.redis, self.keys, [raw], keep_name=False))
            except _UNREADABLE:
                whole.append(raw)
        return whole

    def _unreadable(self, name: bytes, exc: BaseException) -> None:
        self.done = self.done._replace(unreadable=self.done.unreadable + 1)
        key = name.decode(errors="replace")
        log.error(
            "history.migrate_unreadable",
            key=key,
            record_id=key.removeprefix(self.keys.HISTORY_RECORD_PREFIX),
            error=repr(exc),
            hint="not a record: skipped, left in Redis until its TTL",
        )

    async def _store(self, rows: list[Row]) -> tuple[int, int]:
        """Store `rows`; one PostgreSQL refuses alone is set aside. Returns (stored, set
        aside)."""
        try:
            return await self.loader.store(rows), 0
        except ENTRY_ERRORS as exc:
            log.warning("history.migrate_record_by_record", error=repr(exc), records=len(rows))
            self.loader.refused(exc)
        stored, aside = 0, []
        for row in rows:
            try:
                stored += await self.loader.store([row])
            except ENTRY_ERRORS as exc:
                aside.append(_aside(row, exc))
        kept = await set_aside(self.loader.conn, self.stream, aside)
        for a in kept:
            log.error("history.migrate_set_aside", record_id=a.record_id,
                      project_id=a.project_id, stream=self.stream, stream_id=sid_text(a.sid),
                      error=a.error, hint="kept in history_set_aside")  # fmt: skip
        return stored, len(aside)


def _found(raws: Sequence[bytes | None]) -> list[bytes]:
    return [raw for raw in raws if raw is not None]  # (all: `with_bodies` keeps each)


def _aside(row: Row, exc: BaseException) -> Aside:
    """`row` set aside: an older worker's entry (its JSON and dead-letter flag, which the
    shipper reads), under stream id `0-{record id}` (no stream's: Redis's ids are times)."""
    seq = row.id
    if not 0 <= seq < _BIGINT:  # (the list orders by the id's parts, as bigints)
        seq = int.from_bytes(hashlib.blake2b(str(row.id).encode(), digest_size=7).digest())
    doc = row.doc.encode(errors="surrogatepass")
    fields = {b"r": doc, b"d": b"1" if row.dead else b"0"}
    return Aside.of(Entry((0, seq), row.created_ms, row.dead, doc, fields, row), exc, row)
