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
from typing import TYPE_CHECKING, Protocol

from arq.constants import expires_extra_ms

from dispatcher.lua import Lua
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = ["push_events"]


class Queued(Protocol):
    """What numbering needs of an event's job (`dispatcher.jobs.EventJob`)."""

    @property
    def project_id(self) -> str: ...

    @property
    def job_id(self) -> str: ...


# KEYS: the queue, the platform's ordered flag, then per project (n of them) its ordered
# flag, sequence, pending and ready sets, then each job's key. ARGV: score ms, expiry ms, n, '1'
# for one job's answer alone, then per job its bytes, its id and its project's index
# (1..n). A job id already queued is left alone. Returns 1 (queued) or 0 (there already)
# per job: a list, or that one number.
_PUSH_EVENTS = Lua("""
local n = tonumber(ARGV[3])
local ordered = {}
for p = 1, n do
  ordered[p] = redis.call('EXISTS', KEYS[2], KEYS[4 * p - 1]) > 0
end
local first = 4 * n + 3
local queued, added = {}, {}
for i = first, #KEYS do
  local a = 5 + 3 * (i - first)
  if redis.call('SET', KEYS[i], ARGV[a], 'NX', 'PX', ARGV[2]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[a + 1])
    local p = tonumber(ARGV[a + 2])
    if ordered[p] then
      local seq = redis.call('INCR', KEYS[4 * p])
      redis.call('ZADD', KEYS[4 * p + 1], seq, ARGV[a + 1])
      added[p] = (added[p] or 0) + 1
    end
    queued[#queued + 1] = 1
  else
    queued[#queued + 1] = 0
  end
end
for p, count in pairs(added) do
  for k = 4 * p + 1, 4 * p + 2 do
    for _, id in ipairs(redis.call('ZRANGE', KEYS[k], 0, 2 * count - 1)) do
      if not redis.call('ZSCORE', KEYS[1], id) then redis.call('ZREM', KEYS[k], id) end
    end
  end
end
if ARGV[4] == '1' then return queued[1] end
return queued
""")


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
    each numbered when its project is ordered. Its answer: 1 or 0 per job, in a list, or
    (`alone`: one job) that number."""
    projects: dict[str, int] = {}
    for job in jobs:
        projects.setdefault(job.project_id, len(projects) + 1)
    job_keys = [keys.QUEUE, keys.lanes_ordered(PLATFORM_PROJECT)]
    for project in projects:
        job_keys += (
            keys.lanes_ordered(project),
            keys.lanes_seq(project),
            keys.lanes_pending(project),
            keys.lanes_ready(project),
        )
    args: list[str | bytes | int] = [now, expires_extra_ms, len(projects), "1" if alone else "0"]
    for job, data in zip(jobs, encoded, strict=True):
        job_keys.append(keys.arq_job(job.job_id))
        args += (data, job.job_id, projects[job.project_id])
    _PUSH_EVENTS.queue(pipe, job_keys, args)
