"""What follows an attempt (a `Then`), as objects that also say when it is nothing but
their job's end: the attempt's record then carries that end in its own script
(`dispatcher.ending`), so the record and the end land together, with no progress mark
and no script of their own.

- `NextStep`: a `deliver` job's, its return to the queue for the next attempt, or its end.
- `ChunkEnd`: a fan-out job's, after a chunk: its end, or its move to the next chunk.
- `FirstRetry`: after a fan-out's first attempt: its retry as a `deliver` job of its own,
  and the chunk's end when that attempt was the chunk's only one.
- `LaneStep`: after an ordered delivery's attempt: its lane's release, or (a retry) the
  lane marked blocked (`dispatcher.worker.lanes`).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.clock import now_ms

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.ending import JobEnd
    from dispatcher.jobs import DeliveryJob, EventJob
    from dispatcher.lua import Script
    from dispatcher.queue import Queue
    from dispatcher.worker.claims import Claimed, Claims
    from dispatcher.worker.lanes import Lanes
    from dispatcher.worker.writer import Then

__all__ = ["ChunkEnd", "FirstRetry", "LaneStep", "NextStep", "Step"]


class Step:
    """A `Then` (`step(pipe, delay)` queues what follows an attempt; `delay`: seconds to
    the next attempt, None when the delivery is over) that can hand over its job's end."""

    __slots__ = ()

    def __call__(self, pipe: Pipeline, delay: float | None) -> None:
        raise NotImplementedError

    def job_end(self, delay: float | None) -> JobEnd | None:
        """The job's end, when that is all this step does after `delay` (besides what
        its `joint` gave, which the caller asks first): the caller then has the record's
        script end the job instead of calling the step. None: call it."""
        return None

    def joint(self, delay: float | None) -> Script | None:
        """All this step does after `delay`, as a script that runs together with its kind
        (`TOGETHER`), after the record's in the writer's joint calls: the caller then sends
        it instead of calling the step. None: call it. Asked once, and only of a delivery
        that ends with its record in a joint call."""
        return None


@dataclass(frozen=True, slots=True)
class NextStep(Step):
    """After a `deliver` job's attempt: back in the queue for the next one, or done.
    `kept`: what follows the job's return in the same write (a kept body's time to live
    raised with the job's: `dispatcher.bodies`)."""

    claims: Claims
    job_id: str
    kept: Callable[[Pipeline], None] | None = None

    def __call__(self, pipe: Pipeline, delay: float | None) -> None:
        if delay is None:
            self.claims.finish(pipe, self.job_id)
        else:
            self.claims.again(pipe, self.job_id, delay, next_attempt=True)
            if self.kept is not None:
                self.kept(pipe)

    def job_end(self, delay: float | None) -> JobEnd | None:
        return self.claims.job_end(self.job_id) if delay is None else None


class ChunkEnd:
    """A fan-out job's end after a chunk, given where the next chunk starts (`after`;
    None: it was the last), or its move to that chunk: one write, so a crash re-runs at
    most the chunk in hand. `written`: a write carries it (else the job loop writes it)."""

    __slots__ = ("claimed", "claims", "event", "written")

    def __init__(self, claims: Claims, claimed: Claimed, event: EventJob) -> None:
        self.claims, self.claimed, self.event = claims, claimed, event
        self.written = False

    @property
    def rerun(self) -> bool:
        """Whether this chunk's run is a re-run (the job was claimed before, or a chunk
        before it ran again): it reads what was recorded, and so does the next chunk."""
        return self.claimed.claims > 1 or self.event.rerun

    def __call__(self, pipe: Pipeline, after: int | None) -> None:
        self.written = True
        if after is None:
            self.claims.finish(pipe, self.claimed.job_id)
        else:
            following = self.event.continued(after, rerun=self.rerun)
            self.claims.hand_over(pipe, self.claimed, following)

    def job_end(self, after: int | None) -> JobEnd | None:
        """The job's end (taken by a write) when this was the last chunk."""
        if after is not None:
            return None
        self.written = True
        return self.claims.job_end(self.claimed.job_id)


_PROCESS, _STEPS = uuid.uuid4().hex[:16], itertools.count()  # the tokens of FirstRetry


@dataclass(frozen=True, slots=True)
class FirstRetry(Step):
    """After a fan-out's first attempt of `job`: a retry becomes a `deliver` job of its
    own; `end`, the chunk's end (`after`: where the next chunk starts), when it goes in
    the same write."""

    queue: Queue
    job: DeliveryJob
    end: ChunkEnd | None = None
    after: int | None = None
    # The push's token, one per step (one run's first attempt of the delivery): the write
    # sent again (its answer lost) after that job ran and ended queues it no more.
    once: str = field(default_factory=lambda: f"{_PROCESS}.{next(_STEPS)}")

    def __call__(self, pipe: Pipeline, delay: float | None) -> None:
        if delay is not None:
            self.queue.push(pipe, self.job, defer_s=delay, once=self.once)
        if self.end is not None:
            self.end(pipe, self.after)

    def job_end(self, delay: float | None) -> JobEnd | None:
        if delay is not None or self.end is None:
            return None
        return self.end.job_end(self.after)


@dataclass(frozen=True, slots=True)
class LaneStep(Step):
    """What follows an ordered delivery's attempt (see `Lanes.releasing`)."""

    lanes: Lanes
    job: DeliveryJob
    then: Then
    then_at_end: bool
    under: str | None = None  # the job whose lease the attempt runs under (its task's)

    def __call__(self, pipe: Pipeline, delay: float | None) -> None:
        if delay is None:
            # (the release checks the leases against the adopting worker's token)
            end = self._end()
            self.lanes.release_script(self.job, take=True, end=end, under=self.under).queue_on(pipe)
            if self.then_at_end and end is None:
                self.then(pipe, None)
        else:
            lane = self.lanes.lane(self.job)
            pipe.zadd(self.lanes.keys.LANES_BLOCKED, {lane: now_ms()}, nx=True)
            self.then(pipe, delay)

    def joint(self, delay: float | None) -> Script | None:
        """The lane's release, when the delivery ended and that is all that follows."""
        if delay is not None:
            return None
        end = self._end()
        if self.then_at_end and end is None:
            return None
        return self.lanes.release_script(self.job, take=True, end=end, under=self.under)

    def _end(self) -> JobEnd | None:
        """The job `then` would end, when that is all it does (the release ends it)."""
        then = self.then
        if self.then_at_end and isinstance(then, Step) and self.lanes.adopt is not None:
            return then.job_end(None)
        return None
