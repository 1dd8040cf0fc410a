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
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from dispatcher.lua import ArgList, Key, KeyList, Script, run_pipeline

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

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

log = structlog.get_logger("dispatcher.stats")

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


FLUSH_MARK_S = 600  # how long Redis remembers a flush it added (`AddCounts`)
# A flush unconfirmed this long after it was first sent is given up: its mark may be gone,
# and sent again it could count twice (the margin: a pipeline's own time in flight).
RESEND_WITHIN_S = FLUSH_MARK_S - 60


@dataclass
class AddCounts(Script):
    """One flush's counts added to the spans' hashes (each kept its span's time), once:
    `mark` names the flush, and a flush whose mark is there already adds nothing. So a
    flush sent again (redis-py sends a pipeline again when its answer timed out, and a
    paused Redis runs both once it resumes), or kept after an error although it ran, is
    not counted twice. `counts`: for each hash, its time to live, how many fields, and
    each field and count."""

    LUA = """
    if not redis.call('SET', mark, 1, 'NX', 'EX', mark_ttl) then return 0 end
    local at = 1
    for _, key in ipairs(hashes) do
      local ttl, fields = counts[at], tonumber(counts[at + 1])
      at = at + 2
      for _ = 1, fields do
        redis.call('HINCRBY', key, counts[at], counts[at + 1])
        at = at + 2
      end
      redis.call('EXPIRE', key, ttl)
    end
    return 1
    """
    mark: Key
    hashes: KeyList
    mark_ttl: int
    counts: ArgList


def add_counts(keys: Keys, token: str, counts: Mapping[tuple[int, str], int]) -> AddCounts:
    """The script that adds `counts` ((minute, field) -> n) under the flush `token`."""
    fields: dict[str, list[tuple[str, int]]] = {}
    ttls: dict[str, int] = {}
    for span in SPANS:
        for (minute, name), n in counts.items():
            key = span.key(keys, minute * 60 // span.step_s)
            fields.setdefault(key, []).append((name, n))
            ttls[key] = span.ttl_s
    flat: list[str | int] = []
    for key, pairs in fields.items():
        flat += [ttls[key], len(pairs)]
        for name, n in pairs:
            flat += [name, n]
    return AddCounts(keys.stats_flush(token), list(fields), FLUSH_MARK_S, flat)


class AttemptStats:
    """Attempts by (minute, outcome) and (minute, duration bucket), counted in memory and
    added to Redis every few seconds, so the hot path never waits for them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: collections.Counter[tuple[int, str]] = collections.Counter()
        # flushes not known to be added, each with its token and when it was first sent:
        # sent again as they were, within `RESEND_WITHIN_S`
        self.unsent: list[tuple[str, collections.Counter[tuple[int, str]], float]] = []
        self.clock = clock

    def count(self, outcome: str, duration_ms: int | None) -> None:
        """One attempt, and its exchange's time unless it sent nothing (None)."""
        minute = time.time_ns() // 60_000_000_000
        self.counts[(minute, outcome)] += 1
        if duration_ms is not None:
            self.counts[(minute, bucket_field(duration_ms))] += 1

    async def flush(self, redis: Redis, keys: Keys) -> None:
        """Add what was counted since the last flush to every span's hashes, in one round
        trip, once (`AddCounts`); kept with its token for the next flush when Redis fails,
        which sends it again beside its own."""
        now = self.clock()
        if self.counts:
            self.unsent.append((uuid.uuid4().hex, self.counts, now))
            self.counts = collections.Counter()
        self._give_up_stale(now)
        if not self.unsent:
            return
        scripts = [add_counts(keys, token, counts) for token, counts, _ in self.unsent]

        def queue(pipe: Pipeline) -> None:
            for script in scripts:
                script.queue_on(pipe)

        await run_pipeline(redis, queue)
        del self.unsent[: len(scripts)]

    def _give_up_stale(self, now: float) -> None:
        """Drop the flushes unconfirmed for `RESEND_WITHIN_S` (Redis away that long): the
        status page may miss their attempts (unless they ran) but never counts them twice."""
        stale = [counts for _, counts, sent in self.unsent if now - sent >= RESEND_WITHIN_S]
        if not stale:
            return
        self.unsent = [item for item in self.unsent if now - item[2] < RESEND_WITHIN_S]
        attempts = sum(
            n for c in stale for (_, name), n in c.items() if not name.startswith(DURATION_FIELD)
        )
        log.warning("stats.flush_given_up", flushes=len(stale), attempts=attempts,
                    reason="unconfirmed for longer than Redis remembers a flush")  # fmt: skip


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
