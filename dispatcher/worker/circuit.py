"""An attempt due while its project's circuit to the host is open (`health.CircuitBreaker`).

The first time, it is not an attempt: the delivery waits in the queue, due after its next
step of the schedule or once the circuit may be probed again, whichever is later, stretched
by up to `DISPATCHER_RETRY_JITTER` more (a backlog comes back spread out, not at the one
millisecond the circuit half-opens). Its progress mark says it waited: the attempts made
and `w` (`1w`: one made, the second's step waited under an open circuit).

Back with the circuit still open (another delivery probes it, or the probe failed), the
attempt is made without a request: a failed attempt, recorded as not sent with the
circuit open (`OPEN`), and the next attempt is due at once, its step waited already, where
the same goes on. So a delivery behind an open circuit goes down its schedule to its final
FAILED record in about the schedule plus a cool-down, claimed at most twice an attempt,
however many deliveries wait for the host; before, each went back due the moment the
circuit half-opened, one of them got through a cool-down, and the rest waited on for hours
(review: 24 deliveries put off 694 times for a schedule of 0.1 s).

A callback with limits admits the delivery first (`controls.py`): its put-off and its
unsent attempt each take a start of the rate. Asked before, the breaker would turn away a
delivery waiting its turn in the callback's line, and its place, held until it lapsed,
would hold the other projects back.

A worker of the version before reads a `w` mark as no number: its run fails, and the job is
claimed again later, by an upgraded worker once the fleet is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.backoff import next_delay
from dispatcher.lua import Key, Script

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["OPEN", "MarkWaited", "next_attempt", "wait_s"]

WAITED = b"w"  # a progress mark's end: the next attempt waited out its step (see above)
SKEW_S = 0.05  # a put-off comes back no earlier, by Redis's clock (when it is due), than this
OPEN = "not sent: its circuit to the host was open (the host's last attempts failed)"


def next_attempt(mark: bytes | None) -> tuple[int, bool]:
    """The number of the attempt a delivery's progress mark (not "done") makes next, and
    whether that attempt waited out its step under an open circuit."""
    if not mark:
        return 1, False
    waited = mark.endswith(WAITED)
    return int(mark[: -len(WAITED)] if waited else mark) + 1, waited


def wait_s(settings: Settings, number: int, remaining: float) -> float:
    """How long attempt `number` waits under an open circuit: its next step, or the
    `remaining` cool-down (and `SKEW_S`) when longer, plus up to the schedule's jitter."""
    step = next_delay(settings.retry_schedule, number) or 0.0  # (after the last: none)
    return max(step, remaining + SKEW_S) * random.uniform(1.0, 1.0 + settings.retry_jitter)


@dataclass
class MarkWaited(Script):
    """Marks attempt `made` + 1 as waited (`{made}w`), unless the mark moved on: a later
    attempt's count, or "done", stays (a worker paused past its lease writes this late)."""

    LUA = """
    local mark = redis.call('GET', progress)
    if not mark or mark == made then redis.call('SET', progress, made .. 'w', 'EX', ttl) end
    """
    progress: Key
    made: str
    ttl: int
