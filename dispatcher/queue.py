"""The job queue: arq's own job format, written in one round trip and inside pipelines.

arq's `enqueue_job` spends three round trips per job and cannot join a pipeline. Writing
the same key layout here lets a worker store a history record, the delivery's progress and
its next attempt in one atomic round trip, and lets a producer enqueue a thousand events in
one. Workers read these jobs exactly as if arq had enqueued them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from arq.constants import expires_extra_ms
from arq.jobs import serialize_job

from dispatcher import keys
from dispatcher.lua import Lua, run_pipeline
from dispatcher.redis import job_serializer

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = ["DELIVER", "FAN_OUT", "Queue"]

FAN_OUT = "fan_out"
DELIVER = "deliver"

# KEYS: job key, queue. ARGV: job bytes, score ms, job id, expiry ms.
# A job id already queued (or running) is left alone: enqueueing is idempotent.
_PUSH = Lua("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[4]) then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
return 0
""")


class Queue:
    """Enqueue arq jobs for the workers of one queue."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name

    def push(
        self,
        pipe: Pipeline,
        function: str,
        payload: dict[str, Any],
        *,
        job_id: str,
        defer_s: float = 0.0,
    ) -> None:
        """Queue the enqueue of `function(payload)` on `pipe`; the caller executes it.
        Its result in the pipeline is 1 when queued, 0 when that job id was there already."""
        now = time.time_ns() // 1_000_000
        score = now + int(defer_s * 1000)
        data = serialize_job(function, (payload,), {}, None, now, serializer=job_serializer)
        _PUSH.queue(
            pipe,
            [keys.ARQ_JOB_PREFIX + job_id, self.queue_name],
            [data, score, job_id, score - now + expires_extra_ms],
        )

    async def enqueue(
        self, function: str, payload: dict[str, Any], *, job_id: str, defer_s: float = 0.0
    ) -> bool:
        """Enqueue one job now; False when that job id is already queued or running."""
        (queued,) = await run_pipeline(
            self.redis,
            lambda pipe: self.push(pipe, function, payload, job_id=job_id, defer_s=defer_s),
        )
        return bool(queued)

    async def depth(self) -> tuple[int, float]:
        """Jobs due now, and the age in seconds of the oldest of them."""
        now = time.time_ns() // 1_000_000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self.queue_name, "-inf", now)
            pipe.zrange(self.queue_name, 0, 0, withscores=True)
            due, oldest = await pipe.execute()
        age = max(0.0, (now - oldest[0][1]) / 1000) if due and oldest else 0.0
        return int(due), age
