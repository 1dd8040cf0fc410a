"""What an operator asks at 2 a.m.: is the queue moving, are workers alive, which callbacks
fail, how did the last hour go. Read-only, a handful of Redis calls; plus the per-minute
attempt counts the workers write for it."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.health import Failing, Health
    from dispatcher.jobs import Queue

__all__ = ["AttemptStats", "Status", "live_workers", "read_status"]

STATS_TTL_S = 7200


@dataclass(slots=True)
class Status:
    queue_due: int
    oldest_due_s: float
    workers: list[dict[str, Any]]
    failing: list[Failing]
    disabled: int
    last_hour: dict[str, int] = field(default_factory=dict)


class AttemptStats:
    """Attempts by (minute, outcome), counted in memory and added to Redis every few
    seconds, so the hot path never waits for them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[int, str]] = collections.Counter()

    def count(self, outcome: str) -> None:
        self.counts[(time.time_ns() // 60_000_000_000, outcome)] += 1

    async def flush(self, redis: Redis) -> None:
        counts, self.counts = self.counts, collections.Counter()
        if not counts:
            return
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for (minute, outcome), n in counts.items():
                    pipe.hincrby(keys.stats(minute), outcome, n)
                    pipe.expire(keys.stats(minute), STATS_TTL_S)
                await pipe.execute()
        except BaseException:
            self.counts.update(counts)  # kept for the next flush
            raise


async def live_workers(redis: Redis, host: str | None = None) -> list[dict[str, Any]]:
    """Heartbeats of live workers (all, or those of one host)."""
    pattern = f"{keys.WORKERS_PREFIX}{host + keys.SEP if host else ''}*"
    found = [key async for key in redis.scan_iter(match=pattern, count=500)]
    values = await redis.mget(found) if found else []
    return sorted((orjson.loads(v) for v in values if v), key=lambda w: (w["host"], w["pid"]))


async def read_status(
    redis: Redis, queue: Queue, health: Health, *, now_ms: int | None = None
) -> Status:
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    due, oldest = await queue.depth()
    minute = now // 60_000
    async with redis.pipeline(transaction=False) as pipe:
        for m in range(minute - 59, minute + 1):
            pipe.hgetall(keys.stats(m))
        pipe.zcard(keys.CALLBACKS_DISABLED)
        *minutes, disabled = await pipe.execute()
    last_hour: dict[str, int] = {}
    for counts in minutes:
        for outcome, n in counts.items():
            last_hour[outcome.decode()] = last_hour.get(outcome.decode(), 0) + int(n)
    return Status(
        queue_due=due,
        oldest_due_s=oldest,
        workers=await live_workers(redis),
        failing=await health.failing(),
        disabled=int(disabled),
        last_hour=last_hour,
    )
