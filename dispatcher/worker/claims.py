"""Claims on queued jobs, on arq's own keys: claim a batch, renew leases, finish, retry.

A job stays in the queue's sorted set until it is finished; while a worker runs it, its
`arq:in-progress:{id}` key is a *lease* holding the worker's token, set for
`DISPATCHER_LEASE_SECONDS` and renewed while the job runs. A worker that dies stops
renewing, so its jobs are claimed again within a lease. Every step that ends a claim checks
the lease first: a worker that lost its lease (it was paused, or Redis was) leaves the job
to whoever holds it now. `arq:retry:{id}` counts the claims of a job, as arq does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.clock import now_ms
from dispatcher.ending import END_JOB, JobEnd
from dispatcher.jobs import encode
from dispatcher.keys import SEP
from dispatcher.lua import Key, Lua, Script, run_pipeline

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys

__all__ = ["Budgets", "Claimed", "Claims", "Finish"]

Budgets = tuple[int, dict[str, int]]  # jobs a new project may take (-1: any), each busy one's
RETRY_KEY_TTL_S = 88_400  # arq's
JOB_KEY_EXTRA_MS = 86_400_000  # a job's data outlives its due time by a day (arq's rule)

# KEYS: queue. ARGV: now ms, how many, lease ms, token, lease prefix, job prefix, claims
# prefix, claims ttl s, how many queue entries to look at in all, the project separator,
# how many jobs a project not named next may take (-1: any), then pairs of a project and
# how many more jobs it may take.
# Due jobs without a live lease are claimed, oldest first: lease set (NX: a live one is
# left alone), data read, claim counted (the first claim creates the count with its ttl,
# one command), all in one round trip. A job of a project that has taken its share is left in the
# queue, untouched. A due id whose data is gone comes back with `false` data (and leaves
# the queue), so the worker can record it.
_CLAIM = Lua("""
local want = tonumber(ARGV[2])
local budget = tonumber(ARGV[9])
local newcomer = tonumber(ARGV[11])
local left = {}
for i = 12, #ARGV, 2 do left[ARGV[i]] = tonumber(ARGV[i + 1]) end
local out = {}
local offset = 0
local page_size = math.max(want, 100)  -- fewer, longer pages past the jobs left alone
while #out < want and offset < budget do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                          'LIMIT', offset, page_size)
  if #page == 0 then break end
  local gone = 0
  for i = 1, #page, 2 do
    local id = page[i]
    local project = newcomer >= 0 and string.match(id, '^([^' .. ARGV[10] .. ']+)' .. ARGV[10])
    local share = project and (left[project] or newcomer)
    if share and share <= 0 then
      -- its project holds its share of this worker: left for later, or for another worker
    elseif redis.call('SET', ARGV[5] .. id, ARGV[4], 'PX', ARGV[3], 'NX') then
      if project then left[project] = share - 1 end
      local data = redis.call('GET', ARGV[6] .. id)
      local claims = 1
      if not data then
        redis.call('DEL', ARGV[5] .. id)
        redis.call('ZREM', KEYS[1], id)
        claims, gone = 0, gone + 1
      elseif not redis.call('SET', ARGV[7] .. id, 1, 'EX', ARGV[8], 'NX') then
        claims = redis.call('INCR', ARGV[7] .. id)  -- claimed before: its ttl runs on
      end
      out[#out + 1] = {id, data, claims, page[i + 1]}
      if #out >= want then break end
    end
  end
  offset = offset + #page / 2 - gone
end
return out
""")

# KEYS: the leases to renew. ARGV: lease ms, token. Returns how many were still ours.
_RENEW = Lua("""
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2] then
    redis.call('PEXPIRE', key, ARGV[1])
    n = n + 1
  end
