"""The chunks a worker keeps (`Matches`), each under the registry version it was read at:
the platform's and the project's (`dispatcher:cb:version:{project}`), which every write
that changes what the match reads bumps in the same script (`registry.scripts`,
`health.py`). A claim reads both versions with the job (`worker.claims.Claim`), so an
event whose project's callbacks did not change since reads no callback from Redis. While
the attempts of a fan-out's chunk run, the worker reads the next chunk (`read_ahead`), kept
for the run that asks for it under the same rules: the job's next claim, most often this
worker's, finds its callbacks read and their targets built. Whether a project numbers its
events (`match.Chunk.numbered`: an ordered callback of its own or the platform's, which
the same writes bump the versions of) is kept per project and version too, so the match
asks it once per project and version, not once per chunk (97 pipelines' chunks of one
project: one EXISTS, not 97).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher import metrics
from dispatcher.recency import OwnedLRU
from dispatcher.registry.match import Chunk, ChunkQuery
from dispatcher.stopping import retrieved

__all__ = ["MAX_AHEAD", "Matches"]

ReadChunk = Callable[[ChunkQuery], Awaitable[Chunk]]
# A chunk's read under way: the version it is for, the monotonic time its age ends, the read.
Reading = tuple[bytes | None, float, "asyncio.Task[Chunk]"]
Kept = tuple[bytes, float, Chunk]  # a kept chunk: its version, its age's end, it
# a read that asks whether a project numbers its events: its version, age's end, answer
Asking = tuple[bytes, float, "asyncio.Future[bool | None]"]
MAX_AHEAD = 64  # chunks read ahead and not asked for yet (another worker took their job)


class Matches:
    """The chunks this worker read, each kept under the registry version it was read at
    (see the module's doc): a chunk is good while the version its event was claimed at is
    the same, and for `max_age_s` at most (a write that bumps no version, such as one by
    a version before this, shows within it). At most `max_entries` chunks and `max_targets`
    callbacks are kept, the least recently used dropped first; one emitting project's at
    most `project_entries` and `project_targets`, its own least recently used going first
    (one project's random pipeline ids cannot push out the others' chunks). A chunk with
    a rotated token still signing is not kept: its overlap ends by the clock, not by a
    write (`recency.OwnedLRU` keeps them). A chunk read ahead (the next of a fan-out, while
    this one's attempts run) waits for its run under the same rules, `MAX_AHEAD` at most.
    Runs that miss the same chunk at the same version while its read is under way wait for
    that read (a burst of one project's events after a registry write reads its chunk
    once, not once per event)."""

    def __init__(
        self, max_entries: int = 4096, max_targets: int = 50_000, max_age_s: float = 10.0,
        *, project_entries: int = 512, project_targets: int = 12_500,
    ) -> None:  # fmt: skip
        self.max_age_s = max_age_s
        # kept chunks by emitting project, weighed by their callbacks
        self._chunks: OwnedLRU[tuple[object, ...], Kept] = OwnedLRU(
            most=project_entries,
            total=max_entries,
            most_weight=project_targets,
            total_weight=max_targets,
        )
        self._kept, self._read, self._shared = (
            metrics.MATCHES.labels(source=s) for s in ("kept", "read", "shared")
        )
        # chunks being read (or read) ahead, by key: the version and clock they are good for
        self._ahead: OrderedDict[tuple[object, ...], Reading] = OrderedDict()
        self._reading: dict[tuple[object, ...], Reading] = {}  # read now, for runs waiting
        # whether a project numbers its events: the version and clock it is good for
        self._numbered: OrderedDict[str, tuple[bytes, float, bool]] = OrderedDict()
        self._projects = max_entries  # projects whose flag is kept, at most
        self._asking: dict[str, Asking] = {}  # the reads that ask it, by project

    async def chunk(self, query: ChunkQuery, version: bytes | None, read: ReadChunk) -> Chunk:
        """The chunk `query` reads: kept at `version`, read ahead at it, or `read` now; then
        kept (see `put`; a chunk read ahead, until its own read's age ends)."""
        query.numbered = self.numbered(query.project_id, version)
        chunk = self.get(query, version)
        ahead = self._ahead.pop(query.key, None)  # (one not taken is dropped, not cancelled)
        if chunk is not None:
            self._kept.inc()
            return chunk
        until = None
        if ahead is not None and _good(ahead, version):
            with contextlib.suppress(Exception):  # its read failed: read again now
                chunk = await asyncio.shield(ahead[2])  # this run stopped: the read goes on
            if chunk is not None and _signs_twice(chunk):  # its overlap ends by the clock
                chunk = None
            until = ahead[1]
        if chunk is None:
            chunk, until = await self._read_now(query, version, read)
        else:
            self._read.inc()
        self.put(query, version, chunk, until=until)
        return chunk

    async def _read_now(
        self, query: ChunkQuery, version: bytes | None, read: ReadChunk
    ) -> tuple[Chunk, float]:
        """`read` of `query`'s chunk, or the one under way for `version` (known, and the
        read within its age): its chunk and the monotonic time its age ends. Raises what
        the read raised."""
        key = query.key
        reading = self._reading.get(key)
        if version is not None and reading is not None and _joinable(reading, version):
            self._shared.inc()
        elif version is None:  # unknown: read alone, as never kept
            self._read.inc()
            return await read(query), time.monotonic()
        else:
            self._read.inc()
            until = time.monotonic() + self.max_age_s
            task = asyncio.ensure_future(self._noted(read, query, version, until))
            reading = (version, until, task)
            self._reading[key] = reading
            task.add_done_callback(functools.partial(self._read_done, key, reading))
        return await asyncio.shield(reading[2]), reading[1]  # a run stopped: the read goes on

    def _read_done(
        self, key: tuple[object, ...], reading: Reading, task: asyncio.Task[Chunk]
    ) -> None:
        retrieved(task)  # each waiter has its error; none waiting leaves no warning
        if self._reading.get(key) is reading:
            del self._reading[key]

    def read_ahead(self, query: ChunkQuery, version: bytes | None, read: ReadChunk) -> None:
        """Start `read` of `query`'s chunk (a fan-out's next, while the attempts of the one
        before run) for the `chunk` call that asks for it at `version` (None: never kept,
        so not read ahead either)."""
        key = query.key
        if version is None or any(
            _good(entry, version)
            for entry in (self._chunks.find(query.project_id, key), self._ahead.get(key))
        ):
            return
        self._ahead.pop(key, None)  # stale: dropped
        query.numbered = self.numbered(query.project_id, version)
        until = time.monotonic() + self.max_age_s
        task = asyncio.ensure_future(self._noted(read, query, version, until))
        task.add_done_callback(retrieved)  # its error is its run's (who reads again)
        self._ahead[key] = (version, until, task)
        while len(self._ahead) > MAX_AHEAD:  # the oldest dropped
            self._ahead.popitem(last=False)

    async def _noted(
        self, read: ReadChunk, query: ChunkQuery, version: bytes, until: float
    ) -> Chunk:
        """`read` of `query`'s chunk at `version`; what it says of whether the project
        numbers its events is kept until `until`, when the match read that. A read that
        would ask while another asks at the same version waits for that one's answer
        first (the chunks of a project's many pipelines, missed at once: one EXISTS)."""
        project = query.project_id
        asking = self._asking.get(project)
        if query.numbered is None and asking is not None and _good(asking, version):
            query.numbered = await asyncio.shield(asking[2])  # (None: it failed, so ask)
        if query.numbered is not None:
            return await read(query)
        told: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._asking[project] = (version, until, told)
        try:
            chunk = await read(query)
            self._numbered[project] = (version, until, chunk.numbered)
            self._numbered.move_to_end(project)
            while len(self._numbered) > self._projects:  # the least recently used dropped
                self._numbered.popitem(last=False)
            told.set_result(chunk.numbered)
            return chunk
        finally:
            if not told.done():
                told.set_result(None)
            if self._asking.get(project, (None, None, None))[2] is told:
                del self._asking[project]

    def numbered(self, project_id: str, version: bytes | None) -> bool | None:
        """Whether `project_id` numbers its events, as read at `version` (None: unknown,
        or read at another version, or longer ago than `max_age_s`)."""
        found = self._numbered.get(project_id)
        if found is None or not _good(found, version):
            return None
        self._numbered.move_to_end(project_id)
        return found[2]

    def close(self) -> None:
        """Stop the reads ahead still running (the worker stops). Those dropped before are
        let run to their end: a read cancelled while it sends a shared pipeline would fail
        the other callers' reads in it."""
        for _, _, task in (*self._ahead.values(), *self._reading.values()):
            task.cancel()
        self._ahead.clear()
        self._reading.clear()

    def get(self, query: ChunkQuery, version: bytes | None) -> Chunk | None:
        """The chunk `query` reads, when kept at `version` (None: unknown, never kept)."""
        found = self._chunks.find(query.project_id, query.key) if version is not None else None
        if found is None or not _good(found, version):
            return None
        self._chunks.touch(query.project_id, query.key)
        return found[2]

    def put(
        self, query: ChunkQuery, version: bytes | None, chunk: Chunk, until: float | None = None
    ) -> None:
        """Keep `chunk`, read by `query` after a claim saw `version` (it is no older), until
        `max_age_s` from now (`until`: the monotonic time its age ends, when read before)."""
        now = time.monotonic()
        until = now + self.max_age_s if until is None else until
        if version is None or _signs_twice(chunk) or until <= now:
            return
        kept = (version, until, chunk)
        self._chunks.put(query.project_id, query.key, kept, weight=len(chunk.targets))


def _good(entry: tuple[Any, ...] | None, version: bytes | None) -> bool:
    """Whether a kept or read-ahead `entry` serves a run at `version` now."""
    return entry is not None and entry[0] == version and time.monotonic() <= entry[1]


def _joinable(reading: Reading, version: bytes) -> bool:
    """Whether a run at `version` may wait for `reading`: for that version, within its age,
    and not failed already (its entry goes a turn of the loop after its read ends)."""
    task = reading[2]
    failed = task.done() and (task.cancelled() or task.exception() is not None)
    return not failed and _good(reading, version)


def _signs_twice(chunk: Chunk) -> bool:
    """Whether a target of `chunk` still signs with a rotated-out token (never kept)."""
    return any(target.previous_token for target in chunk.targets)
