"""How long a worker with nothing to claim waits before it asks again.

A worker asks for due jobs every poll interval (`DISPATCHER_POLL_DELAY`, 20 ms by default,
for latency under load), and each ask is a claim script of three commands: an idle worker
sent ~135 commands a second, and a fleet of a thousand idle workers ~135,000 a second to
one Redis, for nothing. Once a worker's claims have found nothing for `QUIET_S` (10 s), it asks
every `IDLE_POLL_S` (or its poll interval, if longer) until a claim finds a job: ~5 claims
a second. The cost is latency once, at the end of a quiet spell: the first event waits up
to `IDLE_POLL_S` for one worker to ask (with N idle workers asking out of step, ~1/N of it).
A worker's own job due at once (the next chunk of a fan-out) still wakes it at once.
"""

from __future__ import annotations

import time

__all__ = ["IDLE_POLL_S", "QUIET_S", "Idling"]

QUIET_S = 10.0  # claims that found nothing for this long: the worker is idle (a lull in a
# busy stream is not: with 1 s, the first events after a bench's start waited, p99 137 ms)
IDLE_POLL_S = 0.2  # an idle worker's poll interval (when its own is shorter)


class Idling:
    """A worker's poll interval: its own while claims find jobs, `IDLE_POLL_S` once they
    have found none for `QUIET_S`."""

    def __init__(self, poll_delay: float) -> None:
        self.poll_delay = poll_delay
        self._since: float | None = None  # when claims began to find nothing

    def found(self, jobs: int) -> None:
        """A claim's answer: `jobs` claimed."""
        if jobs:
            self._since = None
        elif self._since is None:
            self._since = time.monotonic()

    def wait_s(self) -> float:
        """The wait before the next claim, when the last found nothing more to do."""
        if self._since is None or time.monotonic() - self._since < QUIET_S:
            return self.poll_delay
        return max(self.poll_delay, IDLE_POLL_S)
