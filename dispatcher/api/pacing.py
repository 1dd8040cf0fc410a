"""What one project's HTTP emits may queue, per API process: a token bucket of bytes per
project (`EmitPace`), refilled at `DISPATCHER_EMIT_PROJECT_RATE` bytes a second up to
`DISPATCHER_EMIT_PROJECT_BURST`; each emit request costs its body's bytes, 1 KiB an event
at least (a flood of tiny events costs Redis more than their bytes), and each single
redelivery what it may queue (`DISPATCHER_MAX_REQUEST_BODY`), each job a window's
redelivery queues its body's bytes (`WindowPace`, `dispatcher.redelivery`). Past it the request is a
429 with `Retry-After`, and nothing of it is queued: one project cannot fill the Redis every
project shares faster than that times the API processes, whatever its events' size, while
others emit as usual. Python producers and `dispatcher emit` (the platform's own code and
its operators, with Redis's address) are not paced."""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from dispatcher.api.deps import ProjectPath
from dispatcher.errors import (
    CallbackGone,
    DispatcherError,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unplaced,
)
from dispatcher.models import check_project_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dispatcher.models import RedeliveryResult
    from dispatcher.settings import Settings

__all__ = [
    "SMALLEST_COST",
    "EmitPace",
    "Paced",
    "PacedRedelivery",
    "PacedWindow",
    "Paid",
    "WindowPace",
    "pace_events",
    "refunded",
]

