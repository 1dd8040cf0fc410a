"""What a move's drain reads of the old shard's queue (`dispatcher.shards.left`), on two
real shards: every job of the moving project, whatever other projects' jobs leave the
queue meanwhile, and nothing of any other project's jobs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import redis as sync_redis

from dispatcher.clock import now_ms
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registration
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from tests.helpers import make_settings
from tests.service.test_event_ids import legacy_fan_out

if TYPE_CHECKING:
    from dispatcher.embedded import EmbeddedRedis
    from dispatcher.services import Services
    from dispatcher.settings import Settings

OTHERS = 505  # another tenant's jobs queued ahead of the moving project's retry


def _two_empty_shards(shard_servers: list[EmbeddedRedis]) -> Settings:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)


async def _callback(services: Services, project: str) -> int:
    registration = Registration(project, "http://127.0.0.1:9/h", Region.DEVNET, "t")
    return await services.register(registration, "BUILD_END")


def _ending_meanwhile(src: Services) -> None:
    """Once the drain read a first page of the queue, 10 of the other tenant's jobs end
    (a worker fleet runs them), so every later job's position goes down by 10."""
    ended: list[bool] = []

    def after_first_read(real: Any) -> Any:
        async def read(key: Any, *args: Any, **kwargs: Any) -> Any:
            got = await real(key, *args, **kwargs)
            if key == src.keys.QUEUE and not ended:
                ended.append(True)
                await src.redis.zpopmin(src.keys.QUEUE, 10)
            return got

        return read

    src.redis.zrange = after_first_read(src.redis.zrange)  # type: ignore[method-assign]
    src.redis.zscan = after_first_read(src.redis.zscan)  # type: ignore[method-assign]


async def test_the_drain_finds_a_job_whatever_leaves_the_queue_meanwhile(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """505 of another tenant's jobs queued, then the moving project's retry (due in 10
    minutes); 10 of the others end right after the drain's first read of the queue. The
    retry moves to the new shard. Before, the drain read the whole queue page by page by
    position (500 a page): the retry, 505th, was 495th on the second read and passed
    over; the move ended and removed the project's callbacks from the old shard, where
    the retry stayed, to be dropped when due ("callback deleted or disabled"), on a drop
    list its project no longer reads."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        callback_id = await _callback(src, "mv")
        t = now_ms()
        for i in range(OTHERS):
            job_id = f"victim:e{i}.1@1"
            await src.redis.set(src.keys.arq_job(job_id), b'{"other": 1}', px=600_000)
            await src.redis.zadd(src.keys.QUEUE, {job_id: t - 1_000 + i})
        event = EventJob(id="e", project_id="mv", event="BUILD_END", emitted_at=t)
        retry = DeliveryJob.first(event, callback_id, b"{}")
        await Queue(src.redis, src.keys).enqueue(retry)
        await src.redis.zadd(src.keys.QUEUE, {retry.job_id: t + 600_000}, xx=True)
        _ending_meanwhile(src)
        await Mover(router, lambda _: None, settle_s=0.001, late_s=0).move("mv", 1)
        assert await dst.redis.zscore(dst.keys.QUEUE, retry.job_id) is not None
        assert await src.redis.zscore(src.keys.QUEUE, retry.job_id) is None


async def _commands_on(services: Services, moving: Any) -> list[str]:
    """Every command the shard of `services` ran while `moving` ran (its MONITOR)."""
    seen: list[str] = []
    ready, marker = asyncio.Event(), "end-of-the-move"

    async def listen() -> None:
        async with services.redis.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                seen.append(command["command"])
                if marker in command["command"]:
                    return

    listening = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 10)
    try:
        await moving
        await services.redis.echo(marker)
        await asyncio.wait_for(listening, 30)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    return seen


async def test_a_drain_reads_no_other_projects_job(shard_servers: list[EmbeddedRedis]) -> None:
    """Another tenant's 50 events queued on the old shard, and one of the moving
    project's: the move reads no key of the other tenant's jobs. Before, each pass read
    every job queued on the shard (MGET of 500 at a time, each one decoded): a tiny
    project's move read another tenant's 200 events of 1 MB each on every pass, ~178 ms
    of Redis a read, other clients' PING p99 177 ms, the other tenant's writes refused
    for memory (review)."""
    settings = _two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        src, dst = router.shards
        await _callback(src, "mv")
        async with Producer(settings) as producer:
            for _ in range(50):
                await producer.emit("victim", "BUILD_END", {"n": 1})
            event_id = await producer.emit("mv", "BUILD_END", {"n": 1})
        mover = Mover(router, lambda _: None, settle_s=0.05, late_s=0)
        commands = await _commands_on(src, mover.move("mv", 1))
        assert await dst.redis.zscore(dst.keys.QUEUE, f"mv:{event_id}") is not None
        assert any(f"mv:{event_id}" in command for command in commands)  # it was read
        others = src.keys.arq_job("victim:")
        assert [command for command in commands if others in command] == []


async def test_a_job_of_the_version_before_scoped_ids_still_moves(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A fan-out the version before scoped ids queued for the moving project, named by
    its event id alone (no `:`), moves with it (the drain finds the project's jobs by
    their ids, and such an id can be no other project's of today); another project's
    of that version stays."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await _callback(src, "mv")
        for event_id, project in (("old-1", "mv"), ("old-2", "victim")):
            await src.redis.set(src.keys.arq_job(event_id), legacy_fan_out(event_id, project))
            await src.redis.zadd(src.keys.QUEUE, {event_id: now_ms() + 600_000})
        await Mover(router, lambda _: None, settle_s=0.001, late_s=0).move("mv", 1)
        assert await dst.redis.zscore(dst.keys.QUEUE, "old-1") is not None
        assert [m.decode() for m in await src.redis.zrange(src.keys.QUEUE, 0, -1)] == ["old-2"]
