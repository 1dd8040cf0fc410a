"""Attempts over time, for the status page: by outcome and by duration, per minute (the last
hour) and per 10 minutes (the last day).

Each worker counts its attempts in memory (`AttemptStats.count`, no Redis on the hot path)
and adds them to Redis with its heartbeat every few seconds (`flush`): per outcome, and per
duration bucket, so that the percentiles of the fleet's attempts can be read back from the
sums of every worker's buckets (`percentile`, interpolated inside a bucket as Prometheus'
`histogram_quantile` does; the bucket bounds below are about 1.5x apart).
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = [
    "BOUNDS_MS",
    "DAY",
    "HOUR",
    "AttemptStats",
    "Point",
    "Series",
    "Span",
    "duration",
    "percentile",
    "read_series",
]

# Upper bounds of the duration buckets, in ms; one more bucket holds everything longer.
BOUNDS_MS: tuple[int, ...] = (
    1,
    2,
    3,
    5,
    7,
    *(int(m * 10**e) for e in range(1, 4) for m in (1, 1.5, 2, 3, 5, 7)),
    *(10_000, 15_000, 20_000, 30_000, 60_000),
)
DURATION_FIELD = "ms:"  # a bucket's field: "ms:<bound>", or "ms:inf"
_FIELDS = [f"{DURATION_FIELD}{bound}" for bound in BOUNDS_MS] + [f"{DURATION_FIELD}inf"]


@dataclass(frozen=True, slots=True)
class Span:
    """A resolution of the statistics: buckets of `step_s` seconds, kept `ttl_s`, shown
    `points` at a time."""

    name: str
    step_s: int
    points: int
    ttl_s: int

    def key(self, keys: Keys, slot: int) -> str:
        return keys.stats(slot) if self.step_s == 60 else keys.stats_slot(self.step_s, slot)


HOUR = Span("hour", 60, 60, 2 * 3600)  # dispatcher:stats:{minute}, as before
DAY = Span("day", 600, 144, 25 * 3600)  # dispatcher:stats:600:{10-minute slot}
SPANS = (HOUR, DAY)


def bucket_field(duration_ms: int) -> str:
    """The duration bucket an attempt of `duration_ms` is counted in."""
    return _FIELDS[bisect.bisect_left(BOUNDS_MS, duration_ms)]


class AttemptStats:
    """Attempts by (minute, outcome) and (minute, duration bucket), counted in memory and
    added to Redis every few seconds, so the hot path never waits for them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[int, str]] = collections.Counter()

    def count(self, outcome: str, duration_ms: int = 0) -> None:
        minute = time.time_ns() // 60_000_000_000
        self.counts[(minute, outcome)] += 1
        self.counts[(minute, bucket_field(duration_ms))] += 1

    async def flush(self, redis: Redis, keys: Keys) -> None:
        """Add what was counted since the last flush to every span's hashes, in one round
        trip; kept for the next flush when Redis fails."""
        counts, self.counts = self.counts, collections.Counter()
        if not counts:
            return
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for span in SPANS:
                    touched = set()
                    for (minute, name), n in counts.items():
                        key = span.key(keys, minute * 60 // span.step_s)
                        pipe.hincrby(key, name, n)
                        touched.add(key)
                    for key in touched:
                        pipe.expire(key, span.ttl_s)
                await pipe.execute()
        except BaseException:
            self.counts.update(counts)
            raise


@dataclass(frozen=True, slots=True)
class Point:
    """One bucket of time: attempts by outcome, and the duration percentiles (ms; None
    when there was no attempt)."""

    start_ms: int
    outcomes: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


@dataclass(frozen=True, slots=True)
class Series:
    """A span's points, oldest first, and the percentiles over all of them."""

    span: Span
    points: list[Point]
    p50_ms: float | None = None
    p99_ms: float | None = None
    totals: dict[str, int] = field(default_factory=dict)


def percentile(buckets: Mapping[str, int], q: float) -> float | None:
    """The `q` quantile (0..1) of the durations counted in `buckets` (field -> count), in
    ms: linear inside the bucket it falls in; the last bound when it falls past it."""
    counts = [buckets.get(name, 0) for name in _FIELDS]
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BOUNDS_MS):
                return float(BOUNDS_MS[-1])
            low = 0 if i == 0 else BOUNDS_MS[i - 1]
            return low + (BOUNDS_MS[i] - low) * (rank - seen) / n
        seen += n
    return float(BOUNDS_MS[-1])  # unreachable: the loop ends on the last bucket with counts


def duration(ms: float | None) -> str:
    """A duration for people: `830 ms`, `4.2 s`, `-` for none."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"
    return f"{ms / 1000:.1f} s"


def _point(start_ms: int, counts: Mapping[str, int]) -> Point:
    outcomes = {k: v for k, v in counts.items() if not k.startswith(DURATION_FIELD)}
    return Point(start_ms, outcomes, percentile(counts, 0.5), percentile(counts, 0.99))


def _decode(raw: Mapping[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def series(span: Span, last_slot: int, hashes: Sequence[Mapping[bytes, bytes]]) -> Series:
    """A span's series from its hashes, oldest first, the last one `last_slot`'s."""
    first = last_slot - len(hashes) + 1
    decoded = [_decode(raw) for raw in hashes]
    summed: collections.Counter[str] = collections.Counter()
    for counts in decoded:
        summed.update(counts)
    totals = {k: v for k, v in summed.items() if not k.startswith(DURATION_FIELD)}
    return Series(
        span=span,
        points=[_point((first + i) * span.step_s * 1000, c) for i, c in enumerate(decoded)],
        p50_ms=percentile(summed, 0.5),
        p99_ms=percentile(summed, 0.99),
        totals=totals,
    )


async def read_series(
    redis: Redis, keys: Keys, now_ms: int, spans: Sequence[Span] = SPANS
) -> list[Series]:
    """Each span's last `points` buckets up to `now_ms`, in one round trip."""
    lasts = [now_ms // 1000 // span.step_s for span in spans]
    async with redis.pipeline(transaction=False) as pipe:
        for span, last in zip(spans, lasts, strict=True):
            for slot in range(last - span.points + 1, last + 1):
                pipe.hgetall(span.key(keys, slot))
        replies = await pipe.execute()
    found, at = [], 0
    for span, last in zip(spans, lasts, strict=True):
        found.append(series(span, last, replies[at : at + span.points]))
        at += span.points
    return found
