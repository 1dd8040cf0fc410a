"""What both history backends share and that touches no store: the query's time window, the
time format people read, body truncation (by UTF-8 size, and by the size a body takes
in a stored record's JSON), the cursor of a newest-first listing, and stored records read
back one by one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

import orjson
import structlog
from pydantic import ValidationError

from dispatcher.errors import InvalidInput, InvalidTime
from dispatcher.models import HistoryRecord

if TYPE_CHECKING:
    from collections.abc import Iterable
    from zoneinfo import ZoneInfo

__all__ = [
    "DEAD_LETTERS_SCANNED",
    "MAX_ATTEMPTS_SHOWN",
    "TIME_FORMAT",
    "Cursor",
    "Recent",
    "check_page",
    "format_ms",
    "json_size",
    "parse_record",
    "parse_records",
    "parse_window",
    "truncate",
    "truncate_json",
    "unknown_record",
]

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
# a delivery makes at most len(retry_schedule) + 1 attempts, plus one per redelivery
MAX_ATTEMPTS_SHOWN = 100
# The dead-letter view looks at this many of the newest attempts after which a delivery
# gave up, at most, for its one entry a delivery (both stores; `redis_dead`, `postgres`)
DEAD_LETTERS_SCANNED = 1_000

log = structlog.get_logger("dispatcher.history")


def _to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def format_ms(ms: int, tz: ZoneInfo) -> str:
    """Epoch ms as `yyyy-MM-dd HH:mm:ss.SSS` in `tz` (the query's format, plus milliseconds)."""
    return datetime.fromtimestamp(ms / 1000, tz).strftime(TIME_FORMAT + ".%f")[:-3]


def _parse_time(value: str, name: str, tz: ZoneInfo) -> datetime:
    if not _TIME_PATTERN.match(value):
        raise InvalidTime(
            f"{name} must look like 'yyyy-MM-dd HH:mm:ss' (e.g. 2024-05-01 08:30:00), "
            f"got {value!r}",
            param=name,
        )
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=tz)
    except ValueError as exc:
        raise InvalidTime(f"{name} {value!r} is not a real date/time: {exc}", param=name) from None


def parse_window(
    start: str | None, end: str | None, tz: ZoneInfo, *, now: datetime | None = None
) -> tuple[int, int]:
    """The query window in epoch ms, both ends inclusive (`endTime` to its last millisecond).

    Missing both: today in `tz`. Only `startTime`: from it to the end of today. Only
    `endTime`: from the start of its day to it.
    """
    today = (
        (now or datetime.now(tz)).astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    )
    start_at = _parse_time(start, "startTime", tz) if start else None
    end_at = _parse_time(end, "endTime", tz) if end else None
    if start_at is None:
        start_at = (end_at or today).replace(hour=0, minute=0, second=0)
    end_ms = _to_ms(end_at) + 999 if end_at else _to_ms(today + timedelta(days=1)) - 1
    start_ms = _to_ms(start_at)
    if end_ms < start_ms and end is None:  # the window's end: today's
        raise InvalidTime(
            f"startTime ({start}) is after the end of today: give an endTime", param="startTime"
        )
    if end_ms < start_ms:
        raise InvalidTime(f"endTime ({end}) is before startTime ({start})", param="endTime")
    return start_ms, end_ms


def check_page(page: int, page_size: int, max_page_size: int) -> int:
    """The page size to use, once `page` and `page_size` are known to be valid."""
    if page < 1:
        raise InvalidInput(f"page must be >= 1, got {page}", param="page")
    if page_size < 1:
        raise InvalidInput(f"pageSize must be >= 1, got {page_size}", param="pageSize")
    return min(page_size, max_page_size)


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` UTF-8 bytes (never inside a character), and whether it was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    return raw[:limit].decode("utf-8", errors="ignore"), True


def json_size(text: str) -> int:
    """The bytes `text` takes in a JSON string as the stores write it (orjson: UTF-8, with
    `"`, `\\` and control characters escaped), its quotes aside."""
    return len(orjson.dumps(text)) - 2