SMALLEST_COST = 1024  # bytes an emit request costs at least


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class EmitPace:
    """Per project, the bytes its emits may still queue now; the `most` projects seen last
    are kept (one forgotten starts again with a full bucket)."""

    def __init__(
        self, rate: float, burst: float, most: int = 10_000, redelivery_cost: int = SMALLEST_COST
    ) -> None:
        self.rate, self.burst, self.most = rate, burst, most
        self.redelivery_cost = redelivery_cost  # what one redelivery may queue
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def of(cls, settings: Settings) -> EmitPace | None:
        """The pace `settings` ask for; None when it is off (a rate of 0)."""
        rate, cost = settings.emit_project_rate, max(settings.max_request_body, SMALLEST_COST)
        return cls(rate, settings.emit_project_burst, redelivery_cost=cost) if rate else None

    def give_back(self, project_id: str, cost: int) -> None:
        """Return `cost` bytes spent by a request refused after all."""
        if (bucket := self._buckets.get(project_id)) is not None:
            bucket.tokens = min(self.burst, bucket.tokens + cost)

    def take(self, project_id: str, cost: int, now: float | None = None) -> float:
        """Spend `cost` bytes of the project's bucket: 0 when taken, else the seconds until
        it holds them (nothing spent)."""
        bucket = self._filled(project_id, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def owe(self, project_id: str, cost: int, now: float | None = None) -> float:
        """Spend `cost` bytes of the project's bucket whether it holds them or not: below
        empty, its next request waits until they are paid back, a burst's worth at most
        (one walk of 200,000 failures owed 195 MiB: 24 s of the project's emits refused at
        the default rate; review). Returns the seconds it adds to that wait."""
        bucket = self._filled(project_id, now)
        before, bucket.tokens = bucket.tokens, max(-self.burst, bucket.tokens - cost)
        return (before - bucket.tokens) / self.rate

    def _filled(self, project_id: str, now: float | None) -> _Bucket:
        """The project's bucket, refilled to `now` (the most recently used)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(project_id, None) or _Bucket(self.burst, now)
        self._buckets[project_id] = bucket
        if len(self._buckets) > self.most:
            self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        return bucket


def _pace(request: Request) -> EmitPace | None:
    return getattr(request.app.state, "emit_pace", None)


def _refused(pace: EmitPace, project_id: str, wait: float) -> TooManyRequests:
    return TooManyRequests(
        f"project {project_id} emits faster than its share: "
        f"{pace.rate:,.0f} bytes a second (DISPATCHER_EMIT_PROJECT_RATE, in bursts of "
        f"{pace.burst:,.0f}); nothing of this request was queued, send it again in "
        f"{math.ceil(wait)} s",
        retry_after=wait,
    )


async def _paced(request: Request, project_id: ProjectPath) -> None:
    """Spend the request's bytes from its project's bucket, or refuse it (429); a project
    id that cannot emit is its 400 first."""
    pace = _pace(request)
    if pace is None:
        return
    check_project_id(project_id)
    cost = max(len(await request.body()), SMALLEST_COST)
    if wait := pace.take(project_id, cost):
        raise _refused(pace, project_id, wait)
    request.state.emit_spent = cost


def pace_events(request: Request, project_id: str, events: int) -> None:
    """Once a batch is counted: spend what its `events` cost past its bytes (1 KiB each at
    least: 1,000 tiny events in 32 KB of body make 1,000 jobs, ~0.5 MB of Redis), or refuse
    it, the bytes it spent given back (a 429 spends nothing)."""
    pace = _pace(request)
    if pace is None:
        return
    spent = getattr(request.state, "emit_spent", 0)
    more = events * SMALLEST_COST - spent
    if more > 0 and (wait := pace.take(project_id, more)):
        pace.give_back(project_id, spent)
        raise _refused(pace, project_id, wait)


@dataclass(slots=True)
class Paid:
    """What a single redelivery paid of its project's bucket (`refunded`)."""

    pace: EmitPace
    project_id: str


# what refuses a redelivery before it queues anything: its cost is given back (Unplaced:
# its project moves; the 503 says to try again in a minute, and each try cost a body: review)
REFUNDED: tuple[type[DispatcherError], ...] = (NotFound, CallbackGone, InvalidInput, Unplaced)


async def _paced_redelivery(request: Request, project_id: ProjectPath) -> Paid | None:
    """Spend what one redelivery may queue (its recorded body, at most
    `DISPATCHER_MAX_REQUEST_BODY`) from its project's bucket, or refuse it (429): a
    redelivery queues a new job each time, so one recorded request sent again in a loop
    filled Redis at 36 MiB/s past the emit routes' share (review)."""
    pace = _pace(request)
    if pace is not None and (wait := pace.take(project_id, pace.redelivery_cost)):
        raise _refused(pace, project_id, wait)
    return None if pace is None else Paid(pace, project_id)


@contextlib.contextmanager
def refunded(paid: Paid | None) -> Iterator[None]:
    """A redelivery refused before it queued anything (`REFUNDED`: an unknown record, a
    deleted or disabled callback, its project moving) gives back what it paid; any other
    error keeps it (an outage after the push may have queued it: review). The route's own
    call, not a dependency's exit: the console turns errors into pages before that
    (review)."""
    try:
        yield
    except REFUNDED:
        if paid is not None:
            paid.pace.give_back(paid.project_id, paid.pace.redelivery_cost)
        raise


@dataclass(slots=True)
class WindowPace:
    """A window's redelivery paid from its project's bucket (`redelivery.Pace`): each job
    its body's bytes, 1 KiB at least."""

    pace: EmitPace
    project_id: str

    def take(self, size: int) -> float:
        return self.pace.take(self.project_id, max(size, SMALLEST_COST))

    def give_back(self, size: int) -> None:
        self.pace.give_back(self.project_id, max(size, SMALLEST_COST))

    def owe(self, size: int) -> float:
        return self.pace.owe(self.project_id, size)

    def refused(self, done: RedeliveryResult, wait: float) -> TooManyRequests:
        pace, there = self.pace, f" ({done.already_queued} were queued already)"
        return TooManyRequests(
            f"project {self.project_id} redelivers faster than its share: "
            f"{pace.rate:,.0f} bytes a second (DISPATCHER_EMIT_PROJECT_RATE, in bursts of "
            f"{pace.burst:,.0f}); {done.queued} redeliveries of the window were queued"
            f"{there if done.already_queued else ''} before it stopped; call again in "
            f"{math.ceil(wait)} s to go on (a delivery is queued once: what is queued "
            "is not queued, nor paid for, again)",
            retry_after=wait,
        )


def _window_pace(request: Request, project_id: ProjectPath) -> WindowPace | None:
    pace = _pace(request)
    return None if pace is None else WindowPace(pace, project_id)


Paced = Annotated[None, Depends(_paced)]
PacedWindow = Annotated[WindowPace | None, Depends(_window_pace)]
PacedRedelivery = Annotated[Paid | None, Depends(_paced_redelivery)]
