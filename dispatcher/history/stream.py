"""A record's entry on the PostgreSQL store's Redis stream (`dispatcher:history:stream`),
which the shipper copies into PostgreSQL: its fields, and `StreamRecord`, the script that
appends it and ends its job (`dispatcher.ending`) in one call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from dispatcher.ending import END_JOB, NO_JOB
from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord

__all__ = ["StreamRecord", "stream_fields", "streamed_with_end"]

Field = bytes | str | int


def stream_fields(record: AttemptRecord, dead: bool) -> dict[str, Field]:
    """One stream entry: the record's JSON, whether its delivery gave up, and the columns
    it is stored and counted by (its id, time, project, event, URL, delivery id and status),
    so that neither the shipper nor PostgreSQL has to read the JSON."""
    return {
        "r": orjson.dumps(record),
        "d": b"1" if dead else b"0",
        "t": record["createdTime"],
        "i": record["id"],
        "p": record["projectId"],
        "e": record["events"],
        "u": record["callBackUrl"],
        "v": record.get("deliveryId") or "",
        "s": record["status"],
    }


@dataclass
class StreamRecord(Script):
    """Appends a record to the `stream` (the fields of `stream_fields`, by their names),
    then ends its job; the delivery's progress `mark` is written only when another worker
    holds the job (it then finds the delivery done). Sent twice, the record is appended
    twice, and stored once (the shipper skips an id it already has)."""

    LUA = (
        END_JOB
        + """
    redis.call('XADD', stream, '*', 'r', r, 'd', d, 't', t, 'i', i, 'p', p, 'e', e, 'u', u,
               'v', v, 's', s)
    if end_job() == 0 then redis.call('SET', progress, mark, 'EX', mark_ttl) end
    return 1
    """
    )
    stream: Key
    progress: Key
    queue: Key
    lease: Key
    job: Key
    claims: Key
    r: Field
    d: Field
    t: Field
    i: Field
    p: Field
    e: Field
    u: Field
    v: Field
    s: Field
    mark: str
    mark_ttl: int
    token: str
    job_id: str


def streamed_with_end(
    stream: str, record: AttemptRecord, dead: bool, ending: Ending
) -> StreamRecord:
    """The `StreamRecord` call for `record` (id assigned) and its job's end."""
    end = ending.job or NO_JOB
    f = stream_fields(record, dead)
    return StreamRecord(
        stream, ending.progress, end.queue, end.lease, end.job, end.claims,
        f["r"], f["d"], f["t"], f["i"], f["p"], f["e"], f["u"], f["v"], f["s"],
        ending.mark, ending.ttl, end.token, end.job_id,
    )  # fmt: skip