def truncate_json(text: str, limit: int) -> tuple[str, bool]:
    """`text` (decoded, so no lone surrogate), or its longest start that takes at most
    `limit` bytes in a stored record (`json_size`), and whether it was cut. A character
    takes 1 to 6 bytes there (U+0001 is `\\u0001`, U+FFFD 3 bytes of UTF-8), so text read
    as `limit` bytes can take 6 times as many. Text that cannot outgrow `limit` is not
    encoded; other text is encoded once (printable ASCII without `"` or `\\`: a copy)."""
    if len(text) * 6 <= limit:  # fits, whatever its characters are
        return text, False
    encoded = orjson.dumps(text)  # b'"' + the text's bytes + b'"'
    if len(encoded) - 2 <= limit:
        return text, False
    # Cut at `limit` bytes, or up to 5 before: a cut inside an escape (`\u0001`: 6 bytes)
    # or inside a character's UTF-8 bytes is no JSON string; the first cut that is one is
    # the longest start that fits.
    for end in range(limit + 1, max(limit - 5, 0), -1):
        try:
            return orjson.loads(encoded[:end] + b'"'), True
        except orjson.JSONDecodeError:
            continue
    raise AssertionError("unreachable: one of 6 cuts in a row is between characters")


_CURSOR = re.compile(r"^(\d{1,15})-(\d{1,18})$")


class Cursor(NamedTuple):
    """Where a newest-first listing stopped: its last record's time and id. The next page
    holds what is older: an earlier time, or the same time and a smaller id."""

    created_ms: int
    id: int

    def __str__(self) -> str:
        return f"{self.created_ms}-{self.id}"

    @classmethod
    def parse(cls, text: str, name: str = "before") -> Cursor:
        """A cursor as `str` writes it; 400 naming `name` otherwise."""
        found = _CURSOR.match(text)
        if found is None:
            raise InvalidInput(f"{name} must be '<createdTime>-<id>', got {text!r}", param=name)
        return cls(int(found[1]), int(found[2]))

    @classmethod
    def of(cls, record: HistoryRecord) -> Cursor:
        return cls(record.created_time, record.id)


@dataclass(frozen=True, slots=True)
class Recent:
    """A page of the newest records, and where the next (older) page starts: None when
    this page was the last."""

    records: list[HistoryRecord]
    next: Cursor | None

    @classmethod
    def of(cls, newest_first: list[HistoryRecord], limit: int) -> Recent:
        """The first `limit` of the records; a next page when there were more."""
        shown = newest_first[:limit]
        more = len(newest_first) > limit
        return cls(shown, Cursor.of(shown[-1]) if more and shown else None)

    @classmethod
    def merged(cls, pages: list[Recent], limit: int) -> Recent:
        """One page of `limit` of pages read after the same cursor (a record in several
        shown once). A page that has more stops at its `next` (its last entry; its records
        may be fewer, one gone before its entry): the merged page holds nothing older
        than the newest of those, so none of that page's next entries is passed over, and
        goes on from its last record, or from that entry."""
        horizon = max((p.next for p in pages if p.next is not None), default=None)
        seen = {r.id: r for page in pages for r in page.records}
        newest = sorted(seen.values(), key=lambda r: (r.created_time, r.id), reverse=True)
        if horizon is not None:
            newest = [r for r in newest if (r.created_time, r.id) >= horizon]
        shown = newest[:limit]
        return cls(shown, Cursor.of(shown[-1]) if len(newest) > limit else horizon)


def unknown_record(record_id: int, project_id: str | None) -> str:
    """The 404 of a record that is not there, or is another project's: the same words, so
    that no project learns which ids another's records hold."""
    return f"history record {record_id} not found" + (
        f" in project {project_id}" if project_id else ""
    )


def parse_records(raws: Iterable[bytes | None]) -> list[HistoryRecord]:
    """Stored JSON records (missing ones skipped), each validated alone: one the model
    refuses is left out (`parse_record`) and the others shown. Validated as one list, such
    a record made every page holding it a 500 for the whole retention (review); one by one
    costs the same (~5 µs a record of 1.5 KB either way)."""
    found = []
    for raw in raws:
        if raw and (record := parse_record(raw)) is not None:
            found.append(record)
    return found


def parse_record(raw: bytes) -> HistoryRecord | None:
    """A stored JSON record, or None when the model refuses it (written by hand, or by a
    version whose fields differed): logged as `history.record_unreadable` with its id and
    the fields refused, never its body (its values may be a receiver's or a secret)."""
    try:
        return HistoryRecord.model_validate_json(raw)
    except ValidationError as exc:
        fields = sorted({".".join(str(part) for part in error["loc"]) for error in exc.errors()})
        log.warning("history.record_unreadable", record_id=_id_of(raw), fields=fields[:10])
        return None


def _id_of(raw: bytes) -> str | None:
    """A refused record's id as it was stored, when it can be read (80 characters at most)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    found = doc.get("id") if isinstance(doc, dict) else None
    return None if found is None else str(found)[:80]
