"""Matching an event to its callbacks, a chunk at a time.

An event of project P whose data names a pipeline X matches three levels, broadest first:
the platform-wide callbacks (project `DEVOPS_ALL_PROJECT`), P's own, and X's. Each level's
enabled callbacks of the event are a sorted set scored by callback id, so a fan-out reads
the first `size` ids after a cursor over all three in one script, and the next chunk starts
after the last id it read. A URL that two levels send the same event to gets it once, from
the broader level (a project admin cannot displace an operator's delivery).

A worker keeps the chunks it read (`Matches`), each under the registry version it was read
at: the platform's and the project's (`dispatcher:cb:version:{project}`), which every
write that changes what the match reads bumps in the same script (`registry.scripts`,
`health.py`). A claim reads both versions with the job (`worker.claims.Claim`), so an
event whose project's callbacks did not change since reads no callback from Redis. While
the attempts of a fan-out's chunk run, the worker reads the next chunk (`read_ahead`), kept
for the run that asks for it under the same rules: the job's next claim, most often this
worker's, finds its callbacks read and their targets built.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispatcher import keys, metrics
from dispatcher.clock import now_ms
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.registry.options import NO_OPTIONS, Options
from dispatcher.registry.rules import Destination, destination, is_pipeline_id
from dispatcher.registry.scripts import Match
from dispatcher.stopping import retrieved

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.headers import AuthHeader
    from dispatcher.keys import Keys

__all__ = [
    "TARGET_FIELDS",
    "CallbackTarget",
    "Chunk",
    "ChunkQuery",
    "Matches",
    "event_scopes",
    "read_secrets",
]

Decrypt = Callable[[bytes | None], str]
UNREADABLE = (
    "the callback's secrets cannot be decrypted with DISPATCHER_TOKEN_KEYS (was the key "
    "they were encrypted with dropped?): put the key back, or register the callback again"
)


def read_secrets(
    decrypt: Decrypt, token: bytes | None, name: bytes | None, value: bytes | None
) -> tuple[str, AuthHeader | None, str | None]:
    """A callback's stored token and auth header as sent, and why they cannot be when
    they cannot (a key missing from `DISPATCHER_TOKEN_KEYS`): then its deliveries fail,
    the others' go on."""
    try:
        header = (name.decode(), decrypt(value)) if name else None
        return decrypt(token), header, None
    except ValueError:  # cannot decrypt, or not text
        return "", None, UNREADABLE


