"""Events queued in order: the sequence number an event of an ordered project gets.

A project with an ordered callback (`orderBy`, on the project, one of its pipelines or the
platform: `keys.lanes_ordered`) numbers its events in the order Redis accepts them: the
script that queues an event's job also takes the project's next number and files the job
under it in the project's *pending* set, the events whose fan-out may still add a delivery
to a lane (`dispatcher.worker.lanes` reads it). One `emit_many` (or batch request) is one
script call per shard, so its events keep their order. Projects without an ordered
callback pay one `EXISTS` inside the script, nothing more.

The pending set (and the ready set, of events whose fan-out has put every delivery in its
lane, see `dispatcher.worker.lanes`) is trimmed here: each call looks at the lowest
entries (two per event it queues) and drops those whose job has left the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from arq.constants import expires_extra_ms

from dispatcher.jobs import DIGEST_LEAD
from dispatcher.lua import ArgList, Key, KeyList, Script
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = ["REUSED", "push_events"]

# A job's answer when its id names another event still queued (not queued); 1: queued, 0:
# the same event is queued (or a job of a version before, which has no digest to compare)
REUSED = 2


class Queued(Protocol):
    """What numbering needs of an event's job (`dispatcher.jobs.EventJob`)."""

    @property
    def project_id(self) -> str: ...

    @property
    def job_id(self) -> str: ...

    @property
    def digest(self) -> str: ...


@dataclass
class PushEvents(Script):
    """Queues event jobs, due at `score_ms`, their data kept `expiry_ms` past it; each one
    of a project that is ordered (its flag or the platform's set) is numbered and filed in
    its project's pending set. `keys` holds, for each of the `projects` projects, its
    ordered flag, sequence, pending and ready sets, then each job's key; `jobs` holds, per
    job, its bytes, its id, its project's place (1..`projects`) and its digest ('' for
    none). A job id already queued is left alone. Returns per job 1 (queued), 0 (there
    already: the same event, or one without a digest) or `REUSED` (there already: another
    event, whose digest, at the head of its bytes, differs): a list, or that one number
    when `alone` is '1'. Reading the digest costs a `GETRANGE` of its bytes' head, only
    for an id already queued."""

    LUA = (
        f"local lead = '{DIGEST_LEAD}'"
        + """
    local n = tonumber(projects)
    local ordered = {}
    for p = 1, n do ordered[p] = redis.call('EXISTS', platform_ordered, keys[4 * p - 3]) > 0 end
    local queued, added = {}, {}
    for i = 1, #jobs / 4 do
      local data, id, p, digest = jobs[4 * i - 3], jobs[4 * i - 2], tonumber(jobs[4 * i - 1]),
        jobs[4 * i]
      if redis.call('SET', keys[4 * n + i], data, 'NX', 'PX', expiry_ms) then
        redis.call('ZADD', queue, score_ms, id)
        if ordered[p] then
          local seq = redis.call('INCR', keys[4 * p - 2])
          redis.call('ZADD', keys[4 * p - 1], seq, id)
          added[p] = (added[p] or 0) + 1
        end
        queued[#queued + 1] = 1
      else
        local answer = 0
        if digest ~= '' then
          local head = redis.call('GETRANGE', keys[4 * n + i], 0, #lead + #digest - 1)
          if head ~= lead .. digest and string.sub(head, 1, #lead) == lead then
            answer = """
        + str(REUSED)
        + """
          end
        end
        queued[#queued + 1] = answer
      end
    end
    for p, count in pairs(added) do
      for k = 4 * p - 1, 4 * p do
        for _, id in ipairs(redis.call('ZRANGE', keys[k], 0, 2 * count - 1)) do
          if not redis.call('ZSCORE', queue, id) then redis.call('ZREM', keys[k], id) end
        end
      end
    end
    if alone == '1' then return queued[1] end
    return queued
    """
    )
    queue: Key
    platform_ordered: Key
    keys: KeyList
    score_ms: int
    expiry_ms: int
    projects: int
    alone: str
    jobs: ArgList


def push_events(
    pipe: Pipeline,
    keys: Keys,
    jobs: Sequence[Queued],
    encoded: Sequence[bytes],
    now: int,
    *,
    alone: bool = False,
) -> None:
    """Queue one command on `pipe` that enqueues `jobs` (their bytes `encoded`), due now,
    each numbered when its project is ordered. Its answer: 1, 0 or `REUSED` per job, in a
    list, or (`alone`: one job) that number."""
    projects: dict[str, int] = {}
    for job in jobs:
        projects.setdefault(job.project_id, len(projects) + 1)
    per_project = [
        key
        for project in projects
        for key in (
            keys.lanes_ordered(project),
            keys.lanes_seq(project),
            keys.lanes_pending(project),
            keys.lanes_ready(project),
        )
    ]
    PushEvents(
        queue=keys.QUEUE,
        platform_ordered=keys.lanes_ordered(PLATFORM_PROJECT),
        keys=[*per_project, *(keys.arq_job(job.job_id) for job in jobs)],
        score_ms=now,
        expiry_ms=expires_extra_ms,
        projects=len(projects),
        alone="1" if alone else "0",
        jobs=[
            item
            for job, data in zip(jobs, encoded, strict=True)
            for item in (data, job.job_id, projects[job.project_id], job.digest)
        ],
    ).queue_on(pipe)
