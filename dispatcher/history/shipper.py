"""The shipper: history records from the Redis stream into PostgreSQL, in batches.

One batch:
  1. XREAD up to `DISPATCHER_HISTORY_SHIP_BATCH` entries after the watermark (blocking
     up to a second when there are none);
  2. outside the transaction: pair ids and day partitions (`loader.py`);
  3. one transaction: lock the watermark row, drop the entries at or below it (another
     shipper committed them), COPY the rest, insert those not stored yet and count them,
     move the watermark to the batch's last stream id; COMMIT;
  4. only then XTRIM the stream up to the watermark.

Nothing is lost or stored twice: rows, counts and watermark commit together. Dying before
the COMMIT leaves everything in the stream; dying after it but before the trim leaves
entries that the watermark filters. A COMMIT whose answer was lost is settled by reading
the watermark again from the database, never from memory. A record appended twice (a
worker's pipeline sent again) is stored once, by its primary key.

Who ships: any number of shippers may run at once (each worker, `dispatcher history ship`);
one at a time holds a PostgreSQL advisory lock and ships, the others wait. A process that
dies frees its lock with its connection, so another takes over within `STANDBY_S`.

A PostgreSQL outage stops only this loop, which backs off and tries again: the workers go
on appending to the stream (its length is `dispatcher_history_backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg
import structlog

from dispatcher import clock, metrics
from dispatcher.connections import REDIS_ERRORS
from dispatcher.history import database
from dispatcher.history.loader import Loader, Pair, Row, parse_row
from dispatcher.history.schema import DAY_MS
from dispatcher.lua import Key, Script
from dispatcher.shard import ID_SPAN, Shard
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.settings import Settings

__all__ = ["Shipper"]

log = structlog.get_logger("dispatcher.history")

SHIP_LOCK = 0x6469_7370_6873_6970  # the shipper's advisory lock: "dispship"
STANDBY_S = 2.0  # how often a shipper without the lock asks for it again
# After a batch that was not full, let the next one gather for this long: a transaction
# costs the worker ~0.3 ms whatever its size, so a trickle of one record per transaction
# would cost more than the records (measured: +19 µs per delivery). Records are queryable
# this much later at most.
GATHER_S = 0.25
BACKOFF_CAP_S = 5.0  # a reconnect at least this often: shipping resumes soon after an outage
StreamId = tuple[int, int]


@dataclass
class SeedIds(Script):
    """Raises the record id `counter` to `top`, the largest id PostgreSQL holds: after a
    Redis that lost its data, ids must not start again below those already stored."""

    LUA = """
    local current = tonumber(redis.call('GET', counter) or '0')
    if current < tonumber(top) then redis.call('SET', counter, top) end
    return 1
    """
    counter: Key
    top: int


class Entry(NamedTuple):
    """A stream entry: its id, the record's time, whether its delivery gave up, its JSON,
    and the record as a row when the entry carries its columns (entries of older workers
    carry the JSON only)."""

    sid: StreamId
    created_ms: int
    dead: bool
    doc: bytes
    row: Row | None = None


def _row(fields: dict[bytes, bytes], at: int, dead: bool, doc: bytes) -> Row:
    """The row an entry's own columns describe (the status read from the JSON when the
    entry is an older worker's, which did not carry it)."""
    pair = (fields[b"p"].decode(), fields[b"e"].decode(), fields[b"u"].decode())
    status = fields.get(b"s")
    failed = parse_row(doc).failed if status is None else status == b"FAILED"
    return Row(
        int(fields[b"i"]),
        at,
        pair,
        fields.get(b"v", b"").decode() or None,
        dead,
        doc.decode(),
        failed,
    )


