"""The status page's charts, laid out here and drawn by the template as SVG (no script):
attempts per bucket of time stacked by outcome, and the attempts' duration p50 and p99 on
a logarithmic scale. Everything is computed from a `Series` (`dispatcher.stats`); the
shapes carry a title each, which a browser shows on hover."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from dispatcher.delivery import Outcome
from dispatcher.stats import duration

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from dispatcher.stats import Point, Series

__all__ = ["Chart", "attempts_chart", "latency_chart"]

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 712, 10, 190
OUTCOMES = [o.value for o in Outcome]  # stacked bottom-up in this order
# a time label every this many points: every 15 minutes of the hour, 3 hours of the day
LABEL_EVERY = {"hour": 15, "day": 18}


@dataclass(frozen=True, slots=True)
class Shape:
    """A rectangle (bars), or a dot (a line's points), with what it shows."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclass(slots=True)
class Chart:
    """One SVG: its accessible name and summary, bars or lines, and both axes' ticks."""

    name: str
    summary: str
    shapes: list[Shape] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)  # (kind, path data)
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    width: int = WIDTH
    height: int = HEIGHT


def _clock(start_ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(start_ms / 1000, UTC).astimezone(tz).strftime("%H:%M")


def _nice_top(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^k at least `value` (at least 1)."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _slot(series: Series) -> float:
    return (RIGHT - LEFT) / max(1, len(series.points))


def _x_ticks(series: Series, tz: ZoneInfo) -> list[Tick]:
    every, slot = LABEL_EVERY.get(series.span.name, 15), _slot(series)
    return [
        Tick(LEFT + i * slot, _clock(point.start_ms, tz))
        for i, point in enumerate(series.points)
        if i % every == 0
    ]


def _point_title(point: Point, tz: ZoneInfo) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in _ordered(point.outcomes)) or "no attempts"
    times = f"; p50 {duration(point.p50_ms)}, p99 {duration(point.p99_ms)}" if point.total else ""
    return f"{_clock(point.start_ms, tz)}: {counts}{times}"


def _ordered(outcomes: dict[str, int]) -> list[tuple[str, int]]:
    known = [(k, outcomes[k]) for k in OUTCOMES if outcomes.get(k)]
    return known + sorted((k, v) for k, v in outcomes.items() if k not in OUTCOMES and v)


def attempts_chart(series: Series, tz: ZoneInfo, name: str) -> Chart:
    """Attempts per point of `series`, stacked by outcome."""
    top = _nice_top(max((p.total for p in series.points), default=0))
    scale, slot = (BOTTOM - TOP) / top, _slot(series)
    summary = ", ".join(f"{k} {v}" for k, v in _ordered(series.totals)) or "no attempts"
    chart = Chart(name, summary, x_ticks=_x_ticks(series, tz))
    chart.y_ticks = [Tick(BOTTOM - v * scale, f"{v:,}") for v in sorted({0, top // 2, top})]
    for i, point in enumerate(series.points):
        y, title = float(BOTTOM), _point_title(point, tz)
        for outcome, n in _ordered(point.outcomes):
            height = n * scale
            y -= height
            x = LEFT + i * slot + slot * 0.1
            chart.shapes.append(Shape(x, y, slot * 0.8, height, outcome, title))
    return chart


def _log_range(values: list[float]) -> tuple[int, int]:
    """Powers of ten around the values (at least 1 ms to 1 s)."""
    low = math.floor(math.log10(max(1.0, min(values, default=1.0))))
    high = math.ceil(math.log10(max(1000.0, max(values, default=1.0))))
    return min(low, 0), max(high, 3)


def latency_chart(series: Series, tz: ZoneInfo, name: str) -> Chart:
    """p50 and p99 of the attempts' durations per point of `series`, log scale; a point
    without attempts leaves a gap."""
    values = [v for p in series.points for v in (p.p50_ms, p.p99_ms) if v is not None]
    low, high = _log_range(values)
    slot = _slot(series)

    def y_of(ms: float) -> float:
        span = max(1e-9, math.log10(max(ms, 10.0**low)) - low)
        return BOTTOM - (BOTTOM - TOP) * span / (high - low)

    summary = f"p50 {duration(series.p50_ms)}, p99 {duration(series.p99_ms)}"
    chart = Chart(name, summary, x_ticks=_x_ticks(series, tz))
    chart.y_ticks = [Tick(y_of(10.0**e), duration(10.0**e)) for e in range(low, high + 1)]
    for kind in ("p99", "p50"):
        path: list[str] = []
        for i, point in enumerate(series.points):
            ms = point.p50_ms if kind == "p50" else point.p99_ms
            if ms is None:
                path.append("")  # a gap: the next point starts a new segment
                continue
            x, y = LEFT + (i + 0.5) * slot, y_of(ms)
            path.append(f"{'L' if path and path[-1] else 'M'}{x:.1f} {y:.1f}")
            chart.shapes.append(Shape(x, y, 0, 0, kind, _point_title(point, tz)))
        chart.lines.append((kind, " ".join(p for p in path if p)))
    return chart
