"""A move's drain (`dispatcher.shards.drain`) on two real shards: a mover paused past its
lease on a job leaves that job to the worker that took it, on one shard only."""

from __future__ import annotations

from typing import Literal

import pytest
import redis as sync_redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.lua import run_pipeline
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards.drain import Drain, Taken
from dispatcher.shards.router import Router
from dispatcher.worker.claims import Claims
from tests.helpers import make_settings, until

JOB_ID = "mv:e.1@5"
PAUSED_LEASE_S = 0.2  # the mover's lease on a job it takes, lapsed in its pause
HOLD_S = 30.0  # its hold of the copy on the new shard, not


def two_empty_shards(shard_servers: list[EmbeddedRedis], **overrides: object) -> Settings:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return make_settings(urls[0], redis_shards=urls, placement_refresh=0.05, **overrides)


class Paused(Drain):
    """A drain whose mover is paused past its lease on the job it took, `at` a step of its
    move, while a worker of the old shard claims the job (and, `ended`, runs and ends it)."""

    at: Literal["take", "place"] = "take"
    ended = False

    async def take(
        self, job_id: str, read: bytes, *, unless_begun: bool = False
    ) -> Taken | Literal[False] | None:
        taken = await super().take(job_id, read, unless_begun=unless_begun)
        if self.at == "take":
            await self.pause()
        return taken

    async def place(self, taken: Taken) -> bool:
        placed = await super().place(taken)
        if self.at == "place":
            await self.pause()
        return placed

    async def pause(self) -> None:
        src, lease = self.src, self.src.keys.ARQ_IN_PROGRESS_PREFIX + JOB_ID

        async def lapsed() -> bool:
            return not await src.redis.exists(lease)

        await until(lapsed, 10, "the mover's lease on the job to lapse")
        worker = Claims(src.redis, src.keys, "worker", lease_s=30)
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]
        if self.ended:
            await run_pipeline(src.redis, lambda pipe: worker.finish(pipe, JOB_ID))


async def _where(services: Services) -> tuple[bool, bytes | None]:
    """Whether the job is queued on the shard, and who holds its lease there."""
    k = services.keys
    queued = await services.redis.zscore(k.QUEUE, JOB_ID) is not None
    return queued, await services.redis.get(k.ARQ_IN_PROGRESS_PREFIX + JOB_ID)


@pytest.mark.parametrize("at", ["take", "place"])
@pytest.mark.parametrize("ended", [False, True], ids=["worker holds it", "worker ended it"])
async def test_a_mover_paused_past_its_lease_leaves_the_job_to_the_worker_that_took_it(
    shard_servers: list[EmbeddedRedis], at: Literal["take", "place"], ended: bool
) -> None:
    """The mover takes a job on the old shard, then is paused past its lease on it: right
    after its take, or after it queued its copy on the new shard. A worker of the old
    shard claims the job meanwhile (and runs and ends it, or still holds it). The mover,
    resumed, finds its lease gone as it removes the job from the old shard: it leaves
    the job to that worker and removes its copy from the new shard, which no worker there
    could take (held by the mover). The job runs on one shard only. Before, the mover
    queued the copy and ignored its removal's answer (0 while the worker holds the job, 1
    once the job ended there): the job ran on both shards."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: now_ms()})
        await src.redis.set(src.keys.delivery(JOB_ID), "1", ex=1_000)
        drain = Paused(src, dst, "mv", "mover", lambda: None, lease_s=PAUSED_LEASE_S, hold_s=HOLD_S)
        drain.at, drain.ended = at, ended
        assert await drain.move_job(JOB_ID, b"{}", unless_begun=False) is False
        assert await _where(dst) == (False, None)  # no copy on the new shard
        assert not await dst.redis.exists(dst.keys.arq_job(JOB_ID), dst.keys.delivery(JOB_ID))
        assert await _where(src) == ((False, None) if ended else (True, b"worker"))


async def test_a_moved_job_is_held_on_the_new_shard_until_it_left_the_old_one(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The copy the mover queues on the new shard is not due (its workers cannot claim it)
    until the job has left the old shard: then it is due when the job was."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        due = now_ms() - 1_000
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: due})
        seen: list[tuple[float | None, bytes | None]] = []

        class Watched(Drain):
            async def place(self, taken: Taken) -> bool:
                placed = await super().place(taken)
                k = self.dst.keys
                held = await self.dst.redis.zscore(k.QUEUE, JOB_ID)
                seen.append((held, await self.dst.redis.get(k.ARQ_IN_PROGRESS_PREFIX + JOB_ID)))
                return placed

        drain = Watched(src, dst, "mv", "mover", lambda: None)
        assert await drain.move_job(JOB_ID, b"{}", unless_begun=False) is True
        ((held, holder),) = seen
        assert held is not None and held > now_ms() and holder == b"mover"
        worker = Claims(dst.redis, dst.keys, "worker", lease_s=30)
        assert await dst.redis.zscore(dst.keys.QUEUE, JOB_ID) == due
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]
        assert await _where(src) == (False, None)
