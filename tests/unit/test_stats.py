"""The status page's arithmetic, without Redis: duration buckets, percentiles read back from
them, series of points, and the charts' layout."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from zoneinfo import ZoneInfo

import pytest

from dispatcher.console import charts
from dispatcher.stats import BOUNDS_MS, DAY, HOUR, bucket_field, duration, percentile, series

UTC = ZoneInfo("UTC")


def buckets_of(durations: list[int]) -> dict[str, int]:
    return dict(Counter(bucket_field(ms) for ms in durations))


def test_a_duration_falls_in_the_first_bucket_whose_bound_holds_it() -> None:
    assert [bucket_field(ms) for ms in (0, 1, 2, 4, 1000, 1001, 60_000, 60_001)] == [
        "ms:1",
        "ms:1",
        "ms:2",
        "ms:5",
        "ms:1000",
        "ms:1500",
        "ms:60000",
        "ms:inf",
    ]
    assert list(BOUNDS_MS) == sorted(set(BOUNDS_MS))
    assert all(b / a <= 2 for a, b in itertools.pairwise(BOUNDS_MS))


def test_percentiles_land_in_the_true_values_bucket() -> None:
    rng = random.Random(24)
    durations = [int(rng.lognormvariate(4, 1.2)) for _ in range(10_000)]  # ~55 ms median
    found = buckets_of(durations)
    for q in (0.5, 0.9, 0.99):
        true = sorted(durations)[int(q * len(durations)) - 1]
        estimate = percentile(found, q)
        assert estimate is not None
        low = max([0, *(b for b in BOUNDS_MS if b < true)])
        high = min(b for b in BOUNDS_MS if b >= true)
        assert low <= estimate <= high, (q, true, estimate)


def test_percentiles_interpolate_inside_a_bucket_and_stop_at_the_last_bound() -> None:
    assert percentile({}, 0.5) is None
    forty = buckets_of([40] * 100)  # all in (30, 50]
    assert percentile(forty, 0.5) == pytest.approx(40)
    assert percentile(forty, 0.99) == pytest.approx(49.8)
    assert percentile(buckets_of([90_000] * 3), 0.5) == 60_000  # past the last bound
    # the outcome fields beside the buckets are no durations
    assert percentile({**forty, "success": 100, "failed": 7}, 0.5) == pytest.approx(40)


def test_a_series_sums_its_points_and_reads_the_percentiles_of_all() -> None:
    fast = {b"success": b"9", b"ms:10": b"9"}
    slow = {b"success": b"1", b"failed": b"1", b"ms:5000": b"2"}
    found = series(HOUR, 1000, [{}, fast, slow])
    assert [p.start_ms for p in found.points] == [998 * 60_000, 999 * 60_000, 1000 * 60_000]
    assert [p.total for p in found.points] == [0, 9, 2]
    assert found.points[0].p50_ms is None and found.points[1].p99_ms == pytest.approx(9.97)
    assert found.totals == {"success": 10, "failed": 1}
    assert found.p50_ms is not None and 7 < found.p50_ms <= 10
    assert found.p99_ms is not None and 3000 < found.p99_ms <= 5000


def test_the_attempts_chart_stacks_outcomes_to_scale() -> None:
    points = [{b"success": b"30", b"retry": b"10", b"ms:50": b"40"}, {}, {b"gone": b"5"}]
    chart = charts.attempts_chart(series(DAY, 50, points), UTC, "Attempts")
    assert [s.kind for s in chart.shapes] == ["success", "retry", "gone"]
    success, retry, gone = chart.shapes
    assert [t.label for t in chart.y_ticks] == ["0", "25", "50"]  # 40 rounds up to 50
    full = charts.BOTTOM - charts.TOP
    assert success.height == pytest.approx(full * 30 / 50)
    assert retry.y + retry.height == pytest.approx(success.y)  # stacked on top
    assert gone.x > success.x and gone.y + gone.height == pytest.approx(charts.BOTTOM)
    assert chart.summary == "success 30, retry 10, gone 5"
    assert success.title == "08:00: success 30, retry 10; p50 40 ms, p99 50 ms"


def test_the_latency_chart_leaves_a_gap_where_there_was_no_attempt() -> None:
    points = [{b"ms:10": b"4"}, {}, {b"ms:100": b"4"}, {b"ms:1000": b"4"}]
    chart = charts.latency_chart(series(HOUR, 3, points), UTC, "Duration")
    p99 = dict(chart.lines)["p99"]
    assert p99.count("M") == 2 and p99.count("L") == 1  # two segments around the gap
    dots = [s for s in chart.shapes if s.kind == "p50"]
    assert len(dots) == 3 and dots[0].y > dots[1].y > dots[2].y  # slower is higher
    assert [t.label for t in chart.y_ticks] == ["1.0 ms", "10 ms", "100 ms", "1.0 s"]
    # equal ratios are equal heights: a log scale
    assert dots[0].y - dots[1].y == pytest.approx(dots[1].y - dots[2].y, abs=3)


def test_durations_read_as_people_write_them() -> None:
    assert [duration(v) for v in (None, 0.4, 42.5, 830, 4900)] == [
        "-",
        "0.4 ms",
        "42 ms",
        "830 ms",
        "4.9 s",
    ]