def _sid(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


class Shipper:
    """Ships `dispatcher:history:stream` to the database of `settings.history_url`."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        shard: Shard | None = None,
        *,
        elect: bool = True,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.stop = stop  # set: stop waiting for entries, ship what is left, end
        self.elect = elect  # take the advisory lock first (False: a test's second shipper)
        self.shard = shard = shard or Shard.single(settings.queue_name)
        self.stream = shard.keys.HISTORY_STREAM  # its key
        self.name = shard.stream_name  # its watermark's row in history_shipped
        self.lock = SHIP_LOCK + shard.index  # the shards' streams ship side by side
        self.conn: asyncpg.Connection | None = None
        self.loader: Loader | None = None
        self.pairs: dict[Pair, int] = {}
        self.watermark: StreamId = (0, 0)
        self.leading = False
        self.shipped = self.skipped = 0
        self.last_read = 0  # entries the last batch read

    # ---- one connection ----------------------------------------------------------------

    async def open(self) -> bool:
        """Connect (once), and (electing) take the lock; True when this shipper may ship.
        Reads the watermark, trims what an earlier shipper committed but did not trim, and
        keeps Redis' id counter above every stored id."""
        if self.conn is None:
            self.conn = await database.connect(self.settings)
        if self.elect and not await self.conn.fetchval(
            "SELECT pg_try_advisory_lock($1)", self.lock
        ):
            return False  # another shipper ships; ask again later on this connection
        self.loader = Loader(self.conn, self.pairs)
        await self.conn.execute(
            "INSERT INTO history_shipped (stream, last_id) VALUES ($1, '0-0')"
            " ON CONFLICT DO NOTHING",
            self.name,
        )
        self.watermark = _sid(
            await self.conn.fetchval(
                "SELECT last_id FROM history_shipped WHERE stream = $1", self.name
            )
        )
        floor = self.shard.id_floor
        top = await self.conn.fetchval(
            "SELECT max(id) FROM history_attempts WHERE id >= $1 AND id < $2",
            floor,
            floor + ID_SPAN,
        )
        if top is not None:
            await SeedIds(self.shard.keys.HISTORY_SEQ, int(top)).run(self.redis)
        await self._check_stream()
        await self._trim()
        self.leading = True
        return True

    async def _check_stream(self) -> None:
        """A stream whose ids stopped below the watermark was made anew (Redis lost its
        data, and its clock is behind): read it from the start, or its entries would be
        skipped. What is stored already is not stored again."""
        if not await self.redis.exists(self.stream):
            return
        info = await self.redis.xinfo_stream(self.stream)
        if _sid(info["last-generated-id"]) >= self.watermark:
            return
        assert self.conn is not None
        log.error(
            "history.stream_reset",
            watermark=_text(self.watermark),
            last_id=str(info["last-generated-id"]),
        )
        await self.conn.execute(
            "UPDATE history_shipped SET last_id = '0-0' WHERE stream = $1", self.name
        )
        self.watermark = (0, 0)

    async def close(self) -> None:
        """Drop the connection (and with it the lock) without waiting on a hung server."""
        self.leading = False
        if self.conn is not None:
            conn, self.conn, self.loader = self.conn, None, None
            conn.terminate()

    async def _trim(self) -> None:
        ms, seq = self.watermark
        if ms or seq:
            await self.redis.xtrim(self.stream, minid=f"{ms}-{seq + 1}", approximate=False)

    # ---- batches -----------------------------------------------------------------------

    async def ship_once(self, *, block_ms: int | None = None, now_ms: int | None = None) -> int:
        """Ship one batch (waiting up to `block_ms` for one); returns the records stored.
        Records past the retention are skipped (their day may be gone; never shown)."""
        assert self.conn is not None and self.loader is not None, "open() first"
        reply = await self._read(block_ms)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
        self.last_read = len(entries)
        if not entries:
            return 0
        now = clock.now_ms() if now_ms is None else now_ms
        oldest, newest = now - self.settings.retention_ms, now + DAY_MS
        batch = [e for e in self._entries(entries) if oldest <= e.created_ms <= newest]
        if len(batch) < len(entries):
            self.skipped += len(entries) - len(batch)
            log.warning(
                "history.ship_skipped",
                records=len(entries) - len(batch),
                reason="unreadable, past the retention, or in the future",
            )
        stored = await self._commit(batch, _sid(entries[-1][0]))
        await self._trim()
        self.shipped += stored
        metrics.HISTORY_SHIPPED.inc(stored)
        return stored

    async def _read(self, block_ms: int | None) -> Any:
        """XREAD after the watermark; a blocking one gives way to `stop` (a cancelled read
        costs only its connection)."""
        read = self.redis.xread(
            {self.stream: _text(self.watermark)},
            count=self.settings.history_ship_batch,
            block=block_ms,
        )
        if block_ms is None or self.stop is None:
            return await read
        reading = asyncio.ensure_future(read)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not reading.done():
            await cancel_all([reading])
            return None
        return reading.result()

    def _entries(self, raw: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
        entries = []
        for raw_sid, fields in raw:
            try:
                doc, dead = fields[b"r"], fields.get(b"d") == b"1"
                at = int(fields[b"t"]) if b"t" in fields else parse_row(doc).created_ms
                row = _row(fields, at, dead, doc) if b"i" in fields else None
            except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
                log.error("history.ship_unreadable", stream_id=raw_sid.decode(), error=repr(exc))
                continue
            entries.append(Entry(_sid(raw_sid), at, dead, doc, row))
        return entries

    async def _commit(self, batch: list[Entry], last: StreamId) -> int:
        """Store the entries after the committed watermark and move it to `last` (or keep
        it, when another shipper got further); returns how many records were new. A batch
        holding an entry that is no record is stored again entry by entry, without it."""
        assert self.loader is not None
        rows = [(entry.sid, entry.row) for entry in batch if entry.row is not None]
        try:
            if len(rows) == len(batch):  # the columns came with the entries: no JSON read
                await self.loader.prepare(row for _, row in rows)
                return await self._transaction(batch, last, parsed=rows)
            await self.loader.prepare_days(entry.created_ms for entry in batch)
            return await self._transaction(batch, last, parsed=None)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            log.error("history.ship_unreadable", error=repr(exc), records=len(batch))
        parsed = []
        for entry in batch:
            try:
                parsed.append((entry.sid, parse_row(entry.doc, entry.dead)))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("history.ship_unreadable", stream_id=_text(entry.sid), error=repr(exc))
        await self.loader.prepare(row for _, row in parsed)
        return await self._transaction(batch, last, parsed=parsed)

    async def _transaction(
        self, batch: list[Entry], last: StreamId, *, parsed: list[tuple[StreamId, Row]] | None
    ) -> int:
        """One transaction: the watermark row locked, the entries after it stored (as JSON,
        or as `parsed` rows), the watermark moved."""
        assert self.conn is not None and self.loader is not None
        async with self.conn.transaction():
            done = _sid(
                await self.conn.fetchval(
                    "SELECT last_id FROM history_shipped WHERE stream = $1 FOR UPDATE", self.name
                )
            )
            if parsed is None:
                records = [(e.dead, e.doc.decode()) for e in batch if e.sid > done]
                stored = await self.loader.insert_raw(records)
            else:
                stored = await self.loader.insert([row for sid, row in parsed if sid > done])
            if last > done:
                await self.conn.execute(
                    "UPDATE history_shipped SET last_id = $2, shipped = shipped + $3"
                    " WHERE stream = $1",
                    self.name,
                    _text(last),
                    stored,
                )
        self.watermark = max(last, done)
        return stored

    async def drain(self, *, now_ms: int | None = None) -> int:
        """Ship until nothing is left after the watermark; returns the records stored."""
        total = 0
        while True:
            before = self.watermark
            total += await self.ship_once(now_ms=now_ms)
            if self.watermark == before:
                return total

    # ---- the loop ----------------------------------------------------------------------

    async def run(self, *, drain_on_stop: bool = True) -> None:
        """Ship until `self.stop` is set (then, leading, what is left), taking over whenever
        no other shipper holds the lock. Never raises for an outage of PostgreSQL or Redis."""
        stop = self.stop or asyncio.Event()
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    if not self.leading and not await self.open():
                        await _wait(stop, STANDBY_S)
                        continue
                    await self.ship_once(block_ms=self._block_ms())
                    backoff = 0.5
                    if 0 < self.last_read < self.settings.history_ship_batch:
                        await _wait(stop, GATHER_S)
                except Exception as exc:  # an outage, or anything else: never a silent stop
                    self._failed(exc, backoff)
                    await self.close()
                    await _wait(stop, backoff)
                    backoff = min(BACKOFF_CAP_S, backoff * 2)
            if drain_on_stop and self.leading:
                await self.drain()
        except Exception as exc:  # the last drain: what is left waits for another shipper
            self._failed(exc, None)
        finally:
            await self.close()

    def _failed(self, exc: Exception, retry_in: float | None) -> None:
        metrics.HISTORY_SHIP_FAILURES.inc()
        if isinstance(exc, database.SCHEMA_MISSING):
            log.error(
                "history.ship_failed",
                error=repr(exc),
                retry_in_s=retry_in,
                hint="run `dispatcher db upgrade`",
            )
        elif isinstance(exc, (*database.OUTAGE, *REDIS_ERRORS)):
            log.warning("history.ship_failed", error=repr(exc), retry_in_s=retry_in)
        else:
            log.error("history.ship_failed", error=repr(exc), retry_in_s=retry_in)

    def _block_ms(self) -> int:
        """Wait for entries at most a second, and well inside the Redis read timeout."""
        return max(1, int(min(1000.0, self.settings.redis_timeout * 500)))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