end
return n
""")


@dataclass(frozen=True)
class Finish(Script):
    """Removes the job from the `queue` with its `lease`, data (`job`) and `claims` count,
    unless another worker holds its lease now. Returns 1 when done, 0 when left to that
    worker. (The record's script ends a job with the same Lua: `dispatcher.ending`.)"""

    LUA = END_JOB + "return end_job()"
    queue: Key
    lease: Key
    job: Key
    claims: Key
    token: str
    job_id: str


# KEYS: queue, lease, job, claims. ARGV: token, job id, SHA-1 of the job's bytes as this
# run read them, the job's next bytes, their ttl ms, now ms. A fan-out job's next chunk:
# the job (same id, so its event stays queued until its last chunk) gets the bytes of the
# next chunk and is due now, its claim count starting again. Unless another worker holds
# the lease, or the job is no longer what this run read (it ended, or this same write was
# sent twice). Returns 1 when done.
_HAND_OVER = Lua("""
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 0 end
local data = redis.call('GET', KEYS[3])
if not data or redis.sha1hex(data) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
redis.call('ZADD', KEYS[1], ARGV[6], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[4])
return 1
""")

# KEYS: queue, lease, job, claims. ARGV: token, job id, due ms, job data ttl ms, '1' for
# the next attempt (due then, the claim count starts again) or '0' after a failed run (due
# then unless already due later). Puts the job back in the queue unless another worker
# holds its lease or it has ended.
_AGAIN = Lua("""
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 0 end
local due = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not due then return 0 end
if ARGV[5] == '1' or tonumber(due) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[2])
if ARGV[5] == '1' then redis.call('DEL', KEYS[4]) end
return 1
""")


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now holds: its id, stored bytes (None: its data was gone), how
    many times it was claimed (1 on the first run), and when it was due (epoch ms)."""

    job_id: str
    data: bytes | None
    claims: int
    due_ms: int


class Claims:
    """The claim operations of one worker (its lease token) on one queue."""

    def __init__(self, redis: Redis, keys: Keys, token: str, lease_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = keys.QUEUE
        self.token = token
        self.lease_ms = int(lease_s * 1000)

    async def claim(
        self, count: int, *, budget: int = 2000, shares: Budgets = (-1, {})
    ) -> list[Claimed]:
        """Up to `count` due jobs, in one round trip, looking at `budget` queue entries at
        most (leased ones are skipped). `shares`: how many jobs a project not named may
        take (-1: any), and how many more each named one may (`Shares.claim_budgets`)."""
        newcomer, projects = shares
        args: list[str | int] = [
            now_ms(),
            count,
            self.lease_ms,
            self.token,
            self.keys.ARQ_IN_PROGRESS_PREFIX,
            self.keys.ARQ_JOB_PREFIX,
            self.keys.ARQ_RETRY_PREFIX,
            RETRY_KEY_TTL_S,
            budget,
            SEP,
            newcomer,
        ]
        for project, more in projects.items():
            args += (project, more)
        rows = await _CLAIM(self.redis, [self.queue_name], args)
        return [
            Claimed(job_id.decode(), data or None, int(claims), int(float(due)))
            for job_id, data, claims, due in rows
        ]

    async def renew(self, job_ids: list[str]) -> int:
        """Extend the leases of `job_ids` that are still ours; returns how many were."""
        if not job_ids:
            return 0
        leases = [self.keys.ARQ_IN_PROGRESS_PREFIX + job_id for job_id in job_ids]
        return int(await _RENEW(self.redis, leases, [self.lease_ms, self.token]))

    def _keys(self, job_id: str) -> tuple[str, str, str, str]:
        """A job's queue, lease, data and claim count keys."""
        return (
            self.queue_name,
            self.keys.ARQ_IN_PROGRESS_PREFIX + job_id,
            self.keys.ARQ_JOB_PREFIX + job_id,
            self.keys.ARQ_RETRY_PREFIX + job_id,
        )

    def job_end(self, job_id: str) -> JobEnd:
        """The end of a job, as a script carries it (`Finish`, or an attempt's record)."""
        queue, lease, job, claims = self._keys(job_id)
        return JobEnd(queue, lease, job, claims, self.token, job_id)

    def finish(self, pipe: Pipeline, job_id: str) -> None:
        """Queue the end of a job on `pipe`: it leaves the queue with its keys."""
        end = self.job_end(job_id)
        Finish(end.queue, end.lease, end.job, end.claims, end.token, job_id).queue_on(pipe)

    def hand_over(self, pipe: Pipeline, claimed: Claimed, following: EventJob) -> None:
        """Queue the move of a fan-out job to its next chunk (`following`, the same event
        after a cursor), due now; its answer is 0 when the job had moved on or ended."""
        now = now_ms()
        read = hashlib.sha1(claimed.data or b"", usedforsecurity=False).hexdigest()
        _HAND_OVER.queue(
            pipe,
            self._keys(claimed.job_id),
            [self.token, claimed.job_id, read, encode(following, now), JOB_KEY_EXTRA_MS, now],
        )

    def again(self, pipe: Pipeline, job_id: str, delay_s: float, *, next_attempt: bool) -> None:
        """Queue the job's return to the queue, due in `delay_s`. `next_attempt`: it ran as
        it should and its next attempt is due then (the claim count starts again); else the
        run failed (Redis, a timeout) and the same work is tried again."""
        delay_ms = int(delay_s * 1000)
        _AGAIN.queue(
            pipe,
            self._keys(job_id),
            [
                self.token,
                job_id,
                now_ms() + delay_ms,
                delay_ms + JOB_KEY_EXTRA_MS,
                "1" if next_attempt else "0",
            ],
        )

    async def release(self, job_ids: list[str]) -> None:
        """Give up the leases of `job_ids` now (shutdown), so another worker claims them at
        once instead of after the lease."""
        if not job_ids:
            return

        def release_all(pipe: Pipeline) -> None:
            for job_id in job_ids:
                self.again(pipe, job_id, 0, next_attempt=False)

        await run_pipeline(self.redis, release_all)
