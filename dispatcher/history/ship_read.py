"""The shipper's reads: a batch bounded by entries and by bytes, read in small XREADs.

XREAD has a count and no byte limit, and Redis builds its whole answer at once. A project
whose records are at the size limit (a 64 KiB body of backslashes, doubled by JSON's
escapes, and a 20 KB response: ~151 KB an entry) made a batch of
`DISPATCHER_HISTORY_SHIP_BATCH` (2,000) entries 300 MB: its XREAD held Redis 1.3 s for
everyone (another client's worst PING went from 4.9 ms to 216 ms), its COPY took 1.8 s, and
past `DISPATCHER_HISTORY_TIMEOUT` the batch failed and was tried again, whole, for ever:
every project's history stopped, and at the backlog limit every worker stopped claiming.

Now a batch is read in XREADs of at most `READ_MAX` entries, fewer once the entries read
are large (aiming at `READ_BYTES` a read, at the size of the last entries read, this
batch's or the last one's), and stops growing past `BATCH_BYTES`. After a
batch that failed, the next holds half its entries, down to 1, doubling back after each
that succeeded (`Limit`): a batch too slow for the timeout whatever
its cause is tried smaller until it ships. One entry alone is always read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.history.entries import StreamId, sid_of, sid_text

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BATCH_BYTES",
    "READ_BYTES",
    "READ_MAX",
    "Limit",
    "RawEntry",
    "entry_bytes",
    "read_count",
    "read_more",
    "size_of",
]

READ_MAX = 32  # entries an XREAD asks for at most: ~5 MB even at the size limit
READ_BYTES = 1 << 20  # what an XREAD aims at once its entries' size is known (~5 ms of Redis)
BATCH_BYTES = 4 << 20  # a batch stops growing past this (its COPY: tens of ms)

RawEntry = tuple[bytes, dict[bytes, bytes]]


def size_of(entries: list[RawEntry]) -> int:
    """The bytes of the entries' fields, names and values."""
    return sum(len(k) + len(v) for _, fields in entries for k, v in fields.items())


def entry_bytes(entries: list[RawEntry]) -> int:
    """The mean size of the last entries read (0: none read)."""
    recent = entries[-READ_MAX:]
    return size_of(recent) // len(recent) if recent else 0


def read_count(each: int, wanted: int) -> int:
    """How many entries an XREAD asks for: at most `READ_MAX` and `wanted`, and about
    `READ_BYTES` at `each` bytes an entry (0: not known yet)."""
    return max(1, min(READ_MAX, wanted, READ_BYTES // max(1, each)))


async def read_more(
    redis: Redis, stream: str, entries: list[RawEntry], limit: int
) -> tuple[list[RawEntry], bool]:
    """`entries` (the batch's first read) followed by more, read without blocking until
    the batch holds `limit` entries or `BATCH_BYTES`, or the stream ends; returns the batch
    and whether the stream may hold more after it."""
    batch = list(entries[:limit])
    size = size_of(batch)
    full = len(batch) >= limit or size >= BATCH_BYTES
    while batch and not full:
        count = read_count(entry_bytes(batch), limit - len(batch))
        after: StreamId = sid_of(batch[-1][0])
        reply = await redis.xread({stream: sid_text(after)}, count=count)
        more: list[RawEntry] = reply[0][1] if reply else []
        batch += more
        size += size_of(more)
        full = len(batch) >= limit or size >= BATCH_BYTES
        if len(more) < count:
            break  # the end of the stream
    return batch, full


@dataclass
class Limit:
    """The entries of the next batch: `top` (the setting); after a batch that failed, half
    of what it read, down to 1; doubled back after each that succeeded."""

    top: int
    now: int = 0

    def __post_init__(self) -> None:
        self.now = self.now or self.top

    def failed(self, read: int) -> None:
        """After a batch of `read` entries failed (none: it failed before its read)."""
        if read:
            self.now = max(1, min(self.now, read) // 2)

    def succeeded(self) -> None:
        self.now = min(self.top, self.now * 2)
