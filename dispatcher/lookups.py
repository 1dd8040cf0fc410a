"""Name lookups, each owner's bounded: a project whose names resolve slowly (its own
nameserver that never answers, say) holds at most `PER_OWNER` of the process's lookup
threads, so other projects' lookups never queue behind its hung ones.

The system resolver blocks a thread per lookup: the event loop's `getaddrinfo` runs in a
pool (uvloop's: libuv's, `UV_THREADPOOL_SIZE`; asyncio's: the default executor), and a
lookup whose attempt timed out keeps its thread until the resolver gives up, seconds to
tens of seconds later. So an owner's lookup holds its place here until its thread returns,
not until its caller stops waiting. The owner is `OWNER` in the caller's context (the
callback's project, set by the worker per attempt and by the API per registration); ""
when unset. `LOOKUP_THREADS` is what the processes give the pools (`serve`). The HTTP
clients keep no DNS cache of their own (aiohttp's shares one lookup of a host among its
callers, and the first caller's owner would hold the others); `Names` keeps each owner's
answers apart: an owner's lookups of one name at once are one lookup, its answer kept a
few seconds for that owner alone.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["LOOKUP_THREADS", "OWNER", "PER_OWNER", "Names", "bounded", "owned"]

T = TypeVar("T")

OWNER: ContextVar[str] = ContextVar("lookup_owner", default="")
PER_OWNER = 4  # lookups in flight per owner (running, or their thread not back yet)
# the pools' threads: libuv gives lookups half of them, so 16 owners' worth of hung lookups
LOOKUP_THREADS = 128


@dataclass
class _Gate:
    """One owner's lookups: a place each, and how many run or wait (the gate goes when
    none does)."""

    places: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PER_OWNER))
    users: int = 0


# per event loop (a semaphore belongs to one): each owner's gate
_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Gate]] = (
    weakref.WeakKeyDictionary()
)


class owned:  # lower case: used as a function, `with owned(project):`
    """The lookups made inside count as `owner`'s (a class, not a generator: the worker
    enters one per attempt)."""

    __slots__ = ("_owner", "_token")

    def __init__(self, owner: str) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        self._token = OWNER.set(self._owner)

    def __exit__(self, *_: object) -> None:
        OWNER.reset(self._token)


async def bounded(lookup: Callable[[], Awaitable[T]]) -> T:
    """`lookup()`, once the owner has a place: it keeps it until the lookup ends, even
    when the caller stops waiting first (cancelled, timed out)."""
    gates = _GATES.setdefault(asyncio.get_running_loop(), {})
    owner = OWNER.get()
    gate = gates.setdefault(owner, _Gate())
    gate.users += 1
    try:
        await gate.places.acquire()
    except BaseException:
        _leave(gates, owner, gate)
        raise
    running = asyncio.ensure_future(lookup())
    running.add_done_callback(lambda task: _ended(gates, owner, gate, task))
    return await asyncio.shield(running)


def _ended(gates: dict[str, _Gate], owner: str, gate: _Gate, task: asyncio.Future[T]) -> None:
    gate.places.release()
    _leave(gates, owner, gate)
    if not task.cancelled():
        task.exception()  # retrieved: its caller may have stopped waiting


def _leave(gates: dict[str, _Gate], owner: str, gate: _Gate) -> None:
    gate.users -= 1
    if gate.users == 0 and gates.get(owner) is gate:
        del gates[owner]


@dataclass
class _Running:
    """A lookup under way and how many callers wait for it."""

    task: asyncio.Future[Any]
    waiting: int = 0


@dataclass
class _Answers:
    """One owner's answers (each with when it lapses, least recently used first) and its
    lookups under way."""

    kept: OrderedDict[Hashable, tuple[float, Any]] = field(default_factory=OrderedDict)
    running: dict[Hashable, _Running] = field(default_factory=dict)


class Names(Generic[T]):
    """Each owner's answers to its lookups, kept `ttl` seconds (aiohttp's cache keeps them
    10): at most `per_owner` names an owner, `owners` owners, the least recently used going
    first. An owner's lookups of one name at once are one lookup (`bounded`, as that
    owner's); no answer and no lookup is ever shared with another owner. A failed lookup
    is not kept; one whose callers all stopped waiting is called off (`bounded`: a lookup
    already running keeps its place until it ends)."""

    def __init__(self, ttl: float = 10.0, per_owner: int = 32, owners: int = 2048) -> None:
        self.ttl, self.per_owner, self.owners = ttl, per_owner, owners
        self._answers: OrderedDict[str, _Answers] = OrderedDict()

    async def get(self, name: Hashable, lookup: Callable[[], Awaitable[T]]) -> T:
        """The owner's answer for `name`: kept, under way, or `lookup()`'s."""
        owner = OWNER.get()
        mine = self._answers.get(owner)
        if mine is None:
            mine = self._answers[owner] = _Answers()
            if len(self._answers) > self.owners:
                self._answers.popitem(last=False)
        self._answers.move_to_end(owner)
        kept = mine.kept.get(name)
        if kept is not None and kept[0] > time.monotonic():
            mine.kept.move_to_end(name)
            answer: T = kept[1]
            return answer
        running = mine.running.get(name)
        if running is None:
            running = mine.running[name] = _Running(asyncio.ensure_future(bounded(lookup)))
            running.task.add_done_callback(lambda task: self._done(mine, name, task))
        running.waiting += 1
        try:
            answer = await asyncio.shield(running.task)  # one caller stops: not the others
        finally:
            running.waiting -= 1
            if running.waiting == 0 and not running.task.done():  # called off, gone at once:
                if mine.running.get(name) is running:  # a caller next joins a new one
                    del mine.running[name]
                running.task.cancel()
        return answer

    def _done(self, mine: _Answers, name: Hashable, task: asyncio.Future[Any]) -> None:
        running = mine.running.get(name)
        if running is not None and running.task is task:  # not a lookup made since
            del mine.running[name]
        if task.cancelled() or task.exception() is not None:  # retrieved: no one may wait
            return
        mine.kept[name] = (time.monotonic() + self.ttl, task.result())
        mine.kept.move_to_end(name)
        while len(mine.kept) > self.per_owner:
            mine.kept.popitem(last=False)
