"""A worker process's periodic duties besides running jobs: its heartbeat (with the attempt
statistics and the projects of the fan-outs it claimed, `lateness.py`), arq's health-check
key, and the fleet's sweep (history retention, the blocked-lanes list kept true, lanes
stopped behind a head whose job is gone let go on).

Each duty runs on its own timer; a failure of one (Redis or PostgreSQL away, or a bug) is
logged and tried again at its next turn, and never stops another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher import bodies, failing, lateness, metrics
from dispatcher.bodies import GIVE_BACK
from dispatcher.clock import now_ms
from dispatcher.cluster import scan_shard
from dispatcher.connections import REDIS_ERRORS, waited_out
from dispatcher.lateness import Noted
from dispatcher.lua import Key, KeyList, Script, run_pipeline
from dispatcher.status import write_heartbeat
from dispatcher.worker import liveness
from dispatcher.worker.lane_lua import FIRST_THERE, first_there_names

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys
    from dispatcher.services import Services
    from dispatcher.settings import Settings
    from dispatcher.stats import AttemptStats

__all__ = ["Counts", "Duties", "every"]

log = structlog.get_logger("dispatcher.worker")

HEARTBEAT_S = 5.0
HEALTH_CHECK_S = 10.0  # arq's health-check key, for `arq --check`
SWEEP_EVERY_S = 300
UNBLOCK_AT_MOST = 1000  # the oldest blocked lanes the sweep looks at
LANES_PAGE = 1000  # the keys a sweep's SCAN page over every lane reads (about)


@dataclass(frozen=True, slots=True)
class Counts:
    """What arq's health check reports of a worker."""

    complete: int
    failed: int
    running: int


async def every(seconds: float, step: Callable[[], Awaitable[Any]]) -> None:
    """`step`, then a pause of `seconds`, for ever; a failure is logged, not fatal: an
    outage, or a reply that means "not now", in a line; anything else with its traceback
    (a cluster's CLUSTERDOWN, down whole, logged one each turn: review)."""
    while True:
        try:
            await step()
        except Exception as exc:  # a bug must not stop the heartbeat or the lease renewals
            if waited_out(exc):  # an outage (full, BUSY, CLUSTERDOWN...): next turn
                log.debug("worker.background_failed", step=step.__name__, error=str(exc))
            else:
                log.exception("worker.background_failed", step=step.__name__)
        await asyncio.sleep(seconds)


