"""How late the fleet serves each project, as one worker sees it: for every emitting project
whose fan-out it claimed lately, how long its latest one had waited in the queue.

The age of the oldest due job (`dispatcher_queue_oldest_job_age_seconds`) cannot tell a
fleet that is late for everyone from one project waiting behind its own backlog: fair
share (`shares.py`) leaves a flooding project's jobs due, on purpose, while every other
project is served at once, and the oldest due job is then the flooder's. Each worker keeps
in memory, per emitting project, how long its latest claimed fan-out job had waited (its
claim's time less the job's enqueue time, `et` in its bytes: no Redis command), and
exports how many projects it saw in the last `FORGET_S` and how many of them waited over
60 s and 600 s (`dispatcher_worker_projects_seen`, `dispatcher_worker_projects_late`,
read at scrape). The critical alert sums them over the workers: the fleet is late when
most projects are (deploy/prometheus/alerts.yml).

Only a job's first claim counts: a re-run's job was due again after a backoff, or when a
dead worker's lease lapsed, and its enqueue time says nothing of the fleet's lateness. A
fan-out's next chunk is queued anew (its enqueue time the hand-over's), so each chunk
counts for its own wait. At most `MOST` projects are kept, the least recently seen
forgotten first; the gauges' numbers are labels-free (no project named).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from dispatcher import metrics
from dispatcher.clock import now_ms

__all__ = ["LATENESS", "OVER_S", "Lateness", "claimed"]

MOST = 10_000  # projects kept (each a dict entry: ~200 bytes)
FORGET_S = 300.0  # a project whose fan-out no claim took for this long is no longer seen
OVER_S = (60, 600)  # the thresholds counted, as the alerts read them


class Lateness:
    """Per emitting project, when this worker last claimed a fan-out of it (monotonic) and
    how many of `OVER_S` that fan-out's wait was over. Noted by the event loop, read by the
    metrics server's thread at scrape: a lock guards the map (uncontended, per fan-out)."""

    def __init__(
        self,
        most: int = MOST,
        forget_s: float = FORGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.most, self.forget_s, self.clock = most, forget_s, clock
        self._latest: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._over = [0] * len(OVER_S)  # projects whose latest waited over each threshold
        self._lock = threading.Lock()

    def note(self, project: str, waited_ms: int) -> None:
        """`project`'s fan-out, claimed now, had waited `waited_ms`."""
        over = sum(waited_ms > limit * 1000 for limit in OVER_S)
        now = self.clock()
        with self._lock:
            before = self._latest.pop(project, None)
            if before is not None:
                self._count(before[1], -1)
            self._latest[project] = (now, over)  # the most recently seen last
            self._count(over, 1)
            self._forget(now)

    def seen(self) -> int:
        """Projects whose fan-out was claimed within `forget_s`."""
        with self._lock:
            self._forget(self.clock())
            return len(self._latest)

    def late(self, over_s: int) -> int:
        """Of those, the projects whose latest fan-out waited over `over_s` (of `OVER_S`)."""
        with self._lock:
            self._forget(self.clock())
            return self._over[OVER_S.index(over_s)]

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()
            self._over = [0] * len(OVER_S)

    def _count(self, over: int, step: int) -> None:
        for band in range(over):
            self._over[band] += step

    def _forget(self, now: float) -> None:
        """Forget the least recently seen: past `forget_s`, or past `most` projects."""
        latest = self._latest
        while latest:
            project, (seen_at, over) = next(iter(latest.items()))
            if now - seen_at < self.forget_s and len(latest) <= self.most:
                return
            del latest[project]
            self._count(over, -1)


LATENESS = Lateness()  # the process's: its gauges are the process's (one worker's)
metrics.WORKER_PROJECTS_SEEN.set_function(LATENESS.seen)
for _over in OVER_S:
    metrics.WORKER_PROJECTS_LATE.labels(over=str(_over)).set_function(partial(LATENESS.late, _over))


def claimed(project: str, enqueued_ms: int, claims: int) -> None:
    """A fan-out of `project` queued at `enqueued_ms` (its job's `et`; 0: unknown) and
    claimed now, the `claims`-th time: noted on its first claim."""
    if claims == 1 and enqueued_ms > 0:
        LATENESS.note(project, max(0, now_ms() - enqueued_ms))
