"""What a worker notes of the fan-outs it claims (dispatcher/lateness.py): each project once
a heartbeat, late when a fan-out of it waited over a threshold, a re-run's wait no
lateness, at most `most` projects; what it adds to the fleet's counts; and the keys a
count reads together share a Redis Cluster slot."""

from __future__ import annotations

from typing import Any, cast

from redis.crc import key_slot

from dispatcher.clock import now_ms
from dispatcher.keys import Keys
from dispatcher.lateness import WINDOW_S, Noted, add


def counts(noted: Noted) -> tuple[int, int, int]:
    taken = noted.take()
    return len(taken["seen"]), len(taken["late:60"]), len(taken["late:600"])


def test_each_project_counts_once_and_late_when_a_fan_out_of_it_waited() -> None:
    noted = Noted()
    noted.note("flood", 700_000)
    noted.note("flood", 5)  # still late this time: one of its fan-outs waited
    noted.note("slow", 90_000)
    noted.note("quiet", 10)
    assert counts(noted) == (3, 2, 1)
    assert counts(noted) == (0, 0, 0)  # taken: forgotten here


def test_only_a_jobs_first_claim_counts() -> None:
    """A re-run was due again after a backoff (or a lapsed lease): its enqueue time says
    nothing of the fleet's lateness; a job of unknown enqueue time counts for nothing."""
    noted = Noted()
    noted.claimed("rerun", now_ms() - 900_000, 2, now_ms())
    noted.claimed("unknown", 0, 1, now_ms())
    assert counts(noted) == (0, 0, 0)
    noted.claimed("first", now_ms() - 900_000, 1, now_ms())
    assert counts(noted) == (1, 1, 1)


def test_the_wait_is_counted_by_the_claims_clock_and_the_window_is_its() -> None:
    """The claim's time is Redis's (the claim script answers it), not this host's: a fan-out
    queued 30 s before its claim waited 30 s whatever this host's clock says, and the
    latest claim noted chooses the window its adds go to (0: none noted, this host's),
    though a claim before read a clock ahead (a failover to a master behind: review)."""
    noted = Noted()
    noted.claimed("p", 1_000_000, 1, 1_030_000)
    noted.claimed("q", 1_000_000, 1, 1_070_000)
    noted.claimed("r", 1_000_000, 1, 1_010_000)
    assert noted.at_ms == 1_010_000
    assert counts(noted) == (3, 1, 0)


def test_at_most_most_projects_are_noted_and_a_failed_write_gives_them_back() -> None:
    noted = Noted(most=3)
    for n in range(5):
        noted.note(f"p{n}", 700_000 if n >= 3 else 0)
    noted.note("p0", 700_000)  # one already noted still counts late
    taken = noted.take()
    assert taken["seen"] == {"p0", "p1", "p2"} and taken["late:600"] == {"p0"}
    noted.note("p9", 0)
    noted.give_back(taken)  # its heartbeat failed: within the bound, the late one first
    assert counts(noted) == (3, 1, 1)


class Pipe:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def pfadd(self, *args: Any) -> None:
        self.calls.append(("pfadd", *args))

    def expire(self, *args: Any) -> None:
        self.calls.append(("expire", *args))


def test_a_heartbeat_adds_each_kind_to_its_window_expiring_two_windows_on() -> None:
    keys, at_ms = Keys(), 1_000 * WINDOW_S * 7 + 5
    pipe = Pipe()
    add(cast(Any, pipe), keys, {"seen": {"a"}, "late:60": set(), "late:600": set()}, at_ms)
    assert pipe.calls == [
        ("pfadd", "dispatcher:stats:projects:seen:7", "a"),
        ("expire", "dispatcher:stats:projects:seen:7", 2 * WINDOW_S),
    ]


def test_a_counts_two_windows_share_the_shards_cluster_slot() -> None:
    keys = Keys.of_cluster_shard("dispatcher:queue", 3)
    assert key_slot(keys.projects("seen", 7).encode()) == key_slot(
        keys.projects("seen", 6).encode()
    )


def test_what_failed_heartbeats_give_back_stays_within_the_bound() -> None:
    """Heartbeats failing one after another (the home shard away): what each took is noted
    again only as far as the bound, late ones still late. Each failed round added up to
    the bound more, and the write that finally went through was one huge command (review)."""
    noted = Noted(most=1000)
    for heartbeat in range(20):
        for n in range(5000):
            noted.note(f"p{heartbeat}-{n}", 700_000 if n % 2 else 0)
        noted.give_back(noted.take())  # its write failed
    taken = noted.take()
    assert len(taken["seen"]) == 1000
    assert taken["late:600"] <= taken["late:60"] <= taken["seen"]
    assert {p for p in taken["seen"] if int(p.rsplit("-", 1)[1]) % 2} == taken["late:600"]
