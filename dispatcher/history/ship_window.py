"""Which of a batch's entries the shipper stores, sets aside, or drops as past the
retention: judged by Redis's clock, never by the shipper's.

An entry's stream id holds the millisecond Redis added it at, whatever the clocks of the
worker that wrote it and of the shipper that reads it. The window used to be the shipper's
own clock, [now - retention, now + 1 day], and an entry outside it was dropped for good with
a warning alone: a worker whose clock ran a day ahead, or a leading shipper whose clock ran a
day behind, lost records fleet-wide (review). Now:

- an entry whose `createdTime` is more than `MAX_SKEW_MS` from the time Redis added it (the
  writing worker's clock was wrong, or the record waited that long before its append) is
  set aside (`history_set_aside`, with why; logged, counted and alerted on), unless Redis
  added it past the retention already;
- an entry whose time (its `createdTime`, or for one set aside above the time Redis added
  it) is past the retention by Redis's clock (the newest stream id read: the entry waited
  in the stream longer than the retention) is dropped, logged
  (`history.ship_past_retention`) and counted (`dispatcher_history_past_retention_total`);
- every other one is stored.

An entry appended again by `dispatcher history set-aside retry` carries the stream id it
had (`o`): an operator asked for it, so it is judged by its `createdTime` alone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

import structlog

from dispatcher import metrics
from dispatcher.history.entries import Aside, Entry, sid_text
from dispatcher.history.schema import DAY_MS

__all__ = ["MAX_SKEW_MS", "ClockSkew", "Judged", "judge", "report_past"]

log = structlog.get_logger("dispatcher.history")

MAX_SKEW_MS = DAY_MS  # a record's time this far from its entry's: a clock gone wrong
_NAMED = 20  # record ids a log line of entries past the retention names


class ClockSkew(ValueError):
    """A record's `createdTime` far from the time Redis added its entry."""


class Judged(NamedTuple):
    """A batch's entries: to store, to set aside, past the retention."""

    batch: list[Entry]
    aside: list[Aside]
    past: list[Entry]


def _when(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{ms} ms"


def _skew(entry: Entry, added: int) -> ClockSkew:
    off = entry.created_ms - added
    hours = abs(off) / 3_600_000
    return ClockSkew(
        f"createdTime {_when(entry.created_ms)} is {hours:.1f} h"
        f" {'ahead of' if off > 0 else 'behind'} the time Redis added its entry"
        f" ({_when(added)}): the writing worker's clock? Kept here, never stored"
    )


def judge(entries: list[Entry], retention_ms: int, redis_ms: int, *, at: int | None) -> Judged:
    """`entries` judged by Redis's clock: `redis_ms` its time now (the newest stream id
    read), each entry added at its stream id's millisecond (`at`: tests, as though Redis
    had added every entry then, and `redis_ms` were `at`)."""
    now = redis_ms if at is None else at
    cutoff = now - retention_ms
    judged = Judged([], [], [])
    for entry in entries:
        added = entry.sid[0] if at is None else at
        retried = b"o" in entry.fields
        if retried or abs(entry.created_ms - added) <= MAX_SKEW_MS:
            (judged.past if entry.created_ms < cutoff else judged.batch).append(entry)
        elif added < cutoff:
            judged.past.append(entry)
        else:
            judged.aside.append(Aside.of(entry, _skew(entry, added)))
    return judged


def report_past(stream: str, past: list[Entry]) -> None:
    """Once committed: a log line and the metric for the entries dropped past the
    retention."""
    if not past:
        return
    ids = [entry.fields.get(b"i", b"?").decode(errors="replace") for entry in past[:_NAMED]]
    log.warning(
        "history.ship_past_retention",
        records=len(past),
        stream=stream,
        first_stream_id=sid_text(past[0].sid),
        last_stream_id=sid_text(past[-1].sid),
        oldest=_when(min(entry.created_ms for entry in past)),
        record_ids=ids,
        reason="past the retention by Redis's clock: not stored",
    )
    metrics.HISTORY_PAST_RETENTION.inc(len(past))
