"""What an operator asks at 2 a.m.: is the queue moving, are workers alive, which callbacks
fail, how did the last hour and the last day go. Read in a handful of Redis round trips;
written by the workers: their heartbeats (here) and their attempts over time
(`dispatcher.stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher import clock
from dispatcher.jobs import delivery_of
from dispatcher.lua import REDIS_NOW_MS, Key, Script
from dispatcher.stats import read_series

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.failing import FailingView
    from dispatcher.health import Health
    from dispatcher.keys import Keys
    from dispatcher.queue import Queue
    from dispatcher.stats import Series

__all__ = [
    "HEARTBEAT_TTL_S",
    "Beat",
    "BlockedLane",
    "Lanes",
    "Live",
    "Status",
    "count_live_workers",
    "live_workers",
    "read_lanes",
    "read_status",
    "write_heartbeat",
]

HEARTBEAT_TTL_S = 30  # a worker is live while its last heartbeat is younger than this
_FORGET_MS = 3_600_000  # heartbeats older than this leave the live-workers index


@dataclass(frozen=True, slots=True)
class BlockedLane:
    """An ordered lane whose head delivery was put back (a retry, a deferral) or waits for
    an earlier event of its project (still to fan out) or for its project's move: its head's
    callback, the emitting project and the key, since when, its head (its delivery id), how
    many wait behind it."""

    callback_id: int
    project_id: str
    key: str
    since_ms: int
    head: str
    waiting: int


@dataclass(frozen=True, slots=True)
class Lanes:
    """The blocked lanes: how many, the age of the oldest (s), the oldest ones."""

    blocked: int = 0
    oldest_s: float = 0.0
    shown: tuple[BlockedLane, ...] = ()


@dataclass(slots=True)
class Status:
    queue_due: int
    oldest_due_s: float
    workers: list[dict[str, Any]]
    failing: FailingView
    disabled: int
    hour: Series
    day: Series
    lanes: Lanes = Lanes()
    oldest_due_job: str = ""  # its id, which begins with its project's ('' none due)
    of_home: bool = True  # workers and attempts read from shard 0, which holds them

    @property
    def oldest_due_project(self) -> str:
        """The project of the oldest due job (its id's head), '' when none is due."""
        project, sep, _ = self.oldest_due_job.partition(":")
        return project if sep else ""

    @property
    def last_hour(self) -> dict[str, int]:
        """Attempts of the last hour by outcome."""
        return self.hour.totals


@dataclass
class Beat(Script):
    """A worker's heartbeat: its own key (`value`, kept `ttl_s`), and its entry in the index
    of live workers (`live`), which readers range over instead of scanning the keyspace,
    scored by Redis's clock; entries older than `forget_ms` leave the index. Returns how
    many workers beat within `ttl_s`. Each worker's own clock scored it before: one 10
    minutes behind was never counted live, and one ahead counted live an hour after it
    died (review)."""

    LUA = (
        REDIS_NOW_MS
        + """
    local now = redis_now_ms()
    redis.call('SET', beat, value, 'EX', ttl_s)
    redis.call('ZADD', live, now, beat)
    redis.call('ZREMRANGEBYSCORE', live, '-inf', now - tonumber(forget_ms))
    return redis.call('ZCOUNT', live, '(' .. (now - tonumber(ttl_s) * 1000), '+inf')
    """
    )
    beat: Key
    live: Key
    value: bytes
    ttl_s: int
    forget_ms: int


@dataclass
class Live(Script):
    """The workers that beat within `ttl_s`, by Redis's clock: the keys of their
    heartbeats, or (`count` 1) how many."""

    LUA = (
        REDIS_NOW_MS
        + """
    local since = '(' .. (redis_now_ms() - tonumber(ttl_s) * 1000)
    if count == '1' then return redis.call('ZCOUNT', live, since, '+inf') end
    return redis.call('ZRANGEBYSCORE', live, since, '+inf')
    """
    )
    live: Key
    ttl_s: int
    count: int


def write_heartbeat(pipe: Pipeline, keys: Keys, key: str, value: dict[str, Any]) -> None:
    """Queue a worker's heartbeat (`Beat`); its answer is the count of live workers."""
    Beat(key, keys.WORKERS_LIVE, orjson.dumps(value), HEARTBEAT_TTL_S, _FORGET_MS).queue_on(pipe)


async def live_workers(redis: Redis, keys: Keys, host: str | None = None) -> list[dict[str, Any]]:
    """Heartbeats of live workers (all, or those of one host), in two round trips."""
    found = await Live(keys.WORKERS_LIVE, HEARTBEAT_TTL_S, 0).run(redis)
    values = await redis.mget(found) if found else []
    workers = [orjson.loads(v) for v in values if v]
    mine = [w for w in workers if host is None or w["host"] == host]
    return sorted(mine, key=lambda w: (w["host"], w["pid"]))


async def count_live_workers(redis: Redis, keys: Keys) -> int:
    """How many workers sent a heartbeat lately (one round trip)."""
    return int(await Live(keys.WORKERS_LIVE, HEARTBEAT_TTL_S, 1).run(redis))


async def read_lanes(
    redis: Redis, keys: Keys, *, limit: int = 20, now_ms: int | None = None
) -> Lanes:
    """The blocked ordered lanes, the oldest `limit` of them with their heads, in two round
    trips (one when none is blocked)."""
    now = clock.now_ms() if now_ms is None else now_ms
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.LANES_BLOCKED)
        pipe.zrange(keys.LANES_BLOCKED, 0, limit - 1, withscores=True)
        count, oldest = await pipe.execute()
    if not oldest:
        return Lanes()
    async with redis.pipeline(transaction=False) as pipe:
        for lane, _ in oldest:
            pipe.zrange(lane, 0, 0)
            pipe.zcard(lane)
        heads = await pipe.execute()
    shown = []
    for (lane, since), head, size in zip(oldest, heads[::2], heads[1::2], strict=True):
        _, project, key = lane.decode().removeprefix(keys.LANE_PREFIX).split(":", 2)
        first = delivery_of(head[0].decode()) if head else ""
        callback = first.rpartition(".")[2]  # a delivery id ends with its callback's id
        shown.append(
            BlockedLane(
                int(callback) if callback.isdigit() else 0,
                project,
                key,
                int(since),
                first,
                max(0, size - 1),
            )
        )
    return Lanes(int(count), max(0.0, (now - oldest[0][1]) / 1000), tuple(shown))


async def read_status(
    redis: Redis, keys: Keys, queue: Queue, health: Health, *, now_ms: int | None = None
) -> Status:
    now = clock.now_ms() if now_ms is None else now_ms
    due, oldest, oldest_job = await queue.oldest_due()
    hour, day = await read_series(redis, keys, now)
    return Status(
        queue_due=due,
        oldest_due_s=oldest,
        workers=await live_workers(redis, keys),
        failing=await health.failing(),
        disabled=int(await redis.zcard(health.keys.CALLBACKS_DISABLED)),
        hour=hour,
        day=day,
        lanes=await read_lanes(redis, keys, now_ms=now),
        oldest_due_job=oldest_job,
    )
