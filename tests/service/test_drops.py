"""Recorded drops (deliveries ended without an attempt) are kept per project: one project
whose retries are dropped by the thousand (its callback deleted) cannot push another's
drops out of the record. Real Redis, real burst workers."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from dispatcher.embedded import EmbeddedRedis
from dispatcher.jobs import DeliveryJob
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.queue import Queue
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.worker.record import DROPS_KEPT_S, KEPT_ENTRIES
from tests.helpers import Receiver, RunWorker
from tests.service.test_drain import two_empty_shards

keys = Keys()  # today's key names (one shard)
GONE_CALLBACK = 999  # no callback has this id: its retries are dropped when due


def retries(project: str, count: int, owner: str | None = None) -> list[DeliveryJob]:
    """`count` queued retries of `project`'s events to a callback deleted since (`owner`'s,
    a platform-wide callback's, when not the project's)."""
    jobs = []
    for n in range(count):
        delivery_id = f"{project}:e{n}.{GONE_CALLBACK}"
        jobs.append(DeliveryJob(delivery_id, f"{delivery_id}@1", f"e{n}", owner or project,
                                "BUILD_END", b"{}", GONE_CALLBACK, emitter=project))  # fmt: skip
    return jobs


async def queue(redis: Redis, jobs: list[DeliveryJob]) -> None:
    await run_pipeline(redis, lambda pipe: Queue(redis, keys).push_many(pipe, jobs))


async def drops(redis: Redis, key: str) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in await redis.lrange(key, 0, -1)]  # type: ignore[misc]


async def test_a_projects_drops_never_push_out_anothers(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """One drop of project victim, then 1,001 of project flood: victim's stays on record.
    Before, both went to one list of the last 1,000 for every project, and victim's was
    gone from it (a log line and a metric were all that was left of it)."""
    await queue(redis, retries("victim", 1))
    await run_worker()
    await queue(redis, retries("flood", KEPT_ENTRIES + 1))
    await run_worker()
    [kept] = await drops(redis, keys.dropped("victim"))
    assert kept["deliveryId"] == "victim:e0.999" and kept["projectId"] == "victim"
    assert kept["reason"] == "callback deleted or disabled"
    flood = await drops(redis, keys.dropped("flood"))
    assert len({d["deliveryId"] for d in flood}) == KEPT_ENTRIES  # bounded: its first went
    for project in ("victim", "flood"):  # expires a while after its latest drop
        assert 0 < await redis.ttl(keys.dropped(project)) <= DROPS_KEPT_S
    # every project's list, best-effort, is flood's alone now
    recent = await drops(redis, keys.DROPPED)
    assert len(recent) == KEPT_ENTRIES and {d["projectId"] for d in recent} == {"flood"}


async def test_a_drop_goes_to_its_callback_owners_list_or_to_the_project_its_id_names(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """A platform-wide callback's drop is its owner's (where its history goes), not the
    emitting project's; a job dropped unread (its data expired) is the project's its id
    names; a job id that names none goes to every project's list alone."""
    await queue(redis, retries("emitter", 1, owner="platform"))
    await run_worker()
    assert [d["deliveryId"] for d in await drops(redis, keys.dropped("platform"))] == [
        "emitter:e0.999"
    ]
    assert await redis.exists(keys.dropped("emitter")) == 0
    for job_id in ("lost:e1.5@1", "unscoped.5"):  # queued, their data gone
        await redis.zadd(settings.queue_name, {job_id: 1})
    await run_worker()
    assert [d["jobId"] for d in await drops(redis, keys.dropped("lost"))] == ["lost:e1.5@1"]
    recent = {d.get("jobId") or d.get("deliveryId") for d in await drops(redis, keys.DROPPED)}
    assert recent == {"lost:e1.5@1", "unscoped.5", "emitter:e0.999"}
    lists = {k.decode() async for k in redis.scan_iter(keys.DROPPED_PREFIX + "*")}
    assert lists == {keys.dropped("platform"), keys.dropped("lost")}


async def test_a_moved_projects_drops_go_with_it(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A project's drops on its old shard go after those made on the new one since the
    flip, but for one there already (a move that died before it cleaned the old shard had
    copied it), and leave the old shard with the project."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        old, new = router.shards
        registration = Registration("mv", receiver.url("/hook"), Region.DEVNET, "t")
        await old.register(registration, "BUILD_END")
        entry = [orjson.dumps({"deliveryId": f"mv:e{n}.1", "reason": "r"}) for n in range(3)]
        await old.redis.rpush(old.keys.dropped("mv"), entry[1], entry[0])  # type: ignore[misc]
        await new.redis.rpush(new.keys.dropped("mv"), entry[2], entry[1])  # type: ignore[misc]
        await Mover(router, lambda _: None, settle_s=0.1, late_s=0).move("mv", 1)
        assert await new.redis.lrange(new.keys.dropped("mv"), 0, -1) == entry[::-1]  # type: ignore[misc]
        assert 0 < await new.redis.ttl(new.keys.dropped("mv")) <= DROPS_KEPT_S
        assert await old.redis.exists(old.keys.dropped("mv")) == 0
