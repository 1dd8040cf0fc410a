"""A record's entry on the PostgreSQL store's Redis stream (`dispatcher:history:stream`),
which the shipper copies into PostgreSQL: its fields, and `StreamRecord`, the script that
appends it and ends its job (`dispatcher.ending`) in one call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from dispatcher.ending import END_JOB, END_JOBS, ENDS, NO_ENDING, NO_JOB, SET_MARK
from dispatcher.history.kept import BODY_OF
from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord

__all__ = ["StreamRecord", "stream_fields", "streamed"]

Field = bytes | str | int


def stream_fields(record: AttemptRecord, dead: bool) -> dict[str, Field]:
    """One stream entry: the record's JSON, whether its delivery gave up, and the columns
    it is stored and counted by (its id, time, project, event, URL, delivery id and status),
    so that neither the shipper nor PostgreSQL has to read the JSON."""
    return {
        "r": orjson.dumps(record if BODY_OF not in record else _whole(record)),
        "d": b"1" if dead else b"0",
        "t": record["createdTime"],
        "i": record["id"],
        "p": record["projectId"],
        "e": record["events"],
        "u": record["callBackUrl"],
        "v": record.get("deliveryId") or "",
        "s": record["status"],
    }


def _whole(record: AttemptRecord) -> dict[str, object]:
    """A record as PostgreSQL keeps it: whole, its body its own (`history.kept`)."""
    return {name: value for name, value in record.items() if name != BODY_OF}


@dataclass
class StreamRecord(Script):
    """Appends a record to the `stream` (the fields of `stream_fields`, by their names),
    then what its attempt ends with (`dispatcher.ending`): the job's end (`job_id` not
    empty), else, or when the job's lease is not the run's (another worker's, or lapsed:
    the job's next run then finds the delivery done), the progress `mark` (when not
    empty). Sent twice, the record is appended twice, and
    stored once (the shipper skips an id it already has). Keys it is not given are the
    `stream` key again (as `Record`'s are its own)."""

    LUA = (
        END_JOB
        + SET_MARK
        + """
    redis.call('XADD', stream, '*', 'r', r, 'd', d, 't', t, 'i', i, 'p', p, 'e', e, 'u', u,
               'v', v, 's', s)
    if job_id ~= '' and end_job() == 1 then return 1 end
    if mark ~= '' then set_mark() end
    return 1
    """
    )
    TOGETHER = True  # a worker's batch of records is one call (`Writer`)
    BEFORE, AFTER = ENDS, END_JOBS  # its jobs end once every call ran
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


def streamed(stream: str, record: AttemptRecord, dead: bool, ending: Ending | None) -> StreamRecord:
    """The `StreamRecord` call for `record` (id assigned) and what its attempt ends with."""
    ending = ending or NO_ENDING
    end = ending.job or NO_JOB
    f = stream_fields(record, dead)
    return StreamRecord(
        stream, ending.progress or stream, end.queue or stream, end.lease or stream,
        end.job or stream, end.claims or stream,
        f["r"], f["d"], f["t"], f["i"], f["p"], f["e"], f["u"], f["v"], f["s"],
        ending.mark, ending.ttl, end.token, end.job_id,
    )  # fmt: skip