class Duties:
    """The duties of the worker whose `token` and `counts` they report: its heartbeat and
    statistics on the `home` shard, the retention sweep of each shard it serves."""

    def __init__(
        self,
        settings: Settings,
        home: Services,
        shards: list[Services],
        stats: AttemptStats,
        token: str,
        counts: Callable[[], Counts],
    ) -> None:
        self.settings = settings
        self.redis = home.redis
        self.keys = home.keys
        self.shards = shards
        self.stats = stats
        self.token = token
        self.counts = counts
        self.started_ms = now_ms()
        self.heartbeat_key = self.keys.worker(socket.gethostname(), os.getpid())
        self.noted = Noted()  # the projects of the fan-outs claimed: added with the heartbeat

    def start(self) -> list[asyncio.Task[None]]:
        self.started_ms = now_ms()
        metrics.WORKER_JOBS_RUNNING.set_function(lambda: self.counts().running)
        return [
            asyncio.create_task(every(liveness.MARK_S, liveness.mark_alive)),  # the probe's
            asyncio.create_task(every(HEARTBEAT_S, self.heartbeat)),
            asyncio.create_task(every(HEALTH_CHECK_S, self.health_check)),
            asyncio.create_task(self.sweeps()),
        ]

    async def heartbeat(self) -> None:
        """Tell `dispatcher status`, `dispatcher worker --check` and the metrics that this
        process is alive, add the projects of the fan-outs it claimed since to the fleet's
        counts (`lateness.py`, in the same round trip) and the attempt statistics."""
        now = now_ms()
        value = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started_ms,
            "seen": now,
        }
        noted = self.noted.take()

        def queue(pipe: Pipeline) -> None:
            lateness.add(pipe, self.keys, noted, self.noted.at_ms)
            write_heartbeat(pipe, self.keys, self.heartbeat_key, value)  # answers last

        try:
            answers = await run_pipeline(self.redis, queue)
        except REDIS_ERRORS:
            self.noted.give_back(noted)  # for the next heartbeat
            metrics.REDIS_UP.set(0)
            raise
        metrics.REDIS_UP.set(1)
        metrics.WORKERS_LIVE.set(answers[-1])
        metrics.WORKER_HEARTBEAT.set(now / 1000)
        await self.stats.flush(self.redis, self.keys)

    async def health_check(self) -> None:
        """arq's health-check key, in arq's format."""
        queued = await self.redis.zcard(self.keys.QUEUE)
        counts = self.counts()
        info = (
            f"{datetime.now():%b-%d %H:%M:%S} j_complete={counts.complete} "
            f"j_failed={counts.failed} j_retried=0 j_ongoing={counts.running} queued={queued}"
        )
        await self.redis.psetex(
            self.keys.arq_health_check(),
            int((HEALTH_CHECK_S + 1) * 1000),
            info.encode(),
        )

    async def sweeps(self) -> None:
        """The sweep of each shard, once per 5 minutes by one worker of the fleet: history
        retention (PostgreSQL: day partitions made ahead, expired ones dropped), empty
        lanes off the blocked list and lanes whose head's job is gone on their way
        (`Unblock`: the blocked ones, a page of every lane), a page of the ordered
        deliveries' kept bodies rid of the references of jobs gone (`bodies.sweep_lanes`),
        pages of the failing callbacks indexed by project (`failing.sweep_page`: what a
        worker of the version before added)."""
        while True:
            slot = now_ms() // 1000 // SWEEP_EVERY_S
            for shard in self.shards:
                await self._sweep(shard, slot)
            next_slot_s = (slot + 1) * SWEEP_EVERY_S
            await asyncio.sleep(max(1.0, next_slot_s - now_ms() / 1000))

    async def _sweep(self, shard: Services, slot: int) -> None:
        """`shard`'s sweep of `slot`, when this worker takes it; each part fails alone (a
        failure is logged, and the next slot tries again)."""
        index, taken = shard.shard.index, False
        try:
            cron = shard.keys.cron("sweep", slot)
            taken = bool(await shard.redis.set(cron, self.token, nx=True, ex=2 * SWEEP_EVERY_S))
            if taken:
                ttl = self.settings.progress_ttl
                unblock = unblock_script(shard.keys, [], UNBLOCK_AT_MOST, ttl)
                unblocked, dropped = await unblock.run(shard.redis)  # apart from any scan
                if unblocked:
                    log.info("lanes.unblocked", lanes=unblocked, shard=index)
                gone_dropped(dropped, index)
                dropped = await paged(shard.redis, shard.keys, "lanes", LanesPage(ttl))
                gone_dropped(dropped, index)
                gone = await paged(shard.redis, shard.keys, "lane-bodies", bodies_page)
                if gone:
                    log.warning("bodies.dangling_released", references=gone, shard=index)
                left = await paged(shard.redis, shard.keys, failing.SWEEP_NAME, failing.sweep_page)
                if left:
                    log.info("health.failing_indexed", removed=left, shard=index)
        except Exception as exc:  # Redis away, a bug
            log.warning("lanes.sweep_failed", error=repr(exc), shard=index)
        if not taken:
            return
        try:
            budget = self.settings.effective_job_timeout / 2
            removed = await shard.history.sweep(max_seconds=budget)
            log.info("history.swept", removed=removed, shard=index)
        except Exception as exc:  # Redis or PostgreSQL away, a bug
            log.warning("history.sweep_failed", error=repr(exc), shard=index)

    async def last_words(self) -> None:
        """On the way out: the last statistics and projects noted (a burst may end before
        its next heartbeat), and no heartbeat left behind."""
        liveness.forget()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.stats.flush(self.redis, self.keys)
            async with self.redis.pipeline(transaction=False) as pipe:
                lateness.add(pipe, self.keys, self.noted.take(), self.noted.at_ms)
                pipe.delete(self.heartbeat_key)
                pipe.zrem(self.keys.WORKERS_LIVE, self.heartbeat_key)
                await pipe.execute()