# What a delivery reads of a callback's hash, in this order (the match script and
# `Registry.target` both): `url` and `enabled` first, the match script relies on it.
# `failing` is '1' while failures are on record, '0' when none (`health.py` writes both);
# a callback without it (written before it was kept) counts as failing, so its first
# success writes the reset, and the '0'.
TARGET_FIELDS = (
    "url",
    "enabled",
    "failing",
    "region",
    "secretToken",
    "authHeaderName",
    "authHeaderValue",
    "previousToken",
    "previousTokenUntil",
    *Options.FIELDS,
)


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """What a delivery needs of a callback, its secrets included. `project_id` is whose
    callback it is (`DEVOPS_ALL_PROJECT` for a platform-wide one): its history goes there."""

    id: int
    url: str
    region: Region
    secret_token: str
    failing: bool = True  # failures on record (True when unknown: the reset is then written)
    project_id: str = ""
    auth_header: AuthHeader | None = None
    problem: str | None = None  # why nothing can be sent to it (its secrets are unreadable)
    options: Options = NO_OPTIONS
    previous_token: str = ""  # a rotated-out token that still signs (its overlap is on)
    # its URL read once: a worker keeps its targets (`Matches`), its attempts reuse this
    destination: Destination = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "destination", destination(self.url))

    @classmethod
    def from_fields(
        cls,
        callback_id: int,
        values: Sequence[bytes | None],
        decrypt: Decrypt,
        *,
        failing: bool | None = None,
        owner: str = "",
    ) -> CallbackTarget:
        """The target from the values of `TARGET_FIELDS`, secrets decrypted; the previous
        token only while its overlap lasts. Failures on record: `failing` when given (a
        lane's release looks at the health hash), else the hash's mark."""
        url, _, mark, region, token, name, value, previous, until, *options = values
        overlapping = bool(previous) and int(until or 0) > now_ms()
        secret, header, problem = read_secrets(decrypt, token, name, value)
        old, _, old_problem = read_secrets(decrypt, previous if overlapping else None, None, None)
        return cls(
            callback_id,
            (url or b"").decode(),
            Region((region or b"").decode()),
            secret,
            mark != b"0" if failing is None else failing,
            owner,
            header,
            problem or old_problem,
            Options.from_values(options),
            old,
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of an event's callbacks; `after` is where the next starts (None: none)."""

    targets: list[CallbackTarget]
    after: int | None


def event_scopes(project_id: str, pipeline_id: object = None) -> list[tuple[str, str]]:
    """The (scope, owner project) of every level an event of `project_id` reaches, broadest
    first; `pipeline_id` is the event's `data.pipelineId` (ignored unless it can be one)."""
    scopes = [] if project_id == PLATFORM_PROJECT else [(PLATFORM_PROJECT, PLATFORM_PROJECT)]
    scopes.append((project_id, project_id))
    if is_pipeline_id(pipeline_id):
        scopes.append((keys.scope(project_id, str(pipeline_id)), project_id))
    return scopes


class ChunkQuery:
    """The chunk of `size` callbacks after callback id `after`: queue it on a pipeline (a
    Batcher's, say), then `read` its answer."""

    def __init__(
        self,
        keys: Keys,
        decrypt: Decrypt,
        project_id: str,
        event: str,
        pipeline_id: object,
        after: int,
        size: int,
    ) -> None:
        self.keys = keys
        self.decrypt = decrypt
        self.scopes = event_scopes(project_id, pipeline_id)
        self.event = event
        self.after = after
        self.size = size

    def following(self, after: int) -> ChunkQuery:
        """The query of the chunk after callback id `after` (the next one)."""
        following = copy.copy(self)
        following.after = after
        return following

    @property
    def key(self) -> tuple[object, ...]:
        """What the chunk depends on besides the registry: its levels, event and cursor."""
        return (*self.scopes, self.event, self.after, self.size)

    def queue_on(self, pipe: Pipeline) -> None:
        scopes = [scope for scope, _ in self.scopes]
        Match(
            levels=[self.keys.match(scope, self.event) for scope in scopes]
            + [self.keys.callback_unique(scope) for scope in scopes],
            after=self.after,
            size=self.size,
            callback_prefix=self.keys.CALLBACK_PREFIX,
            field_prefix=keys.callback_unique_field(self.event, ""),
            fields=TARGET_FIELDS,
        ).queue_on(pipe)

    def read(self, answer: list[Any]) -> Chunk:
        after, rows = answer
        return Chunk([self._target(row) for row in rows], int(after) if after else None)

    def _target(self, row: list[Any]) -> CallbackTarget:
        cid, level, *values = row
        return CallbackTarget.from_fields(
            int(cid),
            values,
            self.decrypt,
            owner=self.scopes[int(level) - 1][1],
        )


ReadChunk = Callable[[ChunkQuery], Awaitable[Chunk]]
# A chunk's read under way: the version it is for, the monotonic time its age ends, the read.
Reading = tuple[bytes | None, float, "asyncio.Task[Chunk]"]
MAX_AHEAD = 64  # chunks read ahead and not asked for yet (another worker took their job)


class Matches:
    """The chunks this worker read, each kept under the registry version it was read at
    (see the module's doc): a chunk is good while the version its event was claimed at is
    the same, and for `max_age_s` at most (a write that bumps no version, such as one by
    a version before this, shows within it). At most `max_entries` chunks and `max_targets`
    callbacks are kept, the least recently used dropped first. A chunk with a rotated token
    still signing is not kept: its overlap ends by the clock, not by a write. A chunk read
    ahead (the next of a fan-out, while this one's attempts run) waits for its run under
    the same rules, `MAX_AHEAD` at most. Runs that miss the same chunk at the same
    version while its read is under way wait for that read (a burst of one project's
    events after a registry write reads its chunk once, not once per event)."""

    def __init__(
        self, max_entries: int = 4096, max_targets: int = 50_000, max_age_s: float = 10.0
    ) -> None:
        self.max_entries = max_entries
        self.max_targets = max_targets
        self.max_age_s = max_age_s
        self._chunks: OrderedDict[tuple[object, ...], tuple[bytes, float, Chunk]] = OrderedDict()
        self._targets = 0
        self._kept, self._read, self._shared = (
            metrics.MATCHES.labels(source=s) for s in ("kept", "read", "shared")
        )
        # chunks being read (or read) ahead, by key: the version and clock they are good for
        self._ahead: OrderedDict[tuple[object, ...], Reading] = OrderedDict()
        self._reading: dict[tuple[object, ...], Reading] = {}  # read now, for runs waiting

    async def chunk(self, query: ChunkQuery, version: bytes | None, read: ReadChunk) -> Chunk:
        """The chunk `query` reads: kept at `version`, read ahead at it, or `read` now; then
        kept (see `put`; a chunk read ahead, until its own read's age ends)."""
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
            task = asyncio.ensure_future(read(query))
            reading = (version, time.monotonic() + self.max_age_s, task)
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
            _good(entry, version) for entry in (self._chunks.get(key), self._ahead.get(key))
        ):
            return
        self._ahead.pop(key, None)  # stale: dropped
        task = asyncio.ensure_future(read(query))
        task.add_done_callback(retrieved)  # its error is its run's (who reads again)
        self._ahead[key] = (version, time.monotonic() + self.max_age_s, task)
        while len(self._ahead) > MAX_AHEAD:  # the oldest dropped
            self._ahead.popitem(last=False)

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
        found = self._chunks.get(query.key) if version is not None else None
        if found is None or not _good(found, version):
            return None
        self._chunks.move_to_end(query.key)
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
        key = query.key
        old = self._chunks.pop(key, None)
        if old is not None:
            self._targets -= len(old[2].targets)
        self._chunks[key] = (version, until, chunk)
        self._targets += len(chunk.targets)
        while len(self._chunks) > self.max_entries or self._targets > self.max_targets:
            _, (_, _, dropped) = self._chunks.popitem(last=False)
            self._targets -= len(dropped.targets)


def _good(entry: tuple[bytes | None, float, object] | None, version: bytes | None) -> bool:
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
