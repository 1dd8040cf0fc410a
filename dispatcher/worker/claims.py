"""Claims on queued jobs, on arq's own keys: claim a batch, renew leases, finish, retry.

A job stays in the queue's sorted set until it is finished; while a worker runs it, its
`arq:in-progress:{id}` key is a *lease* holding the worker's token, set for
`DISPATCHER_LEASE_SECONDS` and renewed while the job runs, and its score in the queue is
the lease's end, renewed with it: a running job is out of the due range, so a claim reads
only jobs it may take, however many the fleet runs. A worker that dies stops renewing, so
its jobs are due, and claimed again, within a lease. Every step that ends a claim checks
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
from dispatcher.lua import REDIS_NOW_MS, ArgList, Key, Script, run_pipeline
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = ["Budgets", "Claimed", "Claims", "Finish"]

Budgets = tuple[int, dict[str, int]]  # jobs a new project may take (-1: any), each busy one's
RETRY_KEY_TTL_S = 88_400  # arq's
JOB_KEY_EXTRA_MS = 86_400_000  # a job's data outlives its due time by a day (arq's rule)
JUST_DUE_SLACK_MS = 1000  # a claim's look at what just came due starts this long before


def body_wait_ms(settings: Settings) -> int:
    """The longest a run may put its job off by, the job's time to live with it: its next
    attempt's delay (a Retry-After at most), a run's time, and a day (arq's)."""
    wait_s = max(settings.progress_ttl, settings.retry_after_cap)
    return int((wait_s + settings.effective_job_timeout) * 1000) + JOB_KEY_EXTRA_MS


@dataclass
class Claim(Script):
    """Up to `want` due jobs (due by Redis's clock, as the leases lapse by it) without a
    live lease, oldest first, in one round trip: each one's lease set for `token` (NX: a
    live one is left alone), its score moved to the lease's end (out of the due range
    while it runs), its data read, its claim counted (the first claim creates the count
    with its ttl, one command). The ids in `mine` (newline-separated) are passed over. A
    job of a project that has taken its share is left in the queue, untouched: `newcomer`
    jobs for a project not named (-1: any), `shares` pairs of a project and how many more
    it may take (a job's project is its id up to `sep`). The look stops (checked a page at
    a time) past `budget` entries passed over, or past `scout` once no project it looks
    for has room (one named with room, or one taken here with room left): past that only
    a project new to this worker could take a job. Stopped short of the due range's end
    with fewer than `want`, it looks last at what just came due, where a project's jobs
    come due behind any backlog: the newest page (oldest of it first) of the jobs due
    from `slack_ms` before `since_ms` (this worker's last claim, by Redis's clock; 0:
    none), since due times are the writers' clocks and reach Redis a little later. A due
    id whose data is gone comes back with `false` data (and leaves the queue), so the
    worker can record it. A claimed job comes with the registry version its event would
    be matched at (`registry.matches.Matches`): the versions of the `platform` project
    and of its own (0 when none), space-separated, read once per project; false when its
    id names no project. The ids are found here, so their keys are made here too, from
    the prefixes given. Returns Redis's time (ms) and the {id, data, claims, version}
    rows."""

    LUA = (
        REDIS_NOW_MS
        + """
    local want, limit, new = tonumber(want), tonumber(budget), tonumber(newcomer)
    local held, left, looked_for, open = {}, {}, {}, 0  -- open: projects looked on for
    for id in string.gmatch(mine, '[^\\n]+') do held[id] = true end
    local function look_for(project)  -- past the scout while it may take more
      local more = left[project] > 0
      if more ~= (looked_for[project] or false) then open = open + (more and 1 or -1) end
      looked_for[project] = more
    end
    for i = 1, #shares, 2 do
      left[shares[i]] = tonumber(shares[i + 1])
      look_for(shares[i])
    end
    local of_project = '^([^' .. sep .. ']+)' .. sep
    local now_ms = redis_now_ms()
    local leased_until = now_ms + tonumber(lease_ms)
    local versions, platform_version = {}, nil
    local function version_of(project)
      if not project then return false end
      if not versions[project] then
        platform_version = platform_version or redis.call('GET', version_prefix .. platform) or '0'
        versions[project] = platform_version .. ' '
          .. (redis.call('GET', version_prefix .. project) or '0')
      end
      return versions[project]
    end
    local out = {}
    local function claim(id)  -- true when `id` left the due range (claimed, or gone)
      local project = not held[id] and string.match(id, of_project)
      local share = new >= 0 and project and (left[project] or new)
      -- still running here (its lease given up: its next chunk, its next attempt), or its
      -- project holds its share of this worker: left for later
      if held[id] or (share and share <= 0) then return false end
      if not redis.call('SET', lease_prefix .. id, token, 'PX', lease_ms, 'NX') then return end
      if share then left[project] = share - 1; look_for(project) end
      local data, claims = redis.call('GET', job_prefix .. id), 1
      if not data then
        redis.call('DEL', lease_prefix .. id)
        redis.call('ZREM', queue, id)
        claims = 0
      else
        redis.call('ZADD', queue, 'XX', leased_until, id)
        if not redis.call('SET', claims_prefix .. id, 1, 'EX', claims_ttl_s, 'NX') then
          claims = redis.call('INCR', claims_prefix .. id)  -- claimed before: ttl runs on
        end
      end
      out[#out + 1] = {id, data, claims, data and version_of(project)}
      return true
    end
    local offset, page_size, ended = 0, want, false  -- as many as wanted at first
    local scout_limit = new < 0 and limit or tonumber(scout)
    while #out < want and offset < limit and (open > 0 or offset < scout_limit) do
      local page = redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'LIMIT', offset, page_size)
      local taken = 0  -- entries this page took out of the due range
      for _, id in ipairs(page) do
        if claim(id) then taken = taken + 1 end
        if #out >= want then break end
      end
      ended = #page < page_size
      if ended then break end
      offset = offset + #page - taken
      page_size = math.max(want, 100)  -- fewer, longer pages past the jobs left alone
    end
    if #out < want and not ended and tonumber(since_ms) > 0 then  -- what just came due
      local from = math.min(tonumber(since_ms), now_ms) - tonumber(slack_ms)
      local page = redis.call('ZREVRANGEBYSCORE', queue, now_ms, from, 'LIMIT', 0, 100)
      for i = #page, 1, -1 do if claim(page[i]) and #out >= want then break end end
    end
    return {now_ms, out}
    """
    )
    queue: Key
    want: int
    lease_ms: int
    token: str
    lease_prefix: str
    job_prefix: str
    claims_prefix: str
    claims_ttl_s: int
    budget: int
    scout: int
    since_ms: int
    slack_ms: int
    sep: str
    newcomer: int
    mine: str
    version_prefix: str
    platform: str
    shares: ArgList


@dataclass
class Renew(Script):
    """Extends the leases of `job_ids` still held by `token` to `lease_ms` from now (Redis's
    clock), and their scores in the `queue` with them (unless a job is due later: its next
    attempt); returns how many were. The ids are the claim's, so their lease keys are made
    here (`lease_prefix`)."""

    LUA = (
        REDIS_NOW_MS
        + """
    local n = 0
    local until_ms = redis_now_ms() + tonumber(lease_ms)
    for _, id in ipairs(job_ids) do
      local lease = lease_prefix .. id
      if redis.call('GET', lease) == token then
        redis.call('PEXPIRE', lease, lease_ms)
        redis.call('ZADD', queue, 'XX', 'GT', until_ms, id)
        n = n + 1
      end
    end
    return n
    """
    )
    queue: Key
    lease_ms: int
    token: str
    lease_prefix: str
    job_ids: ArgList


@dataclass
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


@dataclass
class HandOver(Script):
    """A fan-out job's next chunk: the job (same id, so its event stays queued until its
    last chunk) gets the bytes of the next chunk (`data`, kept `ttl_ms`) and is due at
    `now_ms`, its claim count starting again. Unless another worker holds the lease, or
    the job is no longer what this run read (`read`: the SHA-1 of its bytes then; it ended,
    or this same write was sent twice). Returns 1 when done."""

    LUA = """
    local owner = redis.call('GET', lease)
    if owner and owner ~= token then return 0 end
    local stored = redis.call('GET', job)
    if not stored or redis.sha1hex(stored) ~= read then return 0 end
    redis.call('SET', job, data, 'PX', ttl_ms)
    redis.call('ZADD', queue, now_ms, job_id)
    redis.call('DEL', lease, claims)
    return 1
    """
    queue: Key
    lease: Key
    job: Key
    claims: Key
    token: str
    job_id: str
    read: str
    data: bytes
    ttl_ms: int
    now_ms: int


@dataclass
class Again(Script):
    """Puts the job back in the queue, due at `due_ms` (its data kept `ttl_ms`), unless
    another worker holds its lease or it has ended. `next_attempt` '1': its next attempt is
    due then, the claim count starts again; '0', after a failed run: due then unless
    already due later by a write of its own (which gave up the lease: a job still leased
    here is due at the lease's end only because it runs). Returns 1 when done."""

    LUA = """
    local owner = redis.call('GET', lease)
    if owner and owner ~= token then return 0 end
    local due = redis.call('ZSCORE', queue, job_id)
    if not due then return 0 end
    if next_attempt == '1' or owner or tonumber(due) < tonumber(due_ms) then
      redis.call('ZADD', queue, due_ms, job_id)
    end
    redis.call('PEXPIRE', job, ttl_ms)
    redis.call('DEL', lease)
    if next_attempt == '1' then redis.call('DEL', claims) end
    return 1
    """
    queue: Key
    lease: Key
    job: Key
    claims: Key
    token: str
    job_id: str
    due_ms: int
    ttl_ms: int
    next_attempt: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now holds: its id, stored bytes (None: its data was gone), how
    many times it was claimed (1 on the first run), and the registry version its
    project's events are matched at now (None: unknown)."""

    job_id: str
    data: bytes | None
    claims: int
    registry_version: bytes | None = None


class Claims:
    """The claim operations of one worker (its lease token) on one queue."""

    def __init__(self, redis: Redis, keys: Keys, token: str, lease_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = keys.QUEUE
        self.token = token
        self.lease_ms = int(lease_s * 1000)
        self.claimed_at_ms = 0  # by Redis's clock: the last claim's (0: none yet)

    async def claim(
        self,
        count: int,
        *,
        budget: int = 2000,
        scout: int | None = None,
        shares: Budgets = (-1, {}),
        mine: Iterable[str] = (),
    ) -> list[Claimed]:
        """Up to `count` due jobs in one round trip (`Claim`; `scout` defaults to
        `budget`; `since_ms` is `claimed_at_ms`, 0 after a failed claim: Redis may come back
        with another clock). `mine`: the ids this worker runs, passed over without a
        command (a running job is out of the due range, but for one whose run gave up its
        lease and has yet to end). `shares`: how many jobs a project not named may take
        (-1: any), and how many more each named one may (`Shares.claim_budgets`)."""
        newcomer, projects = shares
        self.claimed_at_ms, since_ms = 0, self.claimed_at_ms
        claimed_at_ms, rows = await Claim(
            queue=self.queue_name,
            want=count,
            lease_ms=self.lease_ms,
            token=self.token,
            lease_prefix=self.keys.ARQ_IN_PROGRESS_PREFIX,
            job_prefix=self.keys.ARQ_JOB_PREFIX,
            claims_prefix=self.keys.ARQ_RETRY_PREFIX,
            claims_ttl_s=RETRY_KEY_TTL_S,
            budget=budget,
            scout=budget if scout is None else scout,
            since_ms=since_ms,
            slack_ms=JUST_DUE_SLACK_MS,
            sep=SEP,
            newcomer=newcomer,
            mine="\n".join(mine),
            version_prefix=self.keys.REGISTRY_VERSION_PREFIX,
            platform=PLATFORM_PROJECT,
            shares=[item for pair in projects.items() for item in pair],
        ).run(self.redis)
        self.claimed_at_ms = int(claimed_at_ms)
        return [
            Claimed(job_id.decode(), data or None, int(claims), version or None)
            for job_id, data, claims, version in rows
        ]

    async def renew(self, job_ids: list[str]) -> int:
        """Extend the leases of `job_ids` that are still ours; returns how many were."""
        if not job_ids:
            return 0
        prefix = self.keys.ARQ_IN_PROGRESS_PREFIX
        renew = Renew(self.queue_name, self.lease_ms, self.token, prefix, job_ids)
        return int(await renew.run(self.redis))

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
        queue, lease, job, claims = self._keys(claimed.job_id)
        data = encode(following, now)
        HandOver(
            queue, lease, job, claims, self.token, claimed.job_id, read, data, JOB_KEY_EXTRA_MS, now
        ).queue_on(pipe)

    def again(self, pipe: Pipeline, job_id: str, delay_s: float, *, next_attempt: bool) -> None:
        """Queue the job's return to the queue, due in `delay_s`. `next_attempt`: it ran as
        it should and its next attempt is due then (the claim count starts again); else the
        run failed (Redis, a timeout) and the same work is tried again."""
        delay_ms = int(delay_s * 1000)
        queue, lease, job, claims = self._keys(job_id)
        due_ms, ttl_ms = now_ms() + delay_ms, delay_ms + JOB_KEY_EXTRA_MS
        flag = "1" if next_attempt else "0"
        Again(queue, lease, job, claims, self.token, job_id, due_ms, ttl_ms, flag).queue_on(pipe)

    async def release(self, job_ids: list[str]) -> None:
        """Give up the leases of `job_ids` now (shutdown), so another worker claims them at
        once instead of after the lease."""
        if not job_ids:
            return

        def release_all(pipe: Pipeline) -> None:
            for job_id in job_ids:
                self.again(pipe, job_id, 0, next_attempt=False)

        await run_pipeline(self.redis, release_all)
