"""The queue: jobs enqueued for the workers, in one round trip or inside pipelines, each
an `arq:job:{id}` key and an entry of the queue's sorted set scored by when it is due (see
`dispatcher.jobs` for the format). Enqueueing is idempotent: a job id already queued (or
running) is left alone. Events are numbered on the way when their project is ordered
(`dispatcher.sequence`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from arq.constants import expires_extra_ms

from dispatcher.bodies import KEEP_BODY, body_key
from dispatcher.clock import now_ms
from dispatcher.jobs import DeliveryJob, EventJob, Job, encode
from dispatcher.lua import ArgList, Key, KeyList, Script, run_pipeline
from dispatcher.sequence import push_events

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = ["PUSH_CHUNK", "Queue"]

PUSH_CHUNK = 1000  # jobs per enqueue command of Queue.push_many (about 5 ms of Redis time)


@dataclass
class Push(Script):
    """Queues one job, due at `score_ms`, its bytes kept `ttl_ms`. Returns 1, or 0 when
    that job id was there already, or when this push was made before (`once`, a key of
    its own; the `job` key again for a push that may be made again): a write sent again
    after the job it queued has run and ended must not queue that job once more. A job
    that refers to its event's body (`dispatcher.bodies`) takes its reference to it at
    `body` in the same call (`shared`: the bytes; the `job` key again for one that holds
    its own)."""

    LUA = (
        "local keep_ms = ttl_ms"
        + KEEP_BODY
        + """
    if once ~= job and not redis.call('SET', once, 1, 'NX', 'PX', ttl_ms) then return 0 end
    if redis.call('SET', job, data, 'NX', 'PX', ttl_ms) then
      redis.call('ZADD', queue, score_ms, job_id)
      if body ~= job then keep_body() end
      return 1
    end
    return 0
    """
    )
    job: Key
    queue: Key
    once: Key
    body: Key
    data: bytes
    score_ms: int
    job_id: str
    ttl_ms: int
    shared: bytes = b""


@dataclass
class PushMany(Script):
    """Queues many jobs, due at `score_ms`, their bytes kept `ttl_ms` past it: `jobs` holds
    each one's key and its `pushed` key, `items` each one's bytes and id. One call for many
    jobs: per job, the command packing and the script call were most of what enqueueing a
    batch cost. With `once_ms` (0: none), a job id is queued once while its `pushed` key
    lasts, even after its job has ended; the key holds the `nonce` of the call that queued
    it, and is taken only when the job is not there (a job still ending keeps it free).
    Returns per job 1 (queued, by this call or by one with the same nonce: a try again
    after a lost answer) or 0 (there, or queued before)."""

    LUA = """
    local queued = {}
    local once = tonumber(once_ms) > 0
    for i = 1, #jobs / 2 do
      local job, pushed = jobs[2 * i - 1], jobs[2 * i]
      if once and redis.call('GET', pushed) == nonce then
        queued[i] = 1  -- this call's own, its answer lost
      elseif redis.call('EXISTS', job) == 1
          or (once and not redis.call('SET', pushed, nonce, 'NX', 'PX', once_ms)) then
        queued[i] = 0  -- there, or queued before: the key is left as it is
      else
        redis.call('SET', job, items[2 * i - 1], 'PX', ttl_ms)
        redis.call('ZADD', queue, score_ms, items[2 * i])
        queued[i] = 1
      end
    end
    return queued
    """
    queue: Key
    jobs: KeyList
    score_ms: int
    ttl_ms: int
    once_ms: int
    nonce: str
    items: ArgList


class Queue:
    """Enqueue jobs for the workers of one queue, in one round trip or inside pipelines."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.queue_name = keys.QUEUE

    def push(self, pipe: Pipeline, job: Job, *, defer_s: float = 0.0, once: str = "") -> None:
        """Queue the enqueue of `job` on `pipe`; the caller executes it. Its result in the
        pipeline is 1 when queued, 0 when that job id was there already. `once` (a delivery's
        job): a token of the write (the same each time it is sent): made once, this push is
        never made again, even after its job has ended (see `Push`)."""
        now = now_ms()
        if isinstance(job, EventJob) and not defer_s:  # numbered when its project is ordered
            push_events(pipe, self.keys, [job], [encode(job, now)], now, alone=True)
            return
        score = now + int(defer_s * 1000)
        key = self.keys.arq_job(job.job_id)
        shared = job if isinstance(job, DeliveryJob) and job.body_of is not None else None
        if shared is not None and not shared.body:  # read back, its body never read
            raise ValueError(f"{job.job_id}: a retry that refers to a kept body, without it")
        Push(
            job=key,
            queue=self.queue_name,
            once=self.keys.pushed(once) if once else key,
            body=key if shared is None else body_key(self.keys, shared),
            data=encode(job, now),
            score_ms=score,
            job_id=job.job_id,
            ttl_ms=score - now + expires_extra_ms,
            shared=b"" if shared is None else shared.body,
        ).queue_on(pipe)

    def push_many(
        self,
        pipe: Pipeline,
        jobs: Sequence[Job],
        *,
        nonce: str = "",
        once_ms: int = 0,
    ) -> None:
        """Queue the enqueue of `jobs`, due now, on `pipe`: one command per `PUSH_CHUNK` jobs
        (so that Redis serves others between them), each answering with a list of 1 for a
        job queued, 0 for one whose id was there already. Events are numbered in their
        order when their project is ordered (`dispatcher.sequence`); with `once_ms`, any
        other job's id is queued once in that time, even after its job has ended, `nonce`
        telling a try again of this push from another (`PushMany`)."""
        now = now_ms()
        if all(isinstance(job, EventJob) for job in jobs):
            events = [job for job in jobs if isinstance(job, EventJob)]
            for start in range(0, len(events), PUSH_CHUNK):
                part = events[start : start + PUSH_CHUNK]
                push_events(pipe, self.keys, part, [encode(job, now) for job in part], now)
            return
        if any(isinstance(job, DeliveryJob) and job.body_of is not None for job in jobs):
            raise ValueError("a retry that refers to a kept body is pushed alone (`push`)")
        for start in range(0, len(jobs), PUSH_CHUNK):
            chunk = jobs[start : start + PUSH_CHUNK]
            PushMany(
                queue=self.queue_name,
                jobs=[
                    key
                    for job in chunk
                    for key in (self.keys.arq_job(job.job_id), self.keys.pushed(job.job_id))
                ],
                score_ms=now,
                ttl_ms=expires_extra_ms,
                once_ms=once_ms,
                nonce=nonce,
                items=[item for job in chunk for item in (encode(job, now), job.job_id)],
            ).queue_on(pipe)

    async def enqueue(self, job: Job, *, defer_s: float = 0.0) -> bool:
        """Enqueue one job now; False when that job id is already queued or running."""
        (queued,) = await run_pipeline(
            self.redis, lambda pipe: self.push(pipe, job, defer_s=defer_s)
        )
        return bool(queued)

    async def depth(self) -> tuple[int, float]:
        """Jobs due now, and the age in seconds of the oldest of them."""
        due, age, _ = await self.oldest_due()
        return due, age

    async def oldest_due(self) -> tuple[int, float, str]:
        """`depth`, and the id of the oldest due job ('' when none is due): it begins with
        its project's id (`{project}:{event id}`, a retry's `…{callback id}@{emittedAt}`)."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self.queue_name, "-inf", now)
            pipe.zrange(self.queue_name, 0, 0, withscores=True)
            due, oldest = await pipe.execute()
        if not (due and oldest):
            return int(due), 0.0, ""
        job_id = oldest[0][0].decode(errors="replace")
        return int(due), max(0.0, (now - oldest[0][1]) / 1000), job_id
