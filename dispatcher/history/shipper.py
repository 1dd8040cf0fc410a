"""The shipper: history records from the Redis stream into PostgreSQL, in batches.

One batch:
  1. XREAD up to `DISPATCHER_HISTORY_SHIP_BATCH` entries after the watermark (blocking
     up to a second when there are none), in small reads and at most a few MB
     (`ship_read.py`; fewer entries after a batch that failed);
  2. outside the transaction: pair ids and day partitions (`loader.py`);
  3. one transaction: lock the watermark row, drop the entries at or below it (another
     shipper committed them), COPY the rest, insert those not stored yet and count them,
     move the watermark to the batch's last stream id; COMMIT;
  4. only then XTRIM the stream up to the watermark, on the node it was learned on only:
     another node behind the stream (a failover) makes it read again from its start
     (`ship_node.py`), as does a shipper that just took the lock.

A batch that fails for one entry's own sake (its data, an integrity rule, a limit such as an
index entry's size) is stored again entry by entry, in one transaction still, and each
entry refused alone is set aside (`entries.py`: kept in `history_set_aside` with why, in the
same transaction, then logged and counted), as is an entry that is no record: one entry
never holds the others back.

Nothing is lost or stored twice: rows, counts and watermark commit together. Dying before
the COMMIT leaves everything in the stream; dying after it but before the trim leaves
entries that the next shipper reads again and stores once, by their primary key. A COMMIT
whose answer was lost is settled by reading the watermark again from the database, never
from memory. A record appended twice (a
worker's pipeline sent again) is stored once, by its primary key.

Who ships: any number of shippers may run at once (each worker, `dispatcher history ship`);
one at a time holds a PostgreSQL advisory lock and ships, the others wait. A process that
dies frees its lock with its connection, so another takes over within `STANDBY_S`; one
frozen loses its session, and the lock, past `IDLE_S` idle (`ship_session.py`).

A PostgreSQL outage stops only this loop, which backs off and tries again: the workers go
on appending to the stream (its length is `dispatcher_history_backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher import metrics
from dispatcher.connections import REDIS_ERRORS
from dispatcher.history import database
from dispatcher.history.entries import (
    ENTRY_ERRORS,
    Aside,
    Entry,
    StreamId,
    read_entries,
    report,
    set_aside,
    sid_of,
    sid_text,
)
from dispatcher.history.ids import SeedIds
from dispatcher.history.loader import Loader, PairIds, Row, parse_row
from dispatcher.history.schema import require_needed
from dispatcher.history.ship_node import TrimOn, node_text
from dispatcher.history.ship_read import Limit, entry_bytes, read_count, read_more
from dispatcher.history.ship_session import IDLE_S, Session
from dispatcher.history.ship_window import judge, report_past
from dispatcher.shard import ID_SPAN, Shard
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    import asyncpg
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
        idle_s: float = IDLE_S,
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
        self.session = Session(idle_s)  # closed by the server past `idle_s` idle
        self.loader: Loader | None = None
        self.pairs = PairIds()  # the ids met last, kept across reconnects
        self.watermark: StreamId = (0, 0)
        self.node: str | None = None  # the Redis the watermark was learned on (its run id)
        self.leading = False
        self.shipped = self.skipped = 0
        self.last_read = 0  # entries the last batch read
        self.more = False  # whether the stream may hold more after them
        self.limit = Limit(settings.history_ship_batch)  # entries of the next batch
        self.each = 0  # bytes an entry, as last read (0: not known yet)

    # ---- one connection ----------------------------------------------------------------

    async def open(self) -> bool:
        """Connect (once), and (electing) take the lock; True when this shipper may ship.
        Keeps Redis' id counter above every stored id, and reads the stream from its start
        (its watermark was learned on a node it does not know: `ship_node.py`). A schema
        older than this version's statements need raises `SchemaBehind` (logged with the
        hint to upgrade); one whose latest migration, an index only, still builds does not
        (`schema.NEEDS`)."""
        if self.conn is None:
            self.conn = await database.connect(self.settings)
            await self.session.bound(self.conn)
            await require_needed(self.conn)
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
        floor = self.shard.id_floor
        top = await self.conn.fetchval(
            "SELECT max(id) FROM history_attempts WHERE id >= $1 AND id < $2",
            floor,
            floor + ID_SPAN,
        )
        if top is not None:
            await SeedIds(self.shard.keys.HISTORY_SEQ, int(top)).run(self.redis)
        self.node = None
        await self._follow()
        self.leading = True
        return True

    async def close(self) -> None:
        """Drop the connection (and with it the lock) without waiting on a hung server."""
        self.leading = False
        if self.conn is not None:
            conn, self.conn, self.loader = self.conn, None, None
            conn.terminate()

    async def _follow(self) -> None:
        """Trim the stream up to the watermark, on the node it was learned on only; on
        another (or none known), read the stream again from its start (`ship_node.py`)."""
        ms, seq = self.watermark
        minid = f"{ms}-{seq + 1}" if ms or seq else ""
        trim = TrimOn(self.stream, self.node or "", minid)
        node = node_text(await trim.run(self.redis))
        if node == self.node:
            return
        if self.node is not None:
            log.warning(
                "history.ship_node_changed",
                stream=self.name,
                was=self.node,
                now=node,
                watermark=sid_text(self.watermark),
            )
        assert self.conn is not None
        await self.conn.execute(
            "UPDATE history_shipped SET last_id = '0-0' WHERE stream = $1", self.name
        )
        self.node, self.watermark = node, (0, 0)

    # ---- batches -----------------------------------------------------------------------

    async def ship_once(self, *, block_ms: int | None = None, now_ms: int | None = None) -> int:
        """Ship one batch (waiting up to `block_ms` for one); returns the records stored.
        Judged by Redis's clock (`ship_window.py`): an entry whose time is far from the one
        Redis added it at is set aside, one past the retention dropped and counted (`now_ms`:
        tests, as though Redis had added every entry then)."""
        assert self.conn is not None and self.loader is not None, "open() first"
        self.last_read = 0
        reply = await self._read(block_ms)
        first = reply[0][1] if reply else []
        entries, self.more = await read_more(self.redis, self.stream, first, self.limit.now)
        self.last_read = len(entries)  # (what a failure halves)
        self.each = entry_bytes(entries) or self.each
        if not entries:
            await self._follow()  # a node changed with nothing after the watermark on it
            return 0
        last = sid_of(entries[-1][0])
        readable, aside = read_entries(entries)
        judged = judge(readable, self.settings.retention_ms, last[0], at=now_ms)
        stored = await self._commit(judged.batch, last, aside + judged.aside)
        report_past(self.name, judged.past)
        self.skipped += len(judged.past)
        await self._follow()
        self.shipped += stored
        metrics.HISTORY_SHIPPED.inc(stored)
        return stored

    async def _read(self, block_ms: int | None) -> Any:
        """XREAD after the watermark; a blocking one gives way to `stop` (a cancelled read
        costs only its connection)."""
        read = self.redis.xread(
            {self.stream: sid_text(self.watermark)},
            count=read_count(self.each, self.limit.now),
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

    async def _commit(
        self, batch: list[Entry], last: StreamId, aside: list[Aside] | None = None
    ) -> int:
        """Store the entries after the committed watermark, set `aside` aside, and move
        the watermark to `last` (or keep it, when another shipper got further); returns how
        many records were new. A batch failing for an entry's own sake (`ENTRY_ERRORS`) is
        stored again entry by entry."""
        assert self.loader is not None
        aside = aside or []
        rows = [(entry, entry.row) for entry in batch if entry.row is not None]
        try:
            if len(rows) == len(batch):  # the columns came with the entries: no JSON read
                await self.loader.prepare(row for _, row in rows)
                return await self._transaction(batch, last, parsed=rows, aside=aside)
            await self.loader.prepare_raw(entry.created_ms for entry in batch)
            return await self._transaction(batch, last, parsed=None, aside=aside)
        except ENTRY_ERRORS as exc:
            log.warning("history.ship_entry_by_entry", error=repr(exc), records=len(batch))
            self.loader.refused(exc)  # a day dropped meanwhile: made again
        return await self._one_by_one(batch, last, aside)

    async def _one_by_one(self, batch: list[Entry], last: StreamId, aside: list[Aside]) -> int:
        """The batch again, each entry alone: its row (read from the JSON when the entry
        did not carry it) and its pair outside the transaction, then its insert under a
        savepoint; an entry that is no record, or that fails alone, is set aside."""
        assert self.loader is not None
        aside, ready = list(aside), []
        for entry in batch:
            try:
                row = entry.row or parse_row(entry.doc, entry.dead)
            except Exception as exc:  # reading asks nothing of the database
                aside.append(Aside.of(entry, exc))
                continue
            try:
                await self.loader.prepare([row])
            except ENTRY_ERRORS as exc:
                aside.append(Aside.of(entry, exc, row))
                continue
            ready.append((entry, row))
        return await self._transaction(batch, last, parsed=ready, aside=aside, alone=True)

    async def _transaction(
        self,
        batch: list[Entry],
        last: StreamId,
        *,
        parsed: list[tuple[Entry, Row]] | None,
        aside: list[Aside],
        alone: bool = False,
    ) -> int:
        """One transaction: the watermark row locked, the entries after it stored (as JSON,
        or as `parsed` rows; `alone`: each under a savepoint, those refused set aside), the
        entries set aside kept, the watermark moved; then what was set aside reported."""
        assert self.conn is not None and self.loader is not None
        async with self.conn.transaction():
            done = sid_of(
                await self.conn.fetchval(
                    "SELECT last_id FROM history_shipped WHERE stream = $1 FOR UPDATE", self.name
                )
            )
            if parsed is None:
                records = [(e.dead, e.doc.decode()) for e in batch if e.sid > done]
                stored = await self.loader.insert_raw(records)
            elif alone:
                stored = await self._each([(e, row) for e, row in parsed if e.sid > done], aside)
            else:
                stored = await self.loader.insert([row for e, row in parsed if e.sid > done])
            kept = await set_aside(self.conn, self.name, [a for a in aside if a.sid > done])
            if last > done:
                await self.conn.execute(
                    "UPDATE history_shipped SET last_id = $2, shipped = shipped + $3"
                    " WHERE stream = $1",
                    self.name,
                    sid_text(last),
                    stored,
                )
        self.watermark = max(last, done)
        report(self.name, kept)
        return stored

    async def _each(self, rows: list[tuple[Entry, Row]], aside: list[Aside]) -> int:
        """Inside the transaction: each row under a savepoint of its own; one refused is
        undone alone and added to `aside`. Returns how many were new."""
        assert self.conn is not None and self.loader is not None
        stored = 0
        for entry, row in rows:
            try:
                async with self.conn.transaction():
                    stored += await self.loader.insert_one(row)
            except ENTRY_ERRORS as exc:
                aside.append(Aside.of(entry, exc, row))
        return stored

    async def drain(self, *, now_ms: int | None = None) -> int:
        """Ship until nothing is left after the watermark; returns the records stored."""
        total = 0
        while True:
            before = (self.watermark, self.node)
            total += await self.ship_once(now_ms=now_ms)
            if (self.watermark, self.node) == before:
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
                        await _wait(stop, min(STANDBY_S, self.session.every))
                        continue
                    assert self.conn is not None
                    self.last_read = 0  # (a failed keep halves no batch that shipped)
                    await self.session.keep(self.conn)  # a session idle is closed
                    await self.ship_once(block_ms=self._block_ms())
                    backoff = 0.5
                    if self.last_read:
                        self.limit.succeeded()
                    if self.last_read and not self.more:
                        await _wait(stop, GATHER_S)
                except Exception as exc:  # an outage, or anything else: never a silent stop
                    self._failed(exc, backoff)
                    self.limit.failed(self.last_read)  # a batch too slow for the timeout: smaller
                    self.last_read = 0
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
