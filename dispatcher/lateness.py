"""How many emitting projects the fleet serves late, each counted once across the fleet.

The age of the oldest due job (`dispatcher_queue_oldest_job_age_seconds`) cannot tell a
fleet that is late for everyone from one project waiting behind its own backlog: fair
share (`worker/shares.py`) leaves a flooding project's jobs due, on purpose, while every
other project is served at once, and the oldest due job is then the flooder's.

Each worker notes the project of every fan-out job it claims, and whether that job had
waited over 60 s and over 600 s since it was queued (its claim's time, by Redis's clock as
the claim script answers it, less its enqueue time, `et` in its bytes: no Redis command on
the way of a delivery). With its heartbeat (every 5 s, on the home shard, in the same
round trip: `worker/duties.py`) it adds the projects noted since to three HyperLogLogs of
the 5-minute window of its latest claim noted (`PFADD` to `Keys.projects`: `seen`,
`late:60`, `late:600`; each expires two windows later), and forgets them. The API reads,
at scrape, the distinct projects of the window Redis's clock is in and of the one before
(`PFCOUNT` of both: the last 5 to 10 minutes) into `dispatcher_queue_projects_seen` and
`dispatcher_queue_projects_late{over}`; the critical alert compares them.

Redis's clock, not the hosts': a worker's clock ahead by a minute counted every project it
served late, and one 5 minutes off added to a window the API never read (review). A
producer's clock still matters (the enqueue time is its), as it does for when a job is due.

Each worker counted its own projects before, summed over the workers by the alert: every
worker with room claims a flooding project's fan-outs, so the flooder counted once per
worker and a quiet project once, on whichever worker took it. One late project of 7 on 10
workers read 10 late of 16 and paged (review). A HyperLogLog counts each project once
whoever added it (within about 1 %; exact for a few projects), and adding it again is
harmless (a heartbeat's write sent twice counts nothing twice).

A project counts late in a window when any of its fan-outs claimed then had waited over
the threshold. Only a job's first claim counts: a re-run's job was due again after a
backoff, or when a dead worker's lease lapsed, and its enqueue time says nothing of the
fleet's lateness. A fan-out's next chunk is queued anew (its enqueue time the hand-over's),
so each chunk counts for its own wait. A worker notes at most `MOST` projects between two
heartbeats (more are left out until the next one); a heartbeat that fails keeps them for
the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher import metrics
from dispatcher.clock import now_ms
from dispatcher.lua import REDIS_NOW_MS, Key, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = ["OVER_S", "WINDOW_S", "Noted", "add", "export", "read"]

MOST = 10_000  # projects a worker notes between two heartbeats (5 s)
WINDOW_S = 300  # a window of the fleet's counts; the API reads this one and the one before
OVER_S = (60, 600)  # the thresholds counted, as the alerts read them
SEEN = "seen"
KINDS = (SEEN, *(f"late:{over}" for over in OVER_S))


def window(at_ms: int) -> int:
    return at_ms // 1000 // WINDOW_S


class Noted:
    """The projects one worker claimed fan-outs of since its last heartbeat, by kind (seen,
    and late over each of `OVER_S`). Noted and taken on the worker's event loop."""

    def __init__(self, most: int = MOST) -> None:
        self.most = most
        self.projects: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self.at_ms = 0  # the latest claim noted, by Redis's clock: its window takes them

    def claimed(self, project: str, enqueued_ms: int, claims: int, at_ms: int) -> None:
        """A fan-out of `project` queued at `enqueued_ms` (its job's `et`; 0: unknown) and
        claimed at `at_ms` (Redis's clock; 0: unknown, this host's then), the `claims`-th
        time: noted on its first claim. The latest claim's time is the window's, not the
        greatest: after a failover to a master whose clock is behind, the greatest kept
        adding to a window ahead of the one the API reads (review)."""
        if claims == 1 and enqueued_ms > 0:
            self.at_ms = at_ms = at_ms or now_ms()
            self.note(project, max(0, at_ms - enqueued_ms))

    def note(self, project: str, waited_ms: int) -> None:
        """`project`'s fan-out, claimed now, had waited `waited_ms`."""
        seen = self.projects[SEEN]
        if project not in seen and len(seen) >= self.most:
            return
        seen.add(project)
        for over, kind in zip(OVER_S, KINDS[1:], strict=True):
            if waited_ms > over * 1000:
                self.projects[kind].add(project)

    def take(self) -> dict[str, set[str]]:
        """What was noted so far, forgotten here (`give_back` when its write fails)."""
        taken, self.projects = self.projects, {kind: set() for kind in KINDS}
        return taken

    def give_back(self, taken: dict[str, set[str]]) -> None:
        """What a failed heartbeat took, noted again as far as `most` allows, the latest
        first (each failed round added up to `most` more: review)."""
        passed = {p: sum(p in taken[kind] for kind in KINDS[1:]) for p in taken[SEEN]}
        for project in sorted(passed, key=passed.__getitem__, reverse=True):
            over = passed[project]  # the thresholds its wait passed, as `note` counts them
            self.note(project, OVER_S[over - 1] * 1000 + 1 if over else 0)


def add(pipe: Pipeline, keys: Keys, taken: dict[str, set[str]], at_ms: int) -> None:
    """Queue the adds of `taken` (`Noted.take`) to the fleet's counts of the window of
    `at_ms` (`Noted.at_ms`; 0: this host's clock now), on the home shard."""
    at = window(at_ms or now_ms())
    for kind, projects in taken.items():
        if projects:
            key = keys.projects(kind, at)
            pipe.pfadd(key, *projects)
            pipe.expire(key, 2 * WINDOW_S)


async def read(redis: Redis, keys: Keys, at_ms: int) -> dict[str, int]:
    """The fleet's distinct projects of each kind in the window of `at_ms` and the one
    before (one round trip; the keys of a shard share its slot on a cluster, where
    redis-py refuses `pipe.pfcount` whatever the keys: the command itself is sent)."""
    now = window(at_ms)
    async with redis.pipeline(transaction=False) as pipe:
        for kind in KINDS:
            pipe.execute_command("PFCOUNT", keys.projects(kind, now), keys.projects(kind, now - 1))
        counts = await pipe.execute()
    return {kind: int(count) for kind, count in zip(KINDS, counts, strict=True)}


@dataclass
class _Now(Script):
    """Redis's clock (ms), read on the server that holds `key`: a Redis Cluster sends a
    bare `TIME` to any node, not to the home shard's master (review)."""

    LUA = REDIS_NOW_MS + "return redis_now_ms()"
    key: Key


async def export(redis: Redis, keys: Keys) -> None:
    """Set the fleet's gauges (the API's, at scrape) from the home shard's counts of the
    window its clock is in and the one before (a round trip more: its clock)."""
    counts = await read(redis, keys, await _Now(keys.projects(SEEN, 0)).run(redis))
    metrics.QUEUE_PROJECTS_SEEN.set(counts[SEEN])
    for over in OVER_S:
        metrics.QUEUE_PROJECTS_LATE.labels(over=str(over)).set(counts[f"late:{over}"])
