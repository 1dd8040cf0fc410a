"""Recorded drops (deliveries ended without an attempt) are kept per project: one project
whose retries are dropped by the thousand (its callback deleted) cannot push another's
drops out of the record. Real Redis, real burst workers."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from redis.asyncio import Redis

from dispatcher.embedded import EmbeddedRedis
from dispatcher.jobs import DeliveryJob, EventJob, encode
from dispatcher.keys import Keys
from dispatcher.lane_ids import lane_id
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.queue import Queue
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.worker import circuit
from dispatcher.worker.record import DROPS_KEPT_S, KEPT_ENTRIES
from tests.helpers import Receiver, RunWorker
from tests.service.test_drain import two_empty_shards
from tests.service.test_ordered import sweep

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


async def test_a_platform_callbacks_drops_go_to_each_emitting_projects_list(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """A platform-wide callback's drop goes to the list of the project whose event it was
    (its emitter: where its lane's drops go, moved with it), so one project's flood of
    drops to such a callback pushes out no other's. They went to the callback owner's,
    `DEVOPS_ALL_PROJECT`'s, one list every emitting project shared (review). A job of a
    version that did not name its emitter goes to the owner's."""
    await queue(redis, retries("victim", 1, owner=PLATFORM_PROJECT))
    await run_worker()
    await queue(redis, retries("flood", KEPT_ENTRIES + 1, owner=PLATFORM_PROJECT))
    await run_worker()
    [kept] = await drops(redis, keys.dropped("victim"))
    assert kept["deliveryId"] == "victim:e0.999" and kept["projectId"] == PLATFORM_PROJECT
    assert len(await drops(redis, keys.dropped("flood"))) == KEPT_ENTRIES
    assert not await redis.exists(keys.dropped(PLATFORM_PROJECT))
    [older] = retries("older", 1, owner=PLATFORM_PROJECT)
    await queue(redis, [dataclasses.replace(older, emitter="")])  # its emitter unknown
    await run_worker()
    [unnamed] = await drops(redis, keys.dropped(PLATFORM_PROJECT))
    assert unnamed["deliveryId"] == "older:e0.999"


async def test_a_jobs_drop_names_a_project_only_as_its_data_or_a_retrys_id_says(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """A job dropped unread (its data expired) goes to the list of the project its id
    names only when the id is a retry's of today, `{project}:{event id}.{callback
    id}@{emittedAt}`; else to every project's list alone. A version before scoped ids
    named jobs by the event id alone, which may hold `:`: its `victim:x` (a fan-out),
    `victim:x.5` (a retry) and redeliveries were filed under project victim (review). A
    job dropped with its data (claimed too often) goes to its event's project. The claim
    that finds the data gone files the drop (`claim_script.Claim`), but of an id not
    ASCII (another client's), which the worker files: each once."""
    unread = ["lost:e1.5@1", "victim:x", "victim:x.5", "victim:y.5:redeliver:0123456789ab"]
    unread.append("other:é.5@1")
    for job_id in [*unread, "unscoped.5"]:  # queued, their data gone
        await redis.zadd(settings.queue_name, {job_id: 1})
    legacy = EventJob("victim:z", "emitter", "BUILD_END", scoped=False)  # that version's
    await redis.set(keys.arq_job(legacy.job_id), encode(legacy))
    await redis.set(keys.ARQ_RETRY_PREFIX + legacy.job_id, 30, ex=3_600)  # claimed 30 times
    await redis.zadd(settings.queue_name, {legacy.job_id: 1})
    await run_worker()
    assert [d["jobId"] for d in await drops(redis, keys.dropped("lost"))] == ["lost:e1.5@1"]
    assert [d["jobId"] for d in await drops(redis, keys.dropped("emitter"))] == ["victim:z"]
    assert [d["jobId"] for d in await drops(redis, keys.dropped("other"))] == ["other:é.5@1"]
    lists = {k.decode() async for k in redis.scan_iter(keys.DROPPED_PREFIX + "*")}
    assert lists == {keys.dropped(project) for project in ("lost", "emitter", "other")}
    recent = sorted(d["jobId"] for d in await drops(redis, keys.DROPPED))
    assert recent == sorted([*unread, "unscoped.5", "victim:z"])


async def test_a_lane_members_drop_goes_to_its_lanes_project(
    settings: Settings, redis: Redis
) -> None:
    """A lane's member whose job is gone leaves it on record in the drops of the project
    its lane is of (the emitter: a platform-wide callback's lanes are per emitting
    project), as its delivery's other drops. It went to the project its id's text before
    the first `:` named: `victim`, for the retry of event `victim:x` of a version before
    scoped ids, in project attacker's lane (review)."""
    url = "http://127.0.0.1:9/"
    attackers = keys.lane(lane_id("attacker", url, "buildId", "attacker", "b"))
    platform = keys.lane(lane_id(PLATFORM_PROJECT, url, "buildId", "em", "b"))
    await redis.zadd(attackers, {"victim:x.1@5": 1})
    await redis.zadd(platform, {"em:e1.2@5": 1})
    await redis.zadd(keys.LANES_BLOCKED, {attackers: 1, platform: 2})
    await sweep(redis, settings)
    assert [d["jobId"] for d in await drops(redis, keys.dropped("attacker"))] == ["victim:x.1@5"]
    assert [d["jobId"] for d in await drops(redis, keys.dropped("em"))] == ["em:e1.2@5"]
    assert not await redis.exists(keys.dropped("victim"))
    assert len(await drops(redis, keys.DROPPED)) == 2


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


async def test_a_dropped_redelivery_leaves_no_circuit_state_for_its_id_queued_again(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """A window redelivery (its progress id fixed: `…:redeliver:after-{record}`) put off by
    its circuit, then dropped (its callback deleted): the drop frees its id for the next
    window redelivery, its mark gone, and now its circuit state beside the mark too. The
    state stayed, and the next redelivery under that id found its put-offs spent and
    ended unsent at once (review)."""
    (retry,) = retries("demo", 1)
    again = retry.redelivery(7, after=7)
    mark = keys.delivery(again.progress_id)
    await redis.set(circuit.waiting_key(mark), "1 9 9000.000")  # put off 9 times
    await queue(redis, [again])
    await run_worker()
    [kept] = await drops(redis, keys.dropped("demo"))
    assert kept["reason"] == "callback deleted or disabled"
    assert not await redis.exists(mark, circuit.waiting_key(mark))
