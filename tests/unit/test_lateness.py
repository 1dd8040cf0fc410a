"""A worker's per-project lateness (dispatcher/worker/lateness.py): each project's latest
fan-out counts, projects not seen for 5 minutes are forgotten, at most `most` are kept,
and a re-run's wait is no lateness."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dispatcher.clock import now_ms
from dispatcher.worker.lateness import LATENESS, Lateness, claimed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counts(late: Lateness) -> tuple[int, int, int]:
    return late.seen(), late.late(60), late.late(600)


def test_a_projects_latest_fan_out_counts_and_quiet_projects_are_forgotten() -> None:
    clock = Clock()
    late = Lateness(forget_s=300, clock=clock)
    late.note("flood", 700_000)
    late.note("slow", 90_000)
    late.note("quiet", 10)
    assert counts(late) == (3, 2, 1)
    late.note("slow", 5)  # served on time now
    assert counts(late) == (3, 1, 1)
    clock.now += 200
    late.note("flood", 800_000)
    clock.now += 150  # "slow" and "quiet" unseen for 350 s, "flood" for 150 s
    assert counts(late) == (1, 1, 1)
    clock.now += 300
    assert counts(late) == (0, 0, 0)


def test_at_most_the_most_recently_seen_projects_are_kept() -> None:
    late = Lateness(most=3, clock=Clock())
    for n in range(5):
        late.note(f"p{n}", 700_000 if n < 2 else 0)
    assert counts(late) == (3, 0, 0)  # p0 and p1, the late ones, were the least recent


@pytest.fixture
def fresh() -> Iterator[None]:
    LATENESS.clear()
    yield
    LATENESS.clear()


@pytest.mark.usefixtures("fresh")
def test_only_a_jobs_first_claim_counts() -> None:
    """A re-run was due again after a backoff (or a lapsed lease): its enqueue time says
    nothing of the fleet's lateness; a job of unknown enqueue time counts for nothing."""
    claimed("rerun", now_ms() - 900_000, 2)
    claimed("unknown", 0, 1)
    assert counts(LATENESS) == (0, 0, 0)
    claimed("first", now_ms() - 900_000, 1)
    assert counts(LATENESS) == (1, 1, 1)
