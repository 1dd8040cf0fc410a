"""Claims on queued jobs, on arq's own keys: claim a batch, renew leases, finish, retry.

A job stays in the queue's sorted set until it is finished; while a worker runs it, its
`arq:in-progress:{id}` key is a *lease* holding the worker's token, set for
`DISPATCHER_LEASE_SECONDS` and renewed while the job runs, and its score in the queue is
the lease's end, renewed with it: a running job is out of the due range, so a claim reads
only jobs it may take, however many the fleet runs. A worker that dies stops renewing, so
its jobs are due, and claimed again, within a lease. Every step that ends a claim checks
the lease first: a worker that lost its lease (it was paused, or Redis was) leaves the job
to whoever holds it now, and a job's end needs the lease to be its own (lapsed, the job is
left to the next claim). `arq:retry:{id}` counts the claims of a job, as arq does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dispatcher import metrics
from dispatcher.clock import now_ms
from dispatcher.ending import END_JOB, END_JOBS, ENDS, JobEnd
from dispatcher.jobs import encode
from dispatcher.keys import SEP
from dispatcher.lua import REDIS_NOW_MS, ArgList, Key, Script, run_pipeline
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.worker.claim_script import JUST_DUE_SLACK_MS, SWEEP_ENTRIES, Claim
from dispatcher.worker.record import keep_entry

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
NOT_UTF8 = "its id is not UTF-8"

log = structlog.get_logger("dispatcher.worker")


def body_wait_ms(settings: Settings) -> int:
    """The longest a run may put its job off by, the job's time to live with it: its next
    attempt's delay (a Retry-After at most), a run's time, and a day (arq's)."""
    wait_s = max(settings.progress_ttl, settings.retry_after_cap)
    return int((wait_s + settings.effective_job_timeout) * 1000) + JOB_KEY_EXTRA_MS


@dataclass
class Renew(Script):
    """Extends the leases of `job_ids` still held by `token` to `lease_ms` from now (Redis's
    clock), and their scores in the `queue` with them (unless a job is due later: its next
    attempt); returns the ids that were not, in two lists: those another worker holds
    now, and those with no lease (it lapsed, or the job ended or moved on meanwhile). The
    ids are the claim's, so their lease keys are made here (`lease_prefix`)."""

    LUA = (
        REDIS_NOW_MS
        + """
    local taken, gone = {}, {}
    local until_ms = redis_now_ms() + tonumber(lease_ms)
    for _, id in ipairs(job_ids) do
      local lease = lease_prefix .. id
      local holder = redis.call('GET', lease)
      if holder == token then
        redis.call('PEXPIRE', lease, lease_ms)
        redis.call('ZADD', queue, 'XX', 'GT', until_ms, id)
      elseif holder then
        taken[#taken + 1] = id
      else
        gone[#gone + 1] = id
      end
    end
    return {taken, gone}
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
    when its lease is this run's (`token`). Returns 1 when done, 0 when left: to another
    worker that holds it, or to the next claim (the lease lapsed; or the job ended and its
    id was queued anew). (The record's script ends a job with the same Lua:
    `dispatcher.ending`.)"""

    LUA = END_JOB + "return end_job()"
    BEFORE, AFTER = ENDS, END_JOBS  # its jobs end once every call ran
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
    due then, the claim count starts again (a `deliver` job: its id, which names its
    emission, is never queued again once it ended); '0', after a failed run or a stop:
    only while its lease is this run's; 'unrun', a claimed job put back unstarted (its
    worker stops): so too, and the claim that took it is not counted (`unending`).
    Without one, the job is due already (its lease lapsed), or due later by a write of
    its own (which gave up the lease), or it is a new job: a fan-out's id is its event's,
    emitted again once it ended, and a late put-back used to set that new emission a
    retry's delay late (review). Returns 1 when done."""

    LUA = """
    local owner = redis.call('GET', lease)
    if owner ~= token and (owner or next_attempt ~= '1') then return 0 end
    local due = redis.call('ZSCORE', queue, job_id)
    if not due then return 0 end
    redis.call('ZADD', queue, due_ms, job_id)
    redis.call('PEXPIRE', job, ttl_ms)
    redis.call('DEL', lease)
    if next_attempt == '1' then redis.call('DEL', claims)
    elseif next_attempt == 'unrun' and redis.call('DECR', claims) < 1 then
      redis.call('DEL', claims)  -- its first claim (or the count gone): none left
    end
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
    many times it was claimed (1 on the first run; its data gone, 1 when its claim put
    its drop on record, else 0), the registry version its project's events are matched
    at now (None: unknown), and when it was claimed, by Redis's clock (0: unknown)."""

    job_id: str
    data: bytes | None
    claims: int
    registry_version: bytes | None = None
    at_ms: int = 0


class Claims:
    """The claim operations of one worker (its lease token) on one queue."""

    def __init__(self, redis: Redis, keys: Keys, token: str, lease_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = keys.QUEUE
        self.token = token
        self.lease_ms = int(lease_s * 1000)
        self.claimed_at_ms = 0  # by Redis's clock: the last claim's (0: none yet)
        self.sweep_at, self.sweep_after = 0, b""  # where the next sweeping claim looks on

    async def claim(
        self,
        count: int,
        *,
        budget: int = 2000,
        scout: int | None = None,
        sweep: bool = False,
        quiet: Iterable[str] = (),
        shares: Budgets = (-1, {}),
        mine: Iterable[str] = (),
    ) -> list[Claimed]:
        """Up to `count` due jobs in one round trip, as `Claim` looks for them (`scout`
        defaults to `budget`; `since_ms` is `claimed_at_ms`, 0 after a failed claim: Redis
        may come back with another clock; a `sweep` goes on from `sweep_at`/`sweep_after`
        and moves them on). `quiet`, `shares` (`Shares.claim_budgets`) and `mine` (the ids
        this worker runs) are `Claim`'s."""
        newcomer, projects = shares
        self.claimed_at_ms, since_ms = 0, self.claimed_at_ms
        claimed_at_ms, rows, swept, after = await Claim(
            queue=self.queue_name,
            dropped=self.keys.DROPPED,
            want=count,
            lease_ms=self.lease_ms,
            token=self.token,
            lease_prefix=self.keys.ARQ_IN_PROGRESS_PREFIX,
            job_prefix=self.keys.ARQ_JOB_PREFIX,
            claims_prefix=self.keys.ARQ_RETRY_PREFIX,
            claims_ttl_s=RETRY_KEY_TTL_S,
            budget=budget,
            scout=budget if scout is None else scout,
            sweep=self.sweep_at if sweep else -1,
            sweep_after=self.sweep_after if sweep else b"",
            sweep_size=SWEEP_ENTRIES,
            quiet="\n".join(quiet),
            since_ms=since_ms,
            slack_ms=JUST_DUE_SLACK_MS,
            sep=SEP,
            newcomer=newcomer,
            mine="\n".join(mine),
            version_prefix=self.keys.REGISTRY_VERSION_PREFIX,
            platform=PLATFORM_PROJECT,
            dropped_prefix=self.keys.DROPPED_PREFIX,
            pushed_prefix=self.keys.PUSHED_PREFIX,
            shares=[item for pair in projects.items() for item in pair],
        ).run(self.redis)
        self.claimed_at_ms = int(claimed_at_ms)
        if sweep:
            self.sweep_at, self.sweep_after = int(swept), after  # bytes: any id's, as it is
        return await self._named(rows, self.claimed_at_ms)

    async def _named(self, rows: list[list[bytes]], at_ms: int) -> list[Claimed]:
        """The claimed jobs, less those whose id cannot be named (`_set_aside`)."""
        found, unnamed = [], []
        for job_id, data, claims, version in rows:
            try:
                # (data None: gone, Lua's false; an empty string is data, and poison)
                claimed = Claimed(job_id.decode(), data, int(claims), version or None, at_ms)
                found.append(claimed)
            except UnicodeDecodeError:
                unnamed.append(job_id)
        if unnamed:
            await self._set_aside(unnamed)
        return found

    async def _set_aside(self, job_ids: list[bytes]) -> None:
        """Jobs whose id is not UTF-8 (another client's: a producer of ours refuses such
        an id) cannot be named in the worker's `str` ids: recorded as poison (the id shown
        escaped) and removed with their keys by their bytes. Decoded, such an id raised out
        of the worker's loop, the claim's whole batch left leased, and every worker that
        claimed it again died the same way (review)."""

        def write(pipe: Pipeline) -> None:
            for raw in job_ids:
                entry = {"jobId": raw.decode(errors="backslashreplace"), "problem": NOT_UTF8}
                keep_entry(pipe, self.keys.POISON_JOBS, entry)
                pipe.zrem(self.queue_name, raw)
                pipe.delete(*(prefix.encode() + raw for prefix in self._prefixes()))

        await run_pipeline(self.redis, write)
        metrics.POISON_JOBS.inc(len(job_ids))
        log.error("job.poison", job_ids=[repr(raw) for raw in job_ids], problem=NOT_UTF8)

    async def renew(self, job_ids: list[str]) -> tuple[set[str], set[str]]:
        """Extend the leases of `job_ids` that are still ours; returns the others' ids:
        those another worker holds, and those with no lease."""
        if not job_ids:
            return set(), set()
        prefix = self.keys.ARQ_IN_PROGRESS_PREFIX
        renew = Renew(self.queue_name, self.lease_ms, self.token, prefix, job_ids)
        taken, gone = await renew.run(self.redis)
        return {job.decode() for job in taken}, {job.decode() for job in gone}

    def _keys(self, job_id: str) -> tuple[str, str, str, str]:
        """A job's queue, lease, data and claim count keys."""
        lease, job, claims = (prefix + job_id for prefix in self._prefixes())
        return self.queue_name, lease, job, claims

    def _prefixes(self) -> tuple[str, str, str]:
        """What a job's lease, data and claim count keys are named by, before its id."""
        keys = self.keys
        return keys.ARQ_IN_PROGRESS_PREFIX, keys.ARQ_JOB_PREFIX, keys.ARQ_RETRY_PREFIX

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

    def unclaim(self, pipe: Pipeline, job_id: str) -> None:
        """Queue the return of a job claimed but not started (the worker stops): due now,
        the claim that took it not counted (`Again`'s 'unrun')."""
        queue, lease, job, claims = self._keys(job_id)
        Again(queue, lease, job, claims, self.token, job_id, now_ms(), JOB_KEY_EXTRA_MS,
              "unrun").queue_on(pipe)  # fmt: skip

    async def release(self, job_ids: list[str]) -> None:
        """Give up the leases of `job_ids` now (shutdown), so another worker claims them at
        once instead of after the lease."""
        if not job_ids:
            return

        def release_all(pipe: Pipeline) -> None:
            for job_id in job_ids:
                self.again(pipe, job_id, 0, next_attempt=False)

        await run_pipeline(self.redis, release_all)
