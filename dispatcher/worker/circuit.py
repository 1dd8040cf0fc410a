"""An attempt due while its project's circuit to the host is open (`health.CircuitBreaker`).

It is not an attempt: the delivery waits in the queue (`put_off`), and each time it comes
back with the circuit still open it waits longer than the time before: its next step of
the schedule or what is left of the cool-down, whichever is longer, doubled for each
put-off before (at most the schedule's longest step, or that cool-down when longer),
stretched by up to `DISPATCHER_RETRY_JITTER` more. So a backlog comes back spread out, not
at the one millisecond the circuit half-opens, and each delivery is claimed a number of
times that grows with the log of its schedule, never with the backlog (review: 24
deliveries put off 694 times for a schedule of 0.1 s when every put-off came back when the
circuit half-opened). Whichever delivery comes back when the circuit may be probed is sent
(a success closes the circuit); should its attempt fail, the next is on its schedule.

A delivery is put off for at most what was left of its retry schedule (its steps after the
attempt due, added: `budget`), counted from its first put-off as the sum of the waits it
was given (each a lower bound of the time it waited: it cannot come back sooner). Back
after that, the circuit still open, it ends: one final FAILED record, not sent (`ENDED`),
which counts neither toward its callback's health nor toward disabling it (its host was
not tried for it: another callback's failures may hold the circuit open).

Its state is kept beside its progress mark (`waiting_key`: `{progress key}:w`, the same
time to live): the attempt it waits for, its put-offs and the seconds they add up to.
The mark itself stays the count of attempts made (a worker of the version before reads it
with `int()`, and knows nothing of the state); the delivery's claim reads both in the one
MGET that read the mark alone (`Engine.deliver`; a lane's release script returns both).
A state of another attempt than the one due (that attempt was sent since) counts as none.
A put-off's writes are one script (`PutOff`): the mark (0 or its count when it has none,
its time to live renewed, so no wait outlives it) and the state.

A callback with limits admits the delivery first (`controls.py`): each put-off takes a
start of the rate. Asked before, the breaker would turn away a delivery waiting its turn in
the callback's line, and its place, held until it lapsed, would hold the other projects
back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.backoff import next_delay
from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["ENDED", "PutOff", "budget", "put_off", "waiting_key"]

HELD = 10  # cool-downs a delivery waits past its budget while its own callback never failed
SKEW_S = 0.05  # a put-off comes back no earlier, by Redis's clock (when it is due), than this
ENDED = "not sent: the circuit to its host stayed open for the rest of its retry schedule"


def waiting_key(progress: str) -> str:
    """The key of a delivery's circuit state, beside its progress mark `progress`."""
    return progress + ":w"


def read(state: bytes | None, number: int) -> tuple[int, float]:
    """The put-offs of attempt `number` and the seconds they add up to, from its state (none:
    no state, one of another attempt, or one not understood)."""
    try:
        due, times, waited = (state or b"").split(b" ")
        return (int(times), float(waited)) if int(due) == number else (0, 0.0)
    except ValueError:
        return 0, 0.0


def budget(schedule: tuple[float, ...], number: int) -> float:
    """What is left of a retry schedule once attempt `number` is due: its steps after it."""
    return float(sum(schedule[number - 1 :]))


def put_off(
    settings: Settings, number: int, remaining: float, state: bytes | None, failed: bool
) -> tuple[float, str] | None:
    """How long attempt `number`, due while its circuit is open for `remaining` s more,
    waits, with its state after that; None when it has waited out its `budget` (it ends),
    its callback `failed` there while open, or `HELD` cool-downs more."""
    times, waited = read(state, number)
    schedule = settings.retry_schedule
    left = budget(schedule, number) + (0.0 if failed else HELD * settings.circuit_cooldown)
    if times and waited >= left:
        return None
    first = max(next_delay(schedule, number) or 0.0, remaining + SKEW_S)
    longest = min(max((first, *schedule)), settings.progress_ttl / 4)  # the mark outlives it
    wait = min(first * 2**times, longest) * random.uniform(1.0, 1.0 + settings.retry_jitter)
    return wait, f"{number} {times + 1} {waited + wait:.3f}"


@dataclass
class PutOff(Script):
    """A put-off's writes: the delivery's progress mark when it has none (`made`, the
    attempts made), its time to live renewed when it has one (a count or "done" stays), and
    its circuit state beside it, for `ttl` seconds."""

    LUA = """
    if not redis.call('SET', progress, made, 'NX', 'EX', ttl) then
      redis.call('EXPIRE', progress, ttl)
    end
    redis.call('SET', waiting, state, 'EX', ttl)
    """
    progress: Key
    waiting: Key
    made: str
    state: str
    ttl: int

    @classmethod
    def of(cls, progress: str, number: int, state: str, ttl: int) -> PutOff:
        """Attempt `number`'s put-off, its mark at `progress`, its `state` beside it."""
        return cls(progress, waiting_key(progress), str(number - 1), state, ttl)
