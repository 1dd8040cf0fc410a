"""The chunks a worker keeps (`registry.matches.Matches`): by version, age and size."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from prometheus_client import REGISTRY

from dispatcher.keys import Keys
from dispatcher.models import Region
from dispatcher.registry.match import CallbackTarget, Chunk, ChunkQuery
from dispatcher.registry.matches import MAX_AHEAD, Matches


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
    matches.put(query(), b"1 4", stored)
    assert matches.get(query(), b"1 4") is stored
    assert matches.get(query(), b"1 5") is None  # the project's registry changed
    assert matches.get(query(), b"2 4") is None  # the platform's did
    assert matches.get(query("other"), b"1 4") is None  # another project's event
    assert matches.get(query(pipeline="p1"), b"1 4") is None  # another level set
    assert matches.get(query(after=2), b"1 4") is None  # another chunk


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


def test_one_projects_chunks_push_out_its_own_first() -> None:
    """A project emitting with a new pipeline id each time (a new chunk each) pushed every
    other project's chunks out of the worker's 4,096 (review): now its own go first, past
    its share of the chunks or of the callbacks."""
    matches = Matches(max_entries=8, max_targets=100, project_entries=3, project_targets=5)
    matches.put(query("quiet"), b"1 1", chunk(1))
    for n in range(20):
        matches.put(query("noisy", pipeline=f"p{n}"), b"1 1", chunk(2))
    assert matches.get(query("quiet"), b"1 1") is not None
    kept = [n for n in range(20) if matches.get(query("noisy", pipeline=f"p{n}"), b"1 1")]
    assert kept == [17, 18, 19]  # its 3 most recent
    matches.put(query("wide"), b"1 1", chunk(*range(10, 14)))  # 4 callbacks
    matches.put(query("wide", after=13), b"1 1", chunk(14, 15))  # 6 in all: its first goes
    assert matches.get(query("wide"), b"1 1") is None
    assert matches.get(query("wide", after=13), b"1 1") is not None
    assert matches.get(query("quiet"), b"1 1") is not None


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


class Reads:
    """A `ReadChunk` answering a chunk of the callback after its cursor, counting its
    reads; `fail`: the cursors whose first read raises."""

    def __init__(self, fail: tuple[int, ...] = ()) -> None:
        self.fail, self.reads = set(fail), list[int]()

    async def __call__(self, asked: ChunkQuery) -> Chunk:
        self.reads.append(asked.after)
        await asyncio.sleep(0)
        if asked.after in self.fail:
            self.fail.discard(asked.after)
            raise ConnectionError("Redis went away")
        return chunk(asked.after + 1)


async def test_runs_that_miss_a_chunk_together_share_its_read() -> None:
    """A burst of one project's events after a registry write: the runs that miss the same
    chunk at the same version while it is read wait for that read (counted once as read,
    the others as shared), a run at another version reads its own, a run cancelled while
    it waits stops no other, runs at an unknown version or past the read's age read alone,
    a failed read fails its waiters alone and the next run reads again (even before its
    entry is cleared), and what was read is then kept."""
    matches, answer, reads = Matches(), asyncio.Event(), list[tuple[int, int]]()

    async def slow(asked: ChunkQuery) -> Chunk:
        reads.append((asked.after, len(reads)))
        await answer.wait()
        return chunk(asked.after + 1)

    kept, read, shared = counted("kept"), counted("read"), counted("shared")
    waiting = [asyncio.ensure_future(matches.chunk(query(), b"1 1", slow)) for _ in range(5)]
    other = asyncio.ensure_future(matches.chunk(query(), b"1 2", slow))
    for _ in range(3):  # the runs start, then their reads
        await asyncio.sleep(0)
    assert reads == [(0, 0), (0, 1)]  # one per version
    waiting[0].cancel()  # the run that started the read stopped: the read goes on
    await asyncio.sleep(0)
    answer.set()
    got = await asyncio.gather(*waiting[1:], other)
    assert {id(c) for c in got[:4]} == {id(got[0])} and got[4] is not got[0]
    assert waiting[0].cancelled() and len(reads) == 2
    assert await matches.chunk(query(), b"1 2", slow) is got[4]  # kept since
    assert (counted("kept"), counted("read"), counted("shared")) == (
        kept + 1, read + 2, shared + 4)  # fmt: skip

    unknown = [asyncio.ensure_future(matches.chunk(query(after=3), None, slow)) for _ in range(2)]
    answer.clear()
    for _ in range(3):
        await asyncio.sleep(0)
    assert reads[2:] == [(3, 2), (3, 3)]  # an unknown version: each reads alone
    answer.set()
    await asyncio.gather(*unknown)

    aged, gate = Matches(max_age_s=0), asyncio.Event()

    async def held(asked: ChunkQuery) -> Chunk:
        reads.append((asked.after, len(reads)))
        await gate.wait()
        return chunk(asked.after + 1)

    late = [asyncio.ensure_future(aged.chunk(query(after=5), b"1 1", held)) for _ in range(2)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert reads[4:] == [(5, 4), (5, 5)]  # a read past its age is joined by none
    gate.set()
    await asyncio.gather(*late)

    failing = Reads(fail=(7,))
    both = await asyncio.gather(
        matches.chunk(query(after=7), b"1 1", failing),
        matches.chunk(query(after=7), b"1 1", failing),
        return_exceptions=True,
    )
    assert [type(e) for e in both] == [ConnectionError, ConnectionError]
    assert failing.reads == [7] and not matches._reading

    async def refused() -> Chunk:
        raise ConnectionError("Redis went away")

    gone = asyncio.ensure_future(refused())
    with contextlib.suppress(ConnectionError):
        await gone
    matches._reading[query(after=9).key] = (b"1 1", time.monotonic() + 10, gone)  # not cleared
    fresh = await matches.chunk(query(after=9), b"1 1", failing)  # read again, not its error
    assert [t.id for t in fresh.targets] == [10] and failing.reads == [7, 9]
    failing.reads.remove(9)
    again = await matches.chunk(query(after=7), b"1 1", failing)  # read again
    assert [t.id for t in again.targets] == [8] and failing.reads == [7, 7]


async def test_a_chunk_read_ahead_is_the_next_runs_at_the_same_version_only() -> None:
    """The next chunk of a fan-out, read while the one before runs: its run takes it (one
    read in all, counted as read), a run at another version or past its age reads again,
    a read ahead that failed is read again, and a new registry drops nothing but it."""
    matches, reads = Matches(), Reads(fail=(30,))
    read = counted("read")
    matches.read_ahead(query(after=10), b"1 1", reads)
    matches.read_ahead(query(after=10), b"1 1", reads)  # one read for one chunk
    matches.read_ahead(query(after=20), b"1 1", reads)
    matches.read_ahead(query(after=30), b"1 1", reads)
    matches.read_ahead(query(after=40), None, reads)  # never kept: never read ahead
    got = await matches.chunk(query(after=10), b"1 1", reads)
    assert [t.id for t in got.targets] == [11] and reads.reads == [10, 20, 30]
    assert await matches.chunk(query(after=10), b"1 1", reads) is got  # kept since
    assert counted("read") == read + 1
    await matches.chunk(query(after=20), b"1 2", reads)  # the registry changed: read again
    assert reads.reads == [10, 20, 30, 20]
    got = await matches.chunk(query(after=30), b"1 1", reads)  # its read failed: again
    assert [t.id for t in got.targets] == [31] and reads.reads == [10, 20, 30, 20, 30]


async def test_reads_ahead_are_bounded_and_stopped_with_the_worker() -> None:
    """The oldest reads ahead past `MAX_AHEAD` are dropped, not cancelled (a read cancelled
    while it sends a shared pipeline would fail its neighbours'); `close` stops the rest."""
    matches, answer = Matches(), asyncio.Event()

    async def slow(asked: ChunkQuery) -> Chunk:
        await answer.wait()
        return chunk(asked.after)

    started = []
    for after in range(MAX_AHEAD + 5):
        matches.read_ahead(query(after=after), b"1 1", slow)
        started.append(matches._ahead[query(after=after).key][2])
    kept, dropped = started[5:], started[:5]
    assert [task for _, _, task in matches._ahead.values()] == kept
    matches.close()
    answer.set()
    assert [chunk.targets[0].id for chunk in await asyncio.gather(*dropped)] == [0, 1, 2, 3, 4]
    assert all(task.cancelled() for task in kept) and not matches._ahead


async def test_a_chunk_read_ahead_ages_from_its_read_and_never_signs_with_an_old_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept after its run, a chunk read ahead lapses `max_age_s` after its read, not after
    the run; one whose target still signs with a rotated-out token is read again (its
    overlap ends by the clock); an entry for another version is replaced, not kept."""
    matches, now, reads = Matches(max_age_s=10), time.monotonic(), Reads()
    monkeypatch.setattr(time, "monotonic", lambda: now)
    matches.read_ahead(query(after=10), b"1 1", reads)
    monkeypatch.setattr(time, "monotonic", lambda: now + 8)
    await matches.chunk(query(after=10), b"1 1", reads)
    monkeypatch.setattr(time, "monotonic", lambda: now + 11)
    assert matches.get(query(after=10), b"1 1") is None and reads.reads == [10]
    matches.read_ahead(query(after=15), b"1 1", reads)  # its run comes after its age
    monkeypatch.setattr(time, "monotonic", lambda: now + 22)
    await matches.chunk(query(after=15), b"1 1", reads)  # read again, and kept from then
    assert reads.reads == [10, 15, 15] and matches.get(query(after=15), b"1 1") is not None
    reads.reads.clear()

    async def rotating(asked: ChunkQuery) -> Chunk:
        reads.reads.append(asked.after)
        return chunk(1, previous="old")

    matches.read_ahead(query(after=20), b"1 1", rotating)
    got = await matches.chunk(query(after=20), b"1 1", reads)
    assert [t.id for t in got.targets] == [21] and reads.reads == [20, 20]
    matches.read_ahead(query(after=30), b"1 1", reads)
    await asyncio.sleep(0)
    matches.read_ahead(query(after=30), b"1 2", reads)  # the registry changed meanwhile
    await asyncio.sleep(0)
    assert reads.reads == [20, 20, 30, 30]  # read again ahead, not at its run
    await matches.chunk(query(after=30), b"1 2", reads)
    assert reads.reads == [20, 20, 30, 30]


async def test_whether_a_project_numbers_its_events_is_asked_once_per_version() -> None:
    """The match reads whether the project numbers its events (`Chunk.numbered`) only when
    the worker does not know it at the claim's version: one of a project's chunks asks,
    its other chunks at that version (other pipelines', read at the same time or after;
    the next one read ahead) are told; another version, another project or an unknown
    version asks again; a read that asked and failed leaves the next one to ask."""
    matches, asked = Matches(), list[tuple[str, int]]()

    async def read(q: ChunkQuery) -> Chunk:
        if q.numbered is None:
            asked.append((q.project_id, q.after))
        await asyncio.sleep(0)
        if q.after == 7 and q.numbered is None:
            raise ConnectionError("Redis went away")
        return Chunk(chunk(q.after + 1).targets, None, numbered=q.numbered is None or q.numbered)

    at_once = [matches.chunk(query(pipeline=f"p{n}"), b"1 1", read) for n in range(5)]
    first = await asyncio.gather(*at_once)
    piped = await matches.chunk(query(pipeline="p9"), b"1 1", read)
    matches.read_ahead(query(after=5), b"1 1", read)
    ahead = await matches.chunk(query(after=5), b"1 1", read)
    assert {c.numbered for c in [*first, piped, ahead]} == {True}
    assert asked == [("demo", 0)]
    failed, after = await asyncio.gather(
        matches.chunk(query("gone", after=7), b"1 1", read),
        matches.chunk(query("gone", after=8), b"1 1", read),
        return_exceptions=True,
    )
    assert isinstance(failed, ConnectionError) and isinstance(after, Chunk) and after.numbered
    assert asked[1:] == [("gone", 7), ("gone", 8)]
    del asked[1:]
    await matches.chunk(query(pipeline="p2"), b"1 2", read)  # a registry write since
    await matches.chunk(query("other", pipeline="p3"), b"1 2", read)
    await matches.chunk(query(pipeline="p4"), None, read)  # unknown: never kept
    assert asked[1:] == [("demo", 0), ("other", 0), ("demo", 0)]
    assert matches.numbered("demo", b"1 2") is True and matches.numbered("demo", b"1 1") is None
