"""The entries the shipper set aside (`entries.py`), for the operator: listed, and shipped
again once what refused them is fixed (`dispatcher history set-aside list|retry`).

Shipping one again appends its fields, as the worker wrote them, and the stream id it had
first (`o`: the shipper judges it by its `createdTime` alone, not by the time Redis added it
again: `ship_window.py`) to the stream it came from (under a new stream id) and deletes its
row, in the transaction that read it: a failed
append rolls the delete back, and two runs at once never both take a row (it is locked).
An entry appended twice (a commit whose answer was lost) is stored once, by its record id;
one refused again is set aside again, under its new stream id. A row set aside before
schema version 7 has no fields (its record's JSON alone, in `entry`): it is listed, never
taken.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

import orjson

from dispatcher.history.entries import sid_of

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.history.database import Conn

__all__ = ["SetAside", "listed", "retry"]

_ORDER = "split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint"
_LIST_SQL = f"""
SELECT stream, stream_id, record_id, project_id, error, set_aside_at, fields IS NOT NULL AS whole
  FROM history_set_aside WHERE $1::text IS NULL OR project_id = $1
 ORDER BY set_aside_at, stream, {_ORDER} LIMIT $2
"""
_TAKE_SQL = """
DELETE FROM history_set_aside
 WHERE stream = ANY($1::text[]) AND fields IS NOT NULL
   AND ($2::text[] IS NULL OR stream_id = ANY($2::text[]))
RETURNING stream, stream_id, fields
"""


class SetAside(NamedTuple):
    """A row of `history_set_aside`; `whole`: its fields were kept (since version 7)."""

    stream: str
    stream_id: str
    record_id: str | None
    project_id: str | None
    error: str
    set_aside_at: datetime
    whole: bool


async def listed(conn: Conn, project_id: str | None = None, limit: int = 100) -> list[SetAside]:
    """The entries set aside (of one project), oldest first."""
    return [SetAside(*row) for row in await conn.fetch(_LIST_SQL, project_id, limit)]


async def retry(
    conn: Conn, streams: dict[str, tuple[Redis, str]], stream_ids: list[str] | None
) -> list[str]:
    """Append the entries `stream_ids` (all: None) of the streams named in `streams`
    (stream name -> its Redis and key) to their streams again, in their order, and delete
    their rows; returns their stream ids."""
    async with conn.transaction():
        rows = await conn.fetch(_TAKE_SQL, list(streams), stream_ids)
        rows = sorted(rows, key=lambda r: (r["stream"], sid_of(r["stream_id"])))
        for row in rows:
            redis, key = streams[row["stream"]]
            fields = orjson.loads(row["fields"])
            fields.setdefault("o", row["stream_id"])  # its first stream id: judged as asked
            await redis.xadd(key, fields)
    return [row["stream_id"] for row in rows]
