"""Fair shares of a worker's slots: no project and no host holds them all.

A worker has `DISPATCHER_WORKER_MAX_JOBS` slots, for jobs and for HTTP attempts in flight
(for attempts, no more than its connection pool, `DISPATCHER_MAX_CONNECTIONS`). When `n`
projects are busy in a worker, each may hold at most `slots // (n + 1)` of them (half while
it is alone), so one share is always free for a project that arrives; an attempt, besides,
only while its project holds less than half (rounded up) of the slots the others leave, so
projects that arrived in turn never hold more than the slots together (`_room`); hosts
get the share rule, and never more than `DISPATCHER_MAX_PER_HOST` attempts each. The
projects calling one host split its share, an eighth of it (at least one) kept free for
the next (`HOST_RESERVE`): with `n` busy on it, each may hold `(share - reserve) // n`, so
a project's slow endpoint on a host others call too (a shared SaaS host) cannot hold all
of its slots. Nothing here touches Redis, and nothing costs a round trip:

- claims: the claim script is told how many more jobs each busy project may take (and
  what a project not busy yet may take), and leaves the others' jobs in the queue, due,
  untouched (`claim_budgets`);
- attempts: an attempt over its project's or its host's share goes back to the queue
  without being an attempt (`admit` answers None), due again in about the time its host
  takes to answer, when that host is slow (`SLOW_S` or more); to a host that answers
  faster it waits for a slot in memory, up to `WAIT_S` (a big fan-out to one receiver:
  going back would cost Redis writes and a claim for each, waiting costs only time).

A job's project is the part of its id before the first `:` (`{project}:{event id}`, and
the progress ids after it); an attempt's is the project that emitted the event.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.worker.pace import FilterPace

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dispatcher.settings import Settings

__all__ = ["Shares", "Slot", "project_of"]

SLOW_S = 1.0  # a host that usually takes this long to answer is waited for in the queue
WAIT_S = 5.0  # an attempt to a faster host waits at most this long for a slot in memory
DEFER_MIN_S, DEFER_MAX_S = 0.5, 10.0
KEPT_HOSTS = 10_000  # hosts whose answer time is remembered
HOST_RESERVE = 8  # of a host's share, this part (at least 1) is left to projects not on it


def project_of(job_id: str) -> str | None:
    """The project a job id is scoped by, or None (an id of an older version)."""
    head, sep, _ = job_id.partition(":")
    return head if sep else None


@dataclass(slots=True)
class _Counts:
    """How many of the slots each key (a project, a host) holds now."""

    slots: int
    cap: int | None = None
    held: dict[str, int] = field(default_factory=dict)
    total: int = 0  # all keys' together

    def limit(self, key: str) -> int:
        busy = len(self.held) + (key not in self.held)
        share = max(1, self.slots // (busy + 1))
        return share if self.cap is None else min(share, self.cap)

    def room(self, key: str) -> int:
        return self.limit(key) - self.held.get(key, 0)

    def take(self, key: str) -> None:
        self.held[key] = self.held.get(key, 0) + 1
        self.total += 1

    def give(self, key: str) -> None:
        self.total -= 1
        left = self.held[key] - 1
        if left:
            self.held[key] = left
        else:
            del self.held[key]


class _Line(deque["tuple[int, asyncio.Future[Slot | None]]"]):
    """One project's attempts to one host waiting for a slot, oldest first, each with the
    place it took among all attempts waiting (the order they began to wait in)."""

    __slots__ = ()


class Slot:
    """An admitted attempt's hold on its project's and its host's shares."""

    __slots__ = ("_shares", "host", "project")

    def __init__(self, shares: Shares, project: str, host: str) -> None:
        self._shares, self.project, self.host = shares, project, host

    def release(self, seconds: float) -> None:
        """The attempt is over (it took `seconds`): its slot goes to whoever waits."""
        self._shares.release(self, seconds)


