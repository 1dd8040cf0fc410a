"""The pace of costly filters: what they take of a worker's event loop, per project.

A callback's filter runs on the event loop, synchronously, bounded per event (about 60 ms
at most: `registry.filters`), but not per second: a project emitting events its filters
walk whole took as much of the loop as its share of the worker's slots let it run at
once, and every other project's requests and timers waited behind it. So the time the
filters run on a project's events take is that project's (the event's project pays,
whoever owns the filters: another project's events never spend the platform's filters'
time), and while another project is busy in the worker, a project whose filters are
costly (`COSTLY_S` an event, smoothed) may start only as many jobs as its share of the
loop has room for: `FILTER_LOOP / (n + 1)` a second with `n` such projects, less what it
owes (what its filters took, paid back at that rate). None while it owes its share: its
jobs then wait in the queue, due, for another worker or for this one once it is paid
back, as those of a project at its share of slots do. Alone in the worker, nothing holds
a project back. `Shares.claim_budgets` puts these budgets in each claim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["COSTLY_S", "FILTER_LOOP", "FilterPace"]

FILTER_LOOP = 0.5  # of the loop, what costly filters may take together (a quarter alone)
COSTLY_S = 0.001  # filters that take less an event (smoothed) never hold a project back
MOST_S = 0.1  # an event's charge at most (a collection of garbage meanwhile is not its)
IDLE_S = 60.0  # a project whose filters owe nothing and ran this long ago is forgotten


@dataclass(slots=True)
class _Owed:
    """What the filters run on one project's events owe the loop (seconds, as of `at`),
    and what they take an event (smoothed)."""

    owed: float
    at: float
    cost: float


class FilterPace:
    """One worker's ledger of the loop time filters take per project."""

    def __init__(self) -> None:
        self._owed: dict[str, _Owed] = {}

    def share(self) -> float:
        """What one project's costly filters may take of the loop a second now."""
        return FILTER_LOOP / (len(self._owed) + 1)

    def filtered(self, project: str, seconds: float) -> None:
        """The filters run on one of `project`'s events took `seconds` of the loop."""
        seconds = min(seconds, MOST_S)
        now, entry = time.monotonic(), self._owed.get(project)
        if entry is None:
            if seconds < COSTLY_S:  # cheap: nothing to remember
                return
            entry = self._owed[project] = _Owed(0.0, now, seconds)
        entry.owed = max(0.0, entry.owed - (now - entry.at) * self.share()) + seconds
        entry.at, entry.cost = now, 0.8 * entry.cost + 0.2 * seconds

    def budgets(self, busy: Collection[str]) -> dict[str, int]:
        """How many jobs each project with costly filters may start now, while a project
        other than it is `busy` here (holds jobs); those paid back and idle, or grown
        cheap, are forgotten on the way."""
        now, share, out = time.monotonic(), self.share(), {}
        for project, entry in list(self._owed.items()):
            owed = max(0.0, entry.owed - (now - entry.at) * share)
            if not owed and (entry.cost < COSTLY_S or now - entry.at > IDLE_S):
                del self._owed[project]
            elif entry.cost >= COSTLY_S and any(p != project for p in busy):
                out[project] = max(0, int((share - owed) / entry.cost))
        return out
