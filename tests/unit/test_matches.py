"""The chunks a worker keeps (`registry.match.Matches`): by version, age and size."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from dispatcher.keys import Keys
from dispatcher.models import Region
from dispatcher.registry.match import CallbackTarget, Chunk, ChunkQuery, Matches


def query(project: str = "demo", after: int = 0, pipeline: object = None) -> ChunkQuery:
    return ChunkQuery(Keys(), lambda stored: "", project, "BUILD_END", pipeline, after, 100)


def counted(source: str) -> float:
    return REGISTRY.get_sample_value("dispatcher_matches_total", {"source": source}) or 0.0


def chunk(*ids: int, previous: str = "") -> Chunk:
    targets = [CallbackTarget(i, f"https://example.com/{i}", Region.OSS, "t") for i in ids]
    if previous:
        targets.append(CallbackTarget(99, "https://example.com/r", Region.OSS, "t",
                                      previous_token=previous))  # fmt: skip
    return Chunk(targets, None)


def test_a_chunk_is_kept_under_its_version_and_its_query_alone() -> None:
    matches, stored = Matches(), chunk(1, 2)
    kept, read = counted("kept"), counted("read")
    matches.put(query(), b"1 4", stored)
    assert matches.get(query(), b"1 4") is stored
    assert matches.get(query(), b"1 5") is None  # the project's registry changed
    assert matches.get(query(), b"2 4") is None  # the platform's did
    assert matches.get(query("other"), b"1 4") is None  # another project's event
    assert matches.get(query(pipeline="p1"), b"1 4") is None  # another level set
    assert matches.get(query(after=2), b"1 4") is None  # another chunk
    assert (counted("kept"), counted("read")) == (kept + 1, read + 5)


def test_nothing_is_kept_without_a_version_or_while_a_rotated_token_signs() -> None:
    matches = Matches()
    matches.put(query(), None, chunk(1))
    assert matches.get(query(), None) is None
    matches.put(query(), b"1 1", chunk(1, previous="old"))  # its overlap ends by the clock
    assert matches.get(query(), b"1 1") is None


def test_a_kept_chunk_lapses_after_its_age(monkeypatch: pytest.MonkeyPatch) -> None:
    matches, now = Matches(max_age_s=10), time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now)
    matches.put(query(), b"1 1", chunk(1))
    monkeypatch.setattr(time, "monotonic", lambda: now + 9)
    assert matches.get(query(), b"1 1") is not None
    monkeypatch.setattr(time, "monotonic", lambda: now + 11)
    assert matches.get(query(), b"1 1") is None


def test_the_least_recently_used_chunks_go_first_past_either_bound() -> None:
    matches = Matches(max_entries=2, max_targets=5)
    matches.put(query("a"), b"1 1", chunk(1))
    matches.put(query("b"), b"1 1", chunk(2))
    assert matches.get(query("a"), b"1 1") is not None  # used: b is now the oldest
    matches.put(query("c"), b"1 1", chunk(3))
    assert matches.get(query("b"), b"1 1") is None
    assert matches.get(query("a"), b"1 1") is not None
    matches.put(query("d"), b"1 1", chunk(4, 5, 6, 7))  # 1 + 4 targets kept at most
    assert matches.get(query("c"), b"1 1") is None
    assert matches.get(query("a"), b"1 1") is not None
    matches.put(query("e"), b"1 1", chunk(*range(10, 16)))  # alone over the bound: not kept
    assert matches.get(query("e"), b"1 1") is None
    assert matches.get(query("a"), b"1 1") is None  # it made room for it, all the same
    assert matches.get(query("d"), b"1 1") is None