class Shares:
    """A worker's fair shares, in memory: jobs per project (for its claims), attempts per
    project and per host. With `fair` off only the per-host cap and the pool hold."""

    def __init__(
        self, slots: int, max_per_host: int, *, fair: bool = True, pool: int | None = None
    ) -> None:
        self.fair = fair
        # attempts in flight at most, whatever their project: the connection pool's size
        self.pool = (1 << 30) if pool is None else pool
        attempts = min(slots, self.pool)  # so no admitted attempt waits for a connection
        self.jobs = _Counts(slots)
        self.batch = max(1, min(50, slots // 8))  # the room a claim for a full project waits for
        self._full: set[str] = set()  # projects at their share when a claim fell short
        self._asked: tuple[int, dict[str, int]] = (-1, {})  # the last claim's budgets
        self.projects = _Counts(attempts)
        self.hosts = _Counts(attempts if fair else 1 << 30, max_per_host)
        self.on_host: dict[str, _Counts] = {}  # per host, the attempts of each project there
        # project -> host -> its attempts waiting for a slot there, oldest first
        self._waiting: dict[str, dict[str, _Line]] = {}
        # project -> its lines by their heads' order, (order, host); an entry whose line's
        # head has changed since is stale, and dropped when it comes up
        self._heads: dict[str, list[tuple[int, str]]] = {}
        self._order = itertools.count()  # the order attempts began to wait in
        self._answer_s: OrderedDict[str, float] = OrderedDict()  # per host, smoothed
        self.pace = FilterPace()  # costly filters' time on the loop, per project
        self._paced: set[str] = set()  # held back by their filters' pace at the last claim

    @classmethod
    def of(cls, settings: Settings) -> Shares:
        """A worker's: its jobs, its attempts within its connection pool (each region's)."""
        return cls(
            settings.worker_max_jobs,
            settings.max_per_host,
            fair=settings.fair_share,
            pool=settings.max_connections,
        )

    # ---- jobs ---------------------------------------------------------------------------

    def job_started(self, job_id: str) -> None:
        if (project := project_of(job_id)) is not None:
            self.jobs.take(project)

    def job_ended(self, job_id: str) -> bool:
        """Whether a project that was full at a short claim now has room again (its jobs
        left in the queue can be claimed: worth a claim now, not a poll later). Any job's
        end may give it room: another project's last one raises every share."""
        if (project := project_of(job_id)) is None:
            return False
        self.jobs.give(project)
        return bool(self._full) and self._freed()

    def claim_fell_short(self, claimed: Iterable[str] = ()) -> bool:
        """A claim took fewer jobs than it asked for (`claimed`: the ids it took): the
        projects it could not take more for (none left to them when it was asked, all it
        was allowed taken, or at their share now) may have left theirs in the queue (see
        `job_ended`). Whether one has room already (its jobs ended while the claim was
        out): claim again at once."""
        if not self.fair:
            return False
        (newcomer, budgets), self._asked = self._asked, (-1, {})  # read once
        taken = Counter(p for job_id in claimed if (p := project_of(job_id)) is not None)
        allowed = {p: budgets.get(p, newcomer) for p in {*budgets, *taken}}
        spent = {p for p, most in allowed.items() if 0 <= most <= taken[p]}  # -1: any number
        at_share = {p for p in self.jobs.held if self.jobs.room(p) <= 0}
        self._full |= (spent - self._paced) | at_share  # not held back by filters' pace
        return self._freed()

    def _freed(self) -> bool:
        """Whether a full project has room for a batch (for half its share, when that is
        smaller: many busy projects); then none is remembered any more."""
        jobs = self.jobs
        if any(jobs.room(p) >= min(self.batch, max(1, jobs.limit(p) // 2)) for p in self._full):
            self._full.clear()
            return True
        return False

    def claim_budgets(self) -> tuple[int, dict[str, int]]:
        """For the claim script: how many jobs a project not busy in this worker may take
        (-1: any number), and how many more each busy project may."""
        if not self.fair:
            return -1, {}
        newcomer = max(1, self.jobs.slots // (len(self.jobs.held) + 2))
        budgets = {p: max(0, self.jobs.room(p)) for p in self.jobs.held}
        paced = self.pace.budgets(self.jobs.held)  # costly filters: their share of the loop
        self._paced = {p for p, most in paced.items() if most < budgets.get(p, newcomer)}
        for project in self._paced:
            budgets[project] = paced[project]
        self._asked = (newcomer, budgets)
        return newcomer, budgets

    def filtered(self, project: str, seconds: float) -> None:
        """Filters run on `project`'s event took `seconds` of the loop (`pace.py`; with
        fair shares off, nothing holds a project back, and this is not kept)."""
        if self.fair:
            self.pace.filtered(project, seconds)

    # ---- attempts -----------------------------------------------------------------------

    def _admits(self, project: str, host: str) -> bool:
        if self.hosts.room(host) <= 0 or self.projects.total >= self.pool:
            return False
        return not self.fair or (self._room(project) > 0 and self._on_room(project, host))

    def _room(self, project: str) -> int:
        """How many more attempts `project` may have in flight: up to its share, and up to
        half (rounded up) of the slots the other projects leave. Shares are reckoned as
        projects arrive, so the ones busy before hold more than a share while their attempts
        last; the half keeps them all within the slots, and what is free at least as big as
        any one project's hold, for the next (projects arriving one after another each took
        their share, 289 attempts on the 200 slots: the rest waited in the connection pool,
        on their total timeout, behind the others' slow receivers; review)."""
        counts = self.projects
        held = counts.held.get(project, 0)
        halved = (counts.slots - counts.total + held + 1) // 2
        return min(counts.limit(project), halved) - held

    def _on_room(self, project: str, host: str) -> bool:
        """Whether `project` may hold one more of `host`'s share: one when it holds none
        there yet, else up to `(share - reserve) // n` with `n` projects busy on it."""
        on = self.on_host.get(host)
        if on is None or (held := on.held.get(project, 0)) == 0:
            return True
        share = self.hosts.limit(host)
        kept = share - max(1, share // HOST_RESERVE)
        return held < max(1, kept // len(on.held))

    def _take(self, project: str, host: str) -> Slot:
        self.projects.take(project)
        self.hosts.take(host)
        self.on_host.setdefault(host, _Counts(0)).take(project)
        return Slot(self, project, host)

    async def admit(self, project: str, host: str, wait: float = WAIT_S) -> Slot | None:
        """A slot for an attempt of `project` to `host`: at once, or, when the host is not
        slow, within `wait` seconds; None when its share stays full (the attempt goes back
        to the queue). A wait is a future in the (project, host) queue that `release`
        answers with a slot, or a timer with None: no task, no timeout context."""
        if host not in self._waiting.get(project, ()) and self._admits(project, host):
            return self._take(project, host)
        if self._answer_s.get(host, 0.0) >= SLOW_S:  # a slow host: wait in the queue
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Slot | None] = loop.create_future()
        lines = self._waiting.setdefault(project, {})
        line = lines.get(host) or lines.setdefault(host, _Line())
        line.append((next(self._order), future))
        if len(line) == 1:  # a new head
            self._heads.setdefault(project, [])
            self._offer(project, host, line)
        timer = loop.call_later(wait, self._expire, project, host, future)
        try:
            return await future
        except BaseException:  # cancelled: a slot given meanwhile goes back
            if future.done() and not future.cancelled() and (slot := future.result()):
                self.release(slot, 0.0)
            self._forget(project, host, future)  # cancelled with it, still queued
            raise
        finally:
            timer.cancel()

    def _expire(self, project: str, host: str, future: asyncio.Future[Slot | None]) -> None:
        """A wait ran out: None, unless a slot came first."""
        if not future.done():
            future.set_result(None)
            self._forget(project, host, future)

    def _forget(self, project: str, host: str, future: asyncio.Future[Slot | None]) -> None:
        """`future` out of its line (`release` takes the admitted ones out itself)."""
        lines = self._waiting.get(project)
        if lines is None or (line := lines.get(host)) is None:
            return
        for index, entry in enumerate(line):
            if entry[1] is future:
                del line[index]
                if index == 0 and line:  # a new head
                    self._offer(project, host, line)
                break
        if not line:
            self._drop(project, host)

    def _offer(self, project: str, host: str, line: _Line) -> None:
        """`line`'s head onto its project's heap; the heap is rebuilt from the lines when
        stale entries outnumber them (a project at its share drops none as they come up)."""
        heads, lines = self._heads[project], self._waiting[project]
        heapq.heappush(heads, (line[0][0], host))
        if len(heads) > 2 * len(lines) + 16:
            heads[:] = [(waiting[0][0], name) for name, waiting in lines.items()]
            heapq.heapify(heads)

    def _drop(self, project: str, host: str) -> None:
        """An emptied line goes (its project's entries with it, when it was the last)."""
        lines = self._waiting[project]
        del lines[host]
        if not lines:
            del self._waiting[project], self._heads[project]

    def release(self, slot: Slot, seconds: float) -> None:
        """`slot`'s attempt is over: its shares go to the attempts waiting that fit now."""
        self.projects.give(slot.project)
        self.hosts.give(slot.host)
        on = self.on_host[slot.host]
        on.give(slot.project)
        if not on.held:
            del self.on_host[slot.host]
        if seconds:
            self._remember(slot.host, seconds)
        self._wake()

    def _wake(self) -> None:
        """Admit the waiting attempts that fit now, the one that began to wait first first,
        across projects and hosts: a heap of the projects with room, each by its oldest
        head, over each project's heap of its lines (one project's attempts to one host).
        A project at its share is passed over in one look and is looked at no more once its
        room runs out, and a line whose host is full is set aside until the next release:
        a release costs the attempts it admits and the full hosts it meets, however many
        hosts a project waits for (each release, of any project, looked at every line: the
        reviews)."""
        if self.projects.total >= self.pool:
            return
        ready: list[tuple[int, str]] = []
        for project in self._waiting:
            self._ready(ready, project)
        aside: list[tuple[str, tuple[int, str]]] = []
        while ready and self.projects.total < self.pool:
            _, project = heapq.heappop(ready)
            order, host = heapq.heappop(self._heads[project])
            if self._admits(project, host):
                line = self._waiting[project][host]
                _, future = line.popleft()
                if not future.done():
                    future.set_result(self._take(project, host))
                if line:
                    self._offer(project, host, line)
                else:
                    self._drop(project, host)
            else:  # its host is full (or its project, now): it waits for the next release
                aside.append((project, (order, host)))
            if project in self._waiting:
                self._ready(ready, project)
        for project, entry in aside:
            if project in self._heads:
                heapq.heappush(self._heads[project], entry)

    def _ready(self, ready: list[tuple[int, str]], project: str) -> None:
        """`project` onto `ready` by its oldest head, unless it is at its share (its stale
        entries go on the way)."""
        if self.fair and self._room(project) <= 0:
            return
        heads, lines = self._heads[project], self._waiting[project]
        while heads:
            order, host = heads[0]
            line = lines.get(host)
            if line and line[0][0] == order:
                heapq.heappush(ready, (order, project))
                return
            heapq.heappop(heads)

    # ---- deferral -----------------------------------------------------------------------

    def _remember(self, host: str, seconds: float) -> None:
        before = self._answer_s.pop(host, seconds)
        self._answer_s[host] = 0.8 * before + 0.2 * seconds
        if len(self._answer_s) > KEPT_HOSTS:
            self._answer_s.popitem(last=False)

    def defer_s(self, host: str) -> float:
        """When an attempt that found no slot is due again: about when the host's slots
        free up (its usual answer time), jittered so that the deferred do not return at
        once."""
        usual = min(DEFER_MAX_S, max(DEFER_MIN_S, self._answer_s.get(host, DEFER_MIN_S)))
        return usual * random.uniform(1.0, 1.5)
