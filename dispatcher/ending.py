"""What an attempt's record carries besides the record: the delivery's progress mark, and
the job's end when the delivery ends with that attempt and nothing else follows it.

An attempt's write is one script of the history store (see `dispatcher.history`): the
record, then the job's end (`END_JOB`, the same Lua as the worker's own end of a job), so
the two land together or not at all. A delivery whose job ends there needs no progress
mark: nothing runs it again. The mark is written when the job goes on (the next attempt
reads its number, a fan-out's re-run skips the deliveries it marks), and when the job's
lease is not this run's now: another worker holds it, or it lapsed and no one took it yet
(whoever claims the job then finds the delivery done, and ends the job without another
attempt).

A run ends only the job it holds: a job id names a new job once the one a run claimed has
ended (a fan-out's is `{project}:{event id}`, and an event id may be emitted again), and a
run paused past its lease, or a write sent again after its answer was lost, would end that
new one, still queued or between chunks and so under no lease (review: an accepted event
lost, with no record or drop). `tests/service/test_job_ends.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.lua import IN_SLICES

__all__ = ["ENDS", "END_JOB", "END_JOBS", "NO_ENDING", "NO_JOB", "SET_MARK", "Ending", "JobEnd"]

# A Lua function over the names a script declares for a `JobEnd` (keys queue, lease, job,
# claims; arguments token, job_id): the job leaves the queue with its keys when its lease is
# this run's (`token`). Returns 1 when it ended, 0 when left: to another worker that holds
# it, or to the next claim when the lease lapsed (its run paused past it; or the job this
# run claimed ended and the id names another, queued anew). The keys go, and the ids leave
# their queues, once every call of the script has run (`END_JOBS`, the script's `AFTER`,
# with `ENDS` its `BEFORE`): one `DEL` and one `ZREM` for a batch's ends, where each cost
# two commands. So nothing after an end in the same script may read that job's keys or its
# place in the queue (the scripts that end jobs write none of them after: records, lane
# entries); an end already made in it is one a later call does not make again. A call that
# fails after its end still ends its job, run alone or together (`lua.Script`).
ENDS = "local ends = {seen = {}, keys = {}, queues = {}, ids = {}}"
END_JOB = """
local function end_job()
  if ends.seen[lease] or redis.call('GET', lease) ~= token then return 0 end
  ends.seen[lease] = true
  local keys, n = ends.keys, #ends.keys
  keys[n + 1], keys[n + 2], keys[n + 3] = lease, job, claims
  local ids = ends.ids[queue]
  if not ids then
    ids = {}
    ends.ids[queue] = ids
    ends.queues[#ends.queues + 1] = queue
  end
  ids[#ids + 1] = job_id
  return 1
end
"""
END_JOBS = (
    IN_SLICES
    + """
for _, queue in ipairs(ends.queues) do in_slices({'ZREM', queue}, ends.ids[queue]) end
in_slices({'DEL'}, ends.keys)  -- after: a failed ZREM leaves no queued job without data
"""
)

# A Lua function over the names a script declares for an `Ending` (key progress;
# arguments mark, mark_ttl): the delivery's progress mark, never over "done". A mark is one
# emission's (`DeliveryJob.first`), so "done" is that delivery's end: an attempt's mark that
# comes after it is one made by a worker that took the job while another, paused past its
# lease, ended the delivery, and it must not reopen it.
SET_MARK = """
local function set_mark()
  if redis.call('SET', progress, mark, 'EX', mark_ttl, 'GET') == 'done' then
    redis.call('SET', progress, 'done', 'EX', mark_ttl)
  end
end
"""


@dataclass(frozen=True, slots=True)
class JobEnd:
    """A claimed job's end, as keys and arguments a script takes (see `END_JOB`)."""

    queue: str
    lease: str
    job: str
    claims: str
    token: str
    job_id: str


@dataclass(frozen=True, slots=True)
class Ending:
    """What follows a record in its script: the delivery's progress `mark` (attempts made,
    or "done") at `progress` for `ttl` seconds, and the job's end when the delivery ends
    there (`job`; the mark is then written only if the job's lease is not this run's)."""

    progress: str
    mark: str
    ttl: int
    job: JobEnd | None = None


# None, as a script's arguments: empty names (the scripts test `job_id` and `mark` for
# ''; a script given these puts a key of its own in the place of the empty keys).
NO_JOB = JobEnd("", "", "", "", "", "")
NO_ENDING = Ending("", "", 0)
