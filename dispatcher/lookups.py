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
callers, and the first caller's owner would hold the others): each new connection looks
its host up, as its owner.
"""

from __future__ import annotations

import asyncio
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["LOOKUP_THREADS", "OWNER", "PER_OWNER", "bounded", "owned"]

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
