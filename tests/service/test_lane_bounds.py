"""Ordered delivery's bounds on a real Redis, real burst workers and a real receiver: a
long orderBy value is carried by its hash, not whole in each job and record of its
event's deliveries (its lanes as distinct as ever), and a moved project's waiting heads
are let go a page at a time. (The semantics: tests/service/test_ordered.py.)"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.jobs import DELIVER, decode
from dispatcher.keys import Keys
from dispatcher.lane_ids import LANE_KEY_MAX
from dispatcher.producer import Producer
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards import lanes as shard_lanes
from dispatcher.shards.lanes import hold, hold_source, let_go
from tests.helpers import Receiver, RunWorker, all_records, until
from tests.service.test_ordered import numbers
from tests.service.test_receiver_controls import ALICE, CALLBACKS, ok, params

keys = Keys()
LONG = 256 * 1024  # an orderBy value's characters: a quarter of the event's limit
A, B = "p" * LONG + "a", "p" * LONG + "b"  # two long values, one prefix
SHORT = "s"  # a value short enough to be carried as it is
# A job's or record's bytes beyond those of the same with the value SHORT: its key twice
# (`orderKey`, and in `lane`), each at most LANE_KEY_MAX characters, 6 bytes each as JSON
# escapes them at worst.
SPARE = 2 * 6 * LANE_KEY_MAX


def lane_key(value: str) -> str:
    """What a reader sees of a value past LANE_KEY_MAX characters: `#`, 32 hex digits."""
    return "#" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


async def deliver_jobs(redis: Redis) -> dict[str, int]:
    """Each `deliver` job stored (retried, parked), by its order key: its most bytes
    besides its body (a job of a delivery alone in its event holds it)."""
    sizes: dict[str, int] = {}
    async for name in redis.scan_iter(match=f"{keys.ARQ_JOB_PREFIX}*", count=1000):
        raw = await redis.get(name)
        if raw is not None and (job := decode(raw)).function == DELIVER:
            key, body = job.payload.get("orderKey", ""), job.payload.get("body", "")
            size = len(raw) - len(orjson.dumps(body))
            sizes[key] = max(sizes.get(key, 0), size)
    return sizes


async def test_a_long_order_by_value_is_carried_by_its_hash_and_keeps_its_lanes(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    # A's and SHORT's step 0 fail once: their retries hold their lanes (steps 1, 2 parked)
    # while B's lane goes on; A's retry reads the jobs stored, SHORT's waiting for it
    tried: list[str] = []
    jobs: dict[str, int] = {}

    async def ready() -> bool:
        b = [step for build, step in numbers(receiver) if build == B]
        return b == [0, 1, 2] and tried.count(SHORT) == 2

    async def read() -> bool:
        return bool(jobs)

    async def handler(request: web.Request) -> web.StreamResponse:
        data = orjson.loads(await request.read())["data"]
        build = data["buildId"]
        if data["step"] or build == B:
            return web.Response(text="ok")
        tried.append(build)
        if tried.count(build) == 1:
            return web.Response(status=500)
        if build == A:
            await until(ready, 5, "B's lane to go on, SHORT's retry to come, A's held")
            jobs.update(await deliver_jobs(redis))
        else:
            await until(read, 5, "A's retry to read the jobs")
        return web.Response(text="ok")

    url = receiver.script("/hook", handler)
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="buildId"), headers=ALICE))
    events = [
        ("demo", "BUILD_END", {"buildId": b, "step": s}) for s in range(3) for b in (A, B, SHORT)
    ]
    await Producer(settings, redis).emit_many(events)
    await run_worker(settings.model_copy(update={"total_timeout": 10}))  # (its waits)
    # the retry's and the parked jobs' bytes, the records', do not grow with the value
    assert len(jobs) == 2 and jobs.pop(SHORT) + SPARE >= max(jobs.values()), shown(jobs)
    found = await all_records(redis, settings, url)
    sizes: dict[str | None, int] = {}
    for record in found:
        raw = await redis.get(f"{keys.HISTORY_RECORD_PREFIX}{record.id}")
        assert raw is not None
        sizes[record.order_key] = max(sizes.get(record.order_key, 0), len(raw))
    bound = sizes.pop(SHORT) + settings.max_request_body + SPARE  # (its body truncated)
    assert len(sizes) == 2 and bound >= max(sizes.values()), shown(sizes)
    # each lane in event order, A's and B's apart (B went on while A's retry held A's)
    seen = numbers(receiver)
    for build, steps in ((A, [0, 0, 1, 2]), (B, [0, 1, 2]), (SHORT, [0, 0, 1, 2])):
        assert [step for b, step in seen if b == build] == steps
    assert {r.order_key for r in found} == {lane_key(A), lane_key(B), SHORT}


def shown(sizes: dict[Any, int]) -> dict[str, int]:
    """Sizes by key, a long key cut short."""
    return {str(key)[:40]: size for key, size in sizes.items()}


async def test_letting_a_moved_projects_lanes_go_makes_every_waiting_head_due_page_by_page(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = Services(settings, redis)
    k = services.keys
    heads = {f"demo:e{i}.1@1700000000000": i for i in range(25)}
    later = 2**50  # each waits in the queue for the move (`lanes.HELD_RECHECK_S`)
    await redis.zadd(k.lanes_waiting("demo"), heads)
    await redis.zadd(k.QUEUE, dict.fromkeys(heads, later))
    await hold(services, "demo", 0)
    pages: list[int] = []
    run = shard_lanes.LetGo.run

    async def counted(script: shard_lanes.LetGo, redis: Redis) -> Any:
        pages.append(answer := await run(script, redis))
        if len(pages) == 1:  # lifted by the first page; held again (moved here again)
            assert await hold_source(services, "demo") is None
            await hold(services, "demo", 1)
        return answer

    monkeypatch.setattr(shard_lanes.LetGo, "run", counted)
    assert await let_go(services, "demo", page=10) == 25
    assert pages == [10, 10, 5]  # one script call a page, never more than its size
    assert await redis.zcount(k.QUEUE, "-inf", later - 1) == 25  # every head due now
    assert await redis.zcard(k.lanes_waiting("demo")) == 0
    assert await hold_source(services, "demo") == 1  # the later pages left the new hold