@dataclass
class Unblock(Script):
    """The `count` oldest blocked lanes and `lanes` (a page of every lane): one empty is
    listed no more (a late copy of a retry's write, its answer lost, lists the lane of a
    head that has ended since; a lane is listed by its head's retry, and its head leaves
    it last: an empty lane is blocked by nothing). One whose head's job is gone (expired
    in the queue, deleted, ended as poison: nothing would ever release it) goes on: such
    heads are dropped on record (`lane_lua.FIRST_THERE`), the lane is listed no more and
    its first delivery with a job is due now (its turn's check, `Head`, tells whether it
    goes or waits). Answers how many lanes it took off the list, how many it dropped."""

    LUA = (
        GIVE_BACK
        + FIRST_THERE
        + """
local taken = 0
local function look(lane)
  if redis.call('EXISTS', lane) == 0 then
    taken = taken + redis.call('ZREM', blocked, lane)
    return
  end
  local before = skipped
  local first = first_there(lane, 'EXISTS')
  if skipped > before then
    redis.call('ZREM', blocked, lane)
    if first then redis.call('ZADD', queue, 'NX', now_ms, first[1]) end
  end
end
if tonumber(count) > 0 then
  for _, lane in ipairs(redis.call('ZRANGE', blocked, 0, count - 1)) do look(lane) end
end
for _, lane in ipairs(lanes) do look(lane) end
return {taken, skipped}
"""
    )
    blocked: Key
    queue: Key
    dropped: Key
    lanes_parked: Key
    lanes: KeyList
    count: int
    job_prefix: str
    lease_prefix: str
    progress_prefix: str
    progress_ttl: int
    waiting_prefix: str
    lane_body: str
    dropped_prefix: str
    lane_prefix: str
    now_ms: int


def gone_dropped(dropped: int, index: int) -> None:
    """The sweep's drops of lane members whose job is gone, counted and logged."""
    if dropped:
        metrics.DROPPED.labels(reason="job").inc(dropped)
        log.error("lanes.gone_dropped", deliveries=dropped, shard=index)


@dataclass(frozen=True, slots=True)
class LanesPage:
    """A `SCAN` page of every lane of a shard (about `LANES_PAGE` keys), through `Unblock`
    (`progress_ttl`: a dropped member's done mark's): the next cursor, how many it dropped."""

    progress_ttl: int

    async def __call__(self, redis: Redis, keys: Keys, cursor: int) -> tuple[int, int]:
        match = f"{keys.LANE_PREFIX}*"
        cursor, found = await scan_shard(redis, keys.QUEUE, cursor, match, LANES_PAGE)
        lanes = [name.decode() for name in found]
        if not lanes:
            return cursor, 0
        _, dropped = await unblock_script(keys, lanes, 0, self.progress_ttl).run(redis)
        return cursor, int(dropped)


async def bodies_page(redis: Redis, keys: Keys, cursor: int) -> tuple[int, int]:
    """A page of the lanes' kept bodies rid of dangling references (`bodies.sweep_lanes`)."""
    return await bodies.sweep_lanes(redis, keys, cursor, 100)


Page = Callable[["Redis", "Keys", int], Awaitable[tuple[int, int]]]


async def paged(redis: Redis, keys: Keys, name: str, page: Page) -> int:
    """`page` of the shard of `keys` from the cursor of its pass `name`, kept in Redis
    (whichever worker's sweep comes next goes on from it; a day without a sweep starts
    over); returns what `page` counted."""
    key = keys.sweep_cursor(name)
    cursor, counted = await page(redis, keys, int(await redis.get(key) or 0))
    await redis.set(key, cursor, ex=86_400)
    return counted


def unblock_script(keys: Keys, lanes: list[str], count: int, progress_ttl: int) -> Unblock:
    """`Unblock` of `lanes` and the `count` oldest blocked lanes of the shard of `keys`."""
    return Unblock(
        blocked=keys.LANES_BLOCKED,
        queue=keys.QUEUE,
        dropped=keys.DROPPED,
        lanes_parked=keys.LANES_PARKED,
        lanes=lanes,
        count=count,
        now_ms=now_ms(),
        **first_there_names(keys, progress_ttl),
    )
