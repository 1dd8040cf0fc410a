"""The shipper's stream entries: read as rows, or set aside with why.

An entry PostgreSQL refuses for its own sake (its data, an integrity rule, a limit such as
an index entry's size, a value the driver cannot send), or that is no record at all, would
fail its batch at every try and hold every project's records back. The shipper sets each
such entry aside: a row of `history_set_aside` (schema version 6: the record's JSON and
why; version 7: the entry's fields too, as the worker wrote them), written in the batch's
own transaction with the watermark, then a log line (`history.ship_set_aside`, naming the
project and the record id) and `dispatcher_history_set_aside_total`. The rows are kept
for the retention, like records (`schema.drop_expired`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import orjson
import structlog

from dispatcher import metrics
from dispatcher.history.loader import Row, parse_row

if TYPE_CHECKING:
    from dispatcher.history.database import Conn

__all__ = [
    "ENTRY_ERRORS",
    "Aside",
    "Entry",
    "StreamId",
    "read_entries",
    "report",
    "set_aside",
    "sid_of",
    "sid_text",
]

log = structlog.get_logger("dispatcher.history")

StreamId = tuple[int, int]

# What one entry can cause alone, whatever the database's state: PostgreSQL's data
# exceptions (class 22), integrity violations (23) and program limits (54), and a value the
# driver refuses to send (an int past a bigint: OverflowError; text it cannot encode).
ENTRY_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    OverflowError,
    ValueError,
)
_INSERT = """
INSERT INTO history_set_aside (stream, stream_id, record_id, project_id, error, entry, fields)
SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
                         $7::bytea[])
ON CONFLICT DO NOTHING RETURNING stream_id
"""
_SHOWN = 200  # characters kept of an id or a project read from a refused entry


def sid_of(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def sid_text(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


class Entry(NamedTuple):
    """A stream entry: its id, the record's time, whether its delivery gave up, its JSON,
    its fields as the worker wrote them, and the record as a row when the entry carries
    its columns (entries of older workers carry the JSON only)."""

    sid: StreamId
    created_ms: int
    dead: bool
    doc: bytes
    fields: dict[bytes, bytes]
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


class Aside(NamedTuple):
    """An entry set aside: its stream id, why, the record's JSON (or the entry's fields
    when it has none), the entry's fields as a JSON object (what is
    appended to the stream again to ship it), and whose it is when known."""

    sid: StreamId
    error: str
    entry: bytes
    fields: bytes
    record_id: str | None
    project_id: str | None

    @classmethod
    def of(cls, entry: Entry, exc: BaseException, row: Row | None = None) -> Aside:
        """`entry` set aside for `exc`; its record id and project from `row`, else from
        the JSON when it can be read."""
        record_id, project_id = _whose(entry.doc) if row is None else (row.id, row.pair[0])
        return cls(entry.sid, _text(repr(exc)), entry.doc, orjson.dumps(_decoded(entry.fields)),
                   _shown(record_id), _shown(project_id))  # fmt: skip

    @classmethod
    def of_fields(cls, sid: StreamId, fields: dict[bytes, bytes], exc: BaseException) -> Aside:
        """An entry that is no record (no JSON, or no time): its record's JSON when it
        has one, else its fields as a JSON object; its record id and project from its
        columns when it has them, else from the JSON."""
        decoded = _decoded(fields)
        shown = orjson.dumps(decoded)
        entry = fields.get(b"r", shown)
        record_id, project_id = _whose(entry)
        if "i" in decoded:
            record_id, project_id = decoded["i"], decoded.get("p")
        return cls(sid, _text(repr(exc)), entry, shown, _shown(record_id), _shown(project_id))


def _decoded(fields: dict[bytes, bytes]) -> dict[str, str]:
    """An entry's fields as text, in their order (a byte that is not UTF-8, which no worker
    writes, as U+FFFD)."""
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}


def read_entries(raw: list[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[Entry], list[Aside]]:
    """XREAD's entries as `Entry`s, and those to set aside as no record. Reading an entry
    asks nothing of the database: whatever it raises is that entry's own (an exception
    let through failed the batch at every try, and held every project's records back)."""
    entries, aside = [], []
    for raw_sid, fields in raw:
        try:
            doc, dead = fields[b"r"], fields.get(b"d") == b"1"
            at = int(fields[b"t"]) if b"t" in fields else parse_row(doc).created_ms
            row = _row(fields, at, dead, doc) if b"i" in fields else None
        except Exception as exc:  # the entry's own, whatever it is
            aside.append(Aside.of_fields(sid_of(raw_sid), fields, exc))
            continue
        entries.append(Entry(sid_of(raw_sid), at, dead, doc, fields, row))
    return entries, aside


def _whose(entry: bytes) -> tuple[object, object]:
    try:
        doc = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return None, None
    return (doc.get("id"), doc.get("projectId")) if isinstance(doc, dict) else (None, None)


def _shown(value: object) -> str | None:
    return None if value is None else _text(str(value))[:_SHOWN]


def _text(value: str) -> str:
    """Text PostgreSQL takes whatever it holds: no NUL, no lone surrogate."""
    return value.replace("\x00", "\ufffd").encode(errors="replace").decode()


async def set_aside(conn: Conn, stream: str, entries: list[Aside]) -> list[Aside]:
    """Inside the caller's transaction: keep the entries; returns those not kept before
    (another shipper, or an earlier try whose commit was lost, may have), in stream order."""
    if not entries:
        return []
    ids = [sid_text(a.sid) for a in entries]
    columns = [[a.record_id for a in entries], [a.project_id for a in entries]]
    kept = [[a.error for a in entries], [a.entry for a in entries], [a.fields for a in entries]]
    new = {r[0] for r in await conn.fetch(_INSERT, stream, ids, *columns, *kept)}
    return sorted(a for a in entries if sid_text(a.sid) in new)


def report(stream: str, entries: list[Aside]) -> None:
    """Once committed: a log line and the metric for each entry set aside."""
    for a in entries:
        log.error(
            "history.ship_set_aside",
            project_id=a.project_id,
            record_id=a.record_id,
            stream=stream,
            stream_id=sid_text(a.sid),
            error=a.error,
            hint="kept in history_set_aside",
        )
    metrics.HISTORY_SET_ASIDE.inc(len(entries))
