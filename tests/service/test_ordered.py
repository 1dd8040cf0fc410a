"""Ordered delivery (`orderBy`) over the real app, a real Redis, real burst workers and a
real receiver: the parameter on every registration path and its 400s, a lane held by a
retrying head then skipped once its retries are spent, lanes independent of each other,
an event without the key delivered unordered (its record says so), a redelivery outside
the lanes, and a blocked lane in the status views and metrics. (Many builds under worker
SIGKILLs and a Redis restart: tests/faults/test_ordered_faults.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis as redis_py
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher.bodies import body_key
from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.keys import Keys
from dispatcher.lane_ids import lane_id
from dispatcher.lua import Script
from dispatcher.models import Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import CallbackTarget, Options, Registry
from dispatcher.registry.match import TARGET_FIELDS
from dispatcher.registry.options import order_key
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.shards.router import Router
from dispatcher.stats import AttemptStats
from dispatcher.status import read_lanes
from dispatcher.topology import close_all, connect_shards, shards_of
from dispatcher.worker import duties as duties_module
from dispatcher.worker.claims import Claims
from dispatcher.worker.duties import Counts, Duties
from dispatcher.worker.lane_release import Release
from dispatcher.worker.lane_scripts import Enter, Head
from dispatcher.worker.lanes import TOGETHER_ENTRIES, Lanes, Sending
from dispatcher.worker.writer import Writer
from tests.cluster import LocalCluster
from tests.helpers import (
    Handler,
    Receiver,
    RunWorker,
    all_records,
    answer,
    app_client,
    make_settings,
    until,
)
from tests.service.test_console import token_of
from tests.service.test_receiver_controls import (
    ALICE,
    CALLBACKS,
    OPERATOR,
    Query,
    ok,
    params,
    refused,
)

keys = Keys()


@pytest.fixture
async def op_api(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(redis_server.url, operator_token="op-secret")
    async with app_client(settings, redis) as client:
        yield client


def numbers(receiver: Receiver, path: str = "/hook") -> list[tuple[str, int]]:
    """(build, step) of each request the receiver got, in arrival order."""
    bodies = [orjson.loads(seen.body)["data"] for seen in receiver.requests(path)]
    return [(data.get("buildId", ""), data["step"]) for data in bodies]


async def records(redis: Redis, settings: Settings, url: str) -> list[HistoryRecord]:
    """Every record of `url`, oldest first."""
    found: list[HistoryRecord] = await all_records(redis, settings, url)
    return found


def fail_build_start(build: str) -> Handler:
    """A receiver that answers 500 to `build`'s step 0, 200 to everything else."""

    async def handler(request: web.Request) -> web.StreamResponse:
        data = orjson.loads(await request.read())["data"]
        failing = data.get("buildId") == build and data["step"] == 0
        return web.Response(status=500 if failing else 200)

    return handler


def test_order_key_reads_dotted_paths_and_scalars_only() -> None:
    data: dict[str, Any] = {"buildId": "b-1", "build": {"id": 7, "ok": True}, "none": None}
    assert order_key("buildId", data) == "b-1"
    assert order_key("build.id", data) == "7"
    assert order_key("build.ok", data) == "true"
    assert order_key("*", data) == ""
    numbers = orjson.loads(b'{"big": 1E16, "float": 2.50}')  # as the README says: repr's
    assert (order_key("big", numbers), order_key("float", numbers)) == ("1e+16", "2.5")
    for missing in ("none", "build", "nope", "buildId.x", "build.id.x"):
        assert order_key(missing, data) is None


async def test_every_registration_path_takes_lists_and_checks_order_by(
    op_api: httpx.AsyncClient,
) -> None:
    url = "http://127.0.0.1:9/h"
    paths = [
        (CALLBACKS, ALICE),
        (f"{CALLBACKS}/batch", ALICE),
        ("/apigw/v4/projects/demo/pipelines/p1/callbacks", ALICE),
        ("/operator/callbacks", OPERATOR),
        ("/operator/callbacks/batch", OPERATOR),
    ]
    for n, (path, who) in enumerate(paths):
        order: Query = {"orderBy": "build.id" if n % 2 else "*"}
        await ok(await op_api.post(path, params={**params(f"{url}{n}"), **order}, headers=who))
    listed = await ok(await op_api.get(CALLBACKS, headers=ALICE))
    platform = await ok(await op_api.get("/operator/callbacks", headers=OPERATOR))
    shown = sorted(cb["orderBy"] for cb in listed["records"] + platform["records"])
    assert shown == ["*", "*", "*", "build.id", "build.id"]
    page = (await op_api.get("/console/projects/demo")).text
    assert "ordered by <code>build.id</code>" in page
    for bad in ("", "x" * 129, "build..id", "data[0]", "1st", "build id", "**"):
        for path, who in paths:
            message = await refused(
                await op_api.post(path, params={**params(url), "orderBy": bad}, headers=who),
                "orderBy",
            )
            assert "orderBy" in message


async def test_a_lane_waits_for_its_retrying_head_then_skips_it_and_others_go_on(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    # b-1's first event fails for good (4 attempts: 500s), b-2's events all succeed
    url = receiver.script("/hook", fail_build_start("b-1"))
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="buildId"), headers=ALICE))
    events = [
        ("demo", "BUILD_END", {"buildId": f"b-{b}", "step": s}) for s in range(3) for b in (1, 2)
    ]
    await Producer(settings, redis).emit_many(events)
    await run_worker()
    seen = numbers(receiver)
    b1 = [step for build, step in seen if build == "b-1"]
    b2 = [step for build, step in seen if build == "b-2"]
    assert b1 == [0, 0, 0, 0, 1, 2]  # the head's retries held the lane, then it was skipped
    assert b2 == [0, 1, 2]
    # b-2 did not wait for b-1's retries: all of it arrived before b-1's step 1
    assert seen.index(("b-2", 2)) < seen.index(("b-1", 1))
    found = await records(redis, settings, url)
    assert {r.order_key for r in found} == {"b-1", "b-2"}
    assert sum(1 for r in found if r.final and r.status.value == "FAILED") == 1
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")  # every lane emptied
    assert not await redis.zcard(keys.LANES_BLOCKED)


async def test_an_event_without_the_key_goes_unordered_and_says_so(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.url("/hook")
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="build.id"), headers=ALICE))
    await Producer(settings, redis).emit("demo", "BUILD_END", {"step": 0})
    await run_worker()
    (record,) = await records(redis, settings, url)
    assert record.order_key is None
    assert record.order_note is not None and "build.id" in record.order_note
    assert record.status.value == "SUCCESS"


async def test_a_redelivery_bypasses_the_lane(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.url("/hook")
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="*"), headers=ALICE))
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b", "step": 0})
    await run_worker()
    (first,) = await records(redis, settings, url)
    assert first.order_key == ""
    # a head that holds the lane (its retries pending) does not hold back a redelivery
    receiver.script("/hook", answer(500), answer(200))
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b", "step": 1})
    worker: asyncio.Future[Any] = asyncio.ensure_future(run_worker())
    await receiver.wait_for(2)
    retry = f"/apigw/v4/projects/demo/callbacks/history/{first.id}/retry"
    await ok(await api.post(retry, headers=ALICE))
    await worker
    await run_worker()
    assert sorted(numbers(receiver)) == [("b", 0), ("b", 0), ("b", 1), ("b", 1)]
    redelivered = [r for r in await records(redis, settings, url) if r.redelivery_of]
    assert len(redelivered) == 1 and redelivered[0].order_key is None


async def test_a_blocked_lane_shows_in_status_metrics_and_the_console(
    api: httpx.AsyncClient,
    redis: Redis,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))  # the retry is far off
    url = receiver.script("/hook", answer(503), answer(200))
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="buildId"), headers=ALICE))
    producer = Producer(slow, redis)
    await producer.emit_many(
        [("demo", "BUILD_END", {"buildId": "b-9", "step": s}, f"e{s}") for s in range(3)]
    )
    await run_worker(slow, max_burst_jobs=3)  # the three fan-outs only
    assert numbers(receiver) == [("b-9", 0)]  # the head's 503; nothing overtook it
    async with Router.open(slow, redis) as router:
        status = await views.status(router)
    assert status.lanes.blocked == 1
    (lane,) = status.lanes.shown
    assert (lane.project_id, lane.key, lane.head, lane.waiting) == ("demo", "b-9", "demo:e0.1", 2)
    metrics = (await api.get("/metrics")).text
    assert "dispatcher_lanes_blocked 1.0" in metrics
    page = (await api.get("/console/status")).text
    assert "Blocked ordered lanes" in page and "demo:e0.1" in page
    # the names the scripts wrote are the ones keys.py gives
    stored = keys.lane(lane_id("demo", url, "buildId", "demo", "b-9"))
    entries = [entry.partition(b"@")[0] for entry in await redis.zrange(stored, 0, -1)]
    assert entries == [b"demo:e0.1", b"demo:e1.1", b"demo:e2.1"]  # each emission's progress id
    assert await redis.exists(keys.lanes_ordered("demo"), keys.lanes_seq("demo")) == 2


async def test_one_lane_holds_every_event_a_url_is_ordered_for(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    # a build's start and end, registered on the batch route: one callback per event, one
    # lane per build for the URL; the start's first attempt fails, the end waits for it
    url = receiver.script("/hook", answer(500), answer(200))
    registered = params(url, "BUILD_START,BUILD_END", orderBy="buildId")
    await ok(await api.post(f"{CALLBACKS}/batch", params=registered, headers=ALICE))
    await Producer(settings, redis).emit_many(
        [("demo", event, {"buildId": "b-3", "step": n}) for n, event in
         enumerate(["BUILD_START", "BUILD_END"])]
    )  # fmt: skip
    await run_worker()
    arrived = [orjson.loads(seen.body)["event"] for seen in receiver.requests()]
    assert arrived == ["BUILD_START", "BUILD_START", "BUILD_END"]


async def test_the_console_form_registers_order_by(api: httpx.AsyncClient) -> None:
    page = await api.get("/console/projects/demo")
    form = {"csrf_token": token_of(page.text), "url": "http://127.0.0.1:9/c",
            "event": "BUILD_END", "region": "DEVNET", "orderBy": "build.id"}  # fmt: skip
    done = await api.post("/console/projects/demo/callbacks", data=form)
    assert done.status_code == 303, done.text
    refused_page = await api.post(
        "/console/projects/demo/callbacks", data={**form, "orderBy": "a b"}
    )
    assert refused_page.status_code == 400 and "orderBy" in refused_page.text
    (cb,) = (await ok(await api.get(CALLBACKS, headers=ALICE)))["records"]
    assert cb["orderBy"] == "build.id"


def test_the_cli_registers_and_lists_order_by(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_py.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_ALLOW_INTERNAL_REGIONS", '["DEVNET"]')
    monkeypatch.setenv("COLUMNS", "400")  # rich's table, not cut
    cli = CliRunner()
    add = ["callbacks", "add", "--project", "demo", "--url", "http://127.0.0.1:9/cli",
           "--event", "BUILD_END", "--region", "DEVNET", "--order-by"]  # fmt: skip
    added = cli.invoke(app, [*add, "build.id"])
    assert added.exit_code == 0, added.output
    bad = cli.invoke(app, [*add, ""])
    assert bad.exit_code == 1 and "orderBy" in bad.output
    shown = cli.invoke(app, ["callbacks", "list", "--project", "demo"]).output
    assert "ordered by build.id" in shown


async def test_a_head_that_gives_up_releases_its_lane(
    api: httpx.AsyncClient,
    redis: Redis,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """A retry of the lane's head claimed 25 times without ending ends FAILED, unsent, as
    its attempt 2 (`dispatcher.worker.unending`); the next step goes out after it."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    url = receiver.script("/hook", fail_build_start("b"))
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="buildId"), headers=ALICE))
    await Producer(slow, redis).emit_many(
        [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(2)]
    )
    await run_worker(slow, max_burst_jobs=2)  # the head failed once, step 1 waits behind it
    (head,) = await redis.zrange(keys.lane(lane_id("demo", url, "buildId", "demo", "b")), 0, 0)
    assert head.startswith(b"demo:e0.1@")  # the delivery's progress id: its job's
    await redis.zadd(slow.queue_name, {head: 0})  # due now, and claimed once too often
    await redis.set(keys.ARQ_RETRY_PREFIX + head.decode(), 25)
    await run_worker(slow)
    assert await redis.llen(keys.DROPPED) == 0  # type: ignore[misc]  # sync|async
    ends = [
        (r.event_id, r.attempt, r.status.value, r.final)
        for r in await all_records(redis, slow, url)
    ]
    assert ends == [
        ("e0", 1, "FAILED", False),
        ("e0", 2, "FAILED", True),
        ("e1", 1, "SUCCESS", True),
    ]
    assert numbers(receiver) == [("b", 0), ("b", 1)]  # the head's 500, then step 1
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")


async def test_a_project_stops_numbering_events_once_its_last_ordered_callback_goes(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The project's ordered flag is the set of its ordered callbacks: its events are
    numbered while one is left, not after; re-registering without `orderBy` counts as
    leaving too. A flag of the layout before (the string '1', never cleared) becomes the
    set on the next write to the project's callbacks."""
    settings = make_settings(redis_server.url)
    registry = Registry(redis)
    project, flag = "numbered", keys.lanes_ordered("numbered")
    await redis.set(flag, "1")  # the layout before: a string
    url, event, region = "http://127.0.0.1:9/", Event.BUILD_END, Region.DEVNET
    by_build, by_callback = Options(order_by="buildId"), Options(order_by="*")
    first, _ = await registry.create(project, url + "a", event, region, options=by_build)
    second, _ = await registry.create(project, url + "b", event, region, options=by_callback)
    members = await redis.smembers(flag)  # type: ignore[misc]  # sync|async
    assert members == {str(first).encode(), str(second).encode()}

    async def numbered() -> bool:
        async with Producer(settings, redis) as producer:
            (event_id,) = await producer.emit_many([(project, "BUILD_END", {"buildId": "b"})])
        pending = keys.lanes_pending(project)
        return await redis.zscore(pending, f"{project}:{event_id}") is not None

    assert await numbered()
    await registry.delete(project, first)
    assert await numbered()  # the second is still ordered
    await registry.create(project, url + "b", event, region)
    assert await redis.exists(flag) == 0  # registered again without orderBy: none is left
    assert not await numbered()


@pytest.mark.parametrize("parked", [True, False])
async def test_a_fan_out_whose_deliveries_all_park_ends_in_the_parking_script(
    redis: Redis, parked: bool
) -> None:
    """The last chunk of an event, all of its deliveries parked behind their lanes' heads:
    the script that parks them ends the fan-out job too (no script of its own). A delivery
    attempted now carries the job's end instead, so the job is left to it. A parked one is
    marked "0"; one that has a mark already entered before, and is left alone."""
    project, event_job = "parks", "parks:evt_2"
    claims = Claims(redis, keys, "worker-a", lease_s=10)
    await redis.zadd(keys.QUEUE, {event_job: now_ms()})
    await redis.set(keys.arq_job(event_job), b"{}")
    [claimed] = await claims.claim(1)
    await redis.zadd(keys.lanes_pending(project), {event_job: 2})
    lane = keys.lane("parks.1.b-1")
    if parked:
        await redis.zadd(lane, {"parks:evt_1.1@4": 1})  # an earlier event heads the lane
    delivery = f"{event_job}.1@5"

    def enter() -> Enter:
        return Enter.of(keys, project, event_job, [(lane, delivery, b"{}")], progress_ttl=60,
                        now_ms=now_ms(), recheck_ms=now_ms(), last=True,
                        end=claims.job_end(claimed.job_id))  # fmt: skip

    *verdicts, _woken, ended = await enter().run(redis)
    assert verdicts == [0 if parked else 1] and ended == int(parked)
    assert (await redis.zscore(keys.QUEUE, event_job) is None) == parked
    assert (await redis.exists(keys.arq_job(event_job)) == 0) == parked
    assert await redis.get(keys.delivery(delivery)) == (b"0" if parked else None)
    # The same write sent again late (its answer lost), once the delivery was attempted and
    # ended: it is left alone, neither attempted again nor parked (it used to be either)
    await redis.set(keys.delivery(delivery), "done")
    await redis.zrem(lane, delivery)  # released
    *verdicts, _woken, _ended = await enter().run(redis)
    assert verdicts == [3] and await redis.get(keys.delivery(delivery)) == b"done"
    assert await redis.zscore(lane, delivery) is None


@pytest.mark.parametrize("callbacks", [TOGETHER_ENTRIES, TOGETHER_ENTRIES + 1])
async def test_a_big_chunks_lane_entries_run_alone(
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
    callbacks: int,
) -> None:
    """A fan-out chunk of up to `TOGETHER_ENTRIES` ordered deliveries enters its lanes in
    the writer's joint calls; a bigger one alone, so that one call of 50 chunks never holds
    Redis long (review finding). Either way each delivery is sent once."""
    ordered = Options(order_by="buildId")
    for n in range(callbacks):
        url = receiver.url(f"/hook{n}")
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, options=ordered)
    joint: list[int] = []
    together = Enter.queue_together.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Enter], pipe: Any, calls: list[Enter]) -> None:
        joint.append(len(calls))
        together(cls, pipe, calls)

    monkeypatch.setattr(Enter, "queue_together", classmethod(counted))
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b"})
    await run_worker()
    assert len(receiver.seen) == callbacks
    assert joint == ([1] if callbacks <= TOGETHER_ENTRIES else [])


async def test_a_lanes_next_deliveries_reuse_their_callbacks_target_while_it_stands(
    redis: Redis,
) -> None:
    """A lane's next delivery, taken in a release, builds its callback's target from the
    hash the release answered: kept while those fields stay the same (secrets decrypted
    once, not per delivery), built again once they change, never kept while a rotated
    token still signs (its overlap ends by the clock)."""
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", "http://127.0.0.1:9/t", Event.BUILD_END,
                                           Region.DEVNET, "first")  # fmt: skip
    decrypts = 0

    def decrypt(value: bytes | None) -> str:
        nonlocal decrypts
        decrypts += 1
        return registry.decrypt(value)

    async def nothing(*_: Any) -> None:
        return None

    lanes = Lanes(keys, Writer(redis, nothing), Sending(nothing, nothing, decrypt, nothing),
                  progress_ttl=60, lease_s=10)  # fmt: skip

    async def target() -> CallbackTarget:
        values = await redis.hmget(keys.callback(callback_id), [*TARGET_FIELDS, "projectId"])  # type: ignore[misc]
        *fields, owner = values
        return lanes._target(callback_id, fields, owner)

    first = await target()
    built = decrypts
    assert await target() is first and decrypts == built and first.secret_token == "first"
    await registry.rotate_secret(callback_id, "demo", "second", overlap_s=60)
    rotated = await target()
    assert rotated.secret_token == "second" and rotated.previous_token == "first"
    assert await target() is not rotated  # signing twice: built each time
    await registry.rotate_secret(callback_id, "demo", "third", overlap_s=0)
    third = await target()
    assert third.secret_token == "third" and await target() is third


async def test_the_sweep_takes_a_lane_whose_head_ended_off_the_blocked_list(
    redis: Redis, settings: Settings
) -> None:
    """A late copy of a retry's write (its answer lost, sent again once the head ended and
    left its lane) lists the lane as blocked again, with nothing to block it. The fleet's
    sweep takes an empty lane off the list, and leaves one whose head still holds it (its
    retry due later, its job there: not made due, nothing dropped)."""
    held, emptied = (
        keys.lane(lane_id("sweep", "http://127.0.0.1:9/", "buildId", "sweep", key))
        for key in ("a", "b")
    )
    await redis.zadd(held, {"sweep:e1.1@5": 1})
    await redis.set(keys.arq_job("sweep:e1.1@5"), b"{}")
    due = now_ms() + 60_000
    await redis.zadd(keys.QUEUE, {"sweep:e1.1@5": due})
    await redis.zadd(keys.LANES_BLOCKED, {emptied: now_ms() - 900_000, held: now_ms()})
    await sweep(redis, settings)
    assert await redis.zrange(keys.LANES_BLOCKED, 0, -1) == [held.encode()]
    assert await redis.zscore(keys.QUEUE, "sweep:e1.1@5") == due
    assert not await redis.llen(keys.DROPPED)  # type: ignore[misc]  # sync|async
    lanes = await read_lanes(redis, keys)
    assert lanes.blocked == 1 and lanes.oldest_s < 60  # the alert's 10 minutes: not reached
    assert [lane.head for lane in lanes.shown] == ["sweep:e1.1"]


async def test_a_batchs_lane_entries_and_releases_run_together(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fan-outs' lane entries of a batch run in the writer's joint calls (one `EVALSHA`
    for many small chunks' entries), and so do the releases of ordered deliveries that end
    with their attempt (after the records'); each lane's next delivery is taken from that
    answer: every build in order, every lane emptied."""
    url = receiver.url("/hook")
    await ok(await api.post(CALLBACKS, params=params(url, orderBy="buildId"), headers=ALICE))
    events = [
        ("demo", "BUILD_END", {"buildId": f"b-{b}", "step": s}) for s in range(3) for b in range(20)
    ]
    sizes: dict[type, list[int]] = {Enter: [], Release: []}  # the calls of each joint call
    together = Script.queue_together.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Script], pipe: Any, calls: list[Script]) -> None:
        sizes[cls].append(len(calls))
        together(cls, pipe, calls)

    for kind in sizes:
        monkeypatch.setattr(kind, "queue_together", classmethod(counted))
    takes, built = 0, 0  # next deliveries taken in releases; their callback's targets built
    lane_target, from_fields = Lanes._target, CallbackTarget.from_fields.__func__  # type: ignore[attr-defined]

    def counted_build(cls: type[CallbackTarget], *args: Any, **kwargs: Any) -> CallbackTarget:
        nonlocal built
        built += 1
        target: CallbackTarget = from_fields(cls, *args, **kwargs)
        return target

    def counted_take(lanes: Lanes, *args: Any) -> CallbackTarget:
        nonlocal takes
        takes += 1
        with monkeypatch.context() as patched:
            patched.setattr(CallbackTarget, "from_fields", classmethod(counted_build))
            return lane_target(lanes, *args)

    monkeypatch.setattr(Lanes, "_target", counted_take)
    await Producer(settings, redis).emit_many(events)
    await run_worker()
    seen = numbers(receiver)
    for b in range(20):
        assert [step for build, step in seen if build == f"b-{b}"] == [0, 1, 2]
    for kind, counts in sizes.items():  # every one joint, some together
        assert sum(counts) == 60 and max(counts) > 1, kind
    assert takes >= 20 and built <= 2  # taken in releases, they share their callback's target
    assert len(await records(redis, settings, url)) == 60
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")


async def test_a_re_run_releases_what_its_run_before_ended_before_its_entries_run(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A fan-out's first run entered both its ordered deliveries as their lanes' heads,
    sent one (its record and `done` mark written) and died before that one's release. The
    re-run releases that lane again, and the release reaches Redis before the re-run's
    entries: an entry runs ahead of a batch's other writes and may end the job, so a
    failover that kept only the start of the stream would otherwise have ended the job
    with a lane held for good (fourth review). MONITOR shows Redis's own order."""
    urls = {name: receiver.url(f"/{name}") for name in ("a", "b")}
    ids = {
        name: (await Registry(redis).create(
            "projA", url, Event.BUILD_END, Region.DEVNET, "t", options=Options(order_by="buildId")
        ))[0]
        for name, url in urls.items()
    }  # fmt: skip
    producer = Producer(settings, redis)
    await producer.emit("projA", "BUILD_END", {"buildId": "b", "step": 0}, event_id="e-1")
    wire = orjson.loads(await redis.get(keys.arq_job("projA:e-1")) or b"")
    emitted = wire["a"][0]["emittedAt"]
    progress = {name: f"projA:e-1.{ids[name]}@{emitted}" for name in urls}
    lanes = {
        name: keys.lane(lane_id("projA", url, "buildId", "projA", "b"))
        for name, url in urls.items()
    }
    seq = await redis.zscore(keys.lanes_pending("projA"), "projA:e-1")
    assert seq is not None  # numbered: its project is ordered
    # what the first run left: its event ready, both heads entered, /a sent and done
    await redis.zrem(keys.lanes_pending("projA"), "projA:e-1")
    await redis.zadd(keys.lanes_ready("projA"), {"projA:e-1": seq})
    for name, lane in lanes.items():
        await redis.zadd(lane, {progress[name]: seq})
    await redis.set(keys.delivery(progress["a"]), "done", ex=86_400)
    await redis.set(keys.ARQ_RETRY_PREFIX + "projA:e-1", 1)
    await producer.emit("projA", "BUILD_END", {"buildId": "b", "step": 1}, event_id="e-2")
    seen: list[str] = []

    async def watch() -> None:
        async with redis.monitor() as monitor:
            async for command in monitor.listen():
                seen.append(command["command"])

    async def marked(word: str) -> None:
        """ECHO `word` until MONITOR shows it (it may not be on yet): what Redis ran before
        the ECHO it shows is in `seen`."""

        async def shown() -> bool:
            await redis.echo(word)
            await asyncio.sleep(0.01)
            return f"ECHO {word}" in seen

        await until(shown, 5, f"MONITOR's ECHO {word}")

    watching = asyncio.create_task(watch())
    try:
        await marked("before")
        await run_worker()
        await marked("after")
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    shas: dict[type[Script], set[str]] = {
        kind: {kind._lua.sha, kind._together.sha} for kind in (Enter, Release)
    }

    def first(kind: type[Script], word: str) -> int:
        found = next(
            (i for i, line in enumerate(seen)
             if line.startswith("EVALSHA") and line.split()[1] in shas[kind] and word in line),
            None,
        )  # fmt: skip
        assert found is not None, f"no {kind.__name__} call with {word} in MONITOR's lines"
        return found

    assert first(Release, progress["a"]) < first(Enter, "projA:e-1")
    assert numbers(receiver, "/a") == [("b", 1)]  # e-1's was sent by the run before
    assert numbers(receiver, "/b") == [("b", 0), ("b", 1)]
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")
    assert await redis.zcard(settings.queue_name) == 0


async def test_a_waiting_head_parked_again_is_kept_for_ever_and_sent_in_its_turn(
    redis: Redis,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head waiting for an earlier event (e1's, while e0 is still to fan out) whose run
    failed (its look at its turn never reached Redis) was put back with a day to live, as
    any failed run's job is (`Claims.again`). e0's delivery then joins the lane ahead of
    it and parks it again: out of the queue, it must be kept for ever, as `Head` keeps a
    job it parks. It kept its day: once the lane's new head had held the lane that long,
    e1's delivery was gone, its lane's release found nothing, and the lane stopped for
    good, e1 never sent nor recorded (review)."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    failing = True

    async def handler(request: web.Request) -> web.StreamResponse:
        step = orjson.loads(await request.read())["data"]["step"]
        return web.Response(status=500 if failing and step == 0 else 200)

    url = receiver.script("/hook", handler)
    ordered = Options(order_by="buildId")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, options=ordered)
    await Producer(slow, redis).emit_many(
        [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(2)]
    )
    far = now_ms() + 3_600_000
    await redis.zadd(keys.QUEUE, {"demo:e0": far})  # e0 fans out later (queued: pending)
    await run_worker(slow, max_burst_jobs=1)  # e1's fan-out: its delivery waits for e0
    lane = keys.lane(lane_id("demo", url, "buildId", "demo", "b"))
    (waiting,) = await redis.zrange(lane, 0, -1)
    job = keys.arq_job(waiting.decode())
    assert await redis.zscore(keys.lanes_waiting("demo"), waiting) is not None
    assert await redis.pttl(job) == -1

    async def refused(lanes: Lanes, *args: Any) -> Any:
        raise redis_py.ConnectionError("Redis went away")

    with monkeypatch.context() as patched:
        patched.setattr(Lanes, "claimed", refused)
        await run_worker(slow, max_burst_jobs=1)  # its look at its turn fails: put back
    assert await redis.pttl(job) > 0  # a day (and the put-back's delay) to live
    await redis.zadd(keys.QUEUE, {waiting: far}, xx=True)  # not looked at before e0's turn
    await redis.zadd(keys.QUEUE, {"demo:e0": 0})
    await run_worker(slow, max_burst_jobs=1)  # e0's fan-out: its delivery heads the lane
    head, parked = await redis.zrange(lane, 0, -1)
    assert head.startswith(b"demo:e0.") and parked == waiting
    assert await redis.zscore(keys.QUEUE, waiting) is None
    assert await redis.zscore(keys.lanes_waiting("demo"), waiting) is None
    assert await redis.pttl(job) == -1  # parked again: kept for ever
    # A day on (e0's head retried all that time, its receiver away): what lived a day is
    # gone (the parked delivery's progress mark; its job, had it kept a time to live)
    for key in (job, keys.delivery(waiting.decode())):
        if 0 < await redis.pttl(key) <= 86_400_000 + 60_000:
            await redis.pexpire(key, 1)
    failing = False
    await redis.zadd(keys.QUEUE, {head: 0}, xx=True)  # e0's retry, due now: it succeeds
    await run_worker(slow)
    assert numbers(receiver) == [("b", 0), ("b", 0), ("b", 1)]
    ends = [(r.event_id, r.status.value, r.final) for r in await all_records(redis, slow, url)]
    assert ends == [("e0", "FAILED", False), ("e0", "SUCCESS", True), ("e1", "SUCCESS", True)]
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")


async def test_enter_keeps_a_head_it_parks_again_for_ever_with_its_kept_body(
    redis: Redis,
) -> None:
    """A lane's head whose retry is queued (its job and the body it refers to kept a day
    past its due time, as `Queue.push` keeps a retry) is parked again when an earlier
    event's delivery joins the lane ahead of it (that event's fan-out run again, matching
    a callback registered since its run before): `Enter` keeps the job and its kept body
    for ever, as `Head` parks, so that neither expires while the lane is held."""
    project = "persist"
    event = EventJob(id="e2", project_id=project, event="BUILD_END", emitted_at=5)
    retry = dataclasses.replace(
        DeliveryJob.first(event, 1, b"x" * 2048, shared=True), order_key="b", lane="l"
    )
    await Queue(redis, keys).enqueue(retry, defer_s=5)
    job, kept = keys.arq_job(retry.job_id), body_key(keys, retry)
    assert await redis.pttl(job) > 0 and await redis.pttl(kept) > 0
    lane = keys.lane("l")
    await redis.zadd(lane, {retry.job_id: 2})
    await redis.zadd(keys.lanes_pending(project), {"persist:e1": 1})
    earlier = "persist:e1.1@4"
    enter = Enter.of(keys, project, "persist:e1", [(lane, earlier, b"{}")], progress_ttl=60,
                     now_ms=now_ms(), recheck_ms=now_ms(), last=True)  # fmt: skip
    *verdicts, _woken, _ended = await enter.run(redis)
    assert verdicts == [1]  # the earlier one heads the lane: attempted now
    assert await redis.zrange(lane, 0, -1) == [earlier.encode(), retry.job_id.encode()]
    assert await redis.zscore(keys.QUEUE, retry.job_id) is None
    assert await redis.pttl(job) == -1 and await redis.pttl(kept) == -1


@pytest.mark.parametrize("held", [False, True])
async def test_a_head_that_waits_is_kept_for_ever_though_a_failed_run_gave_it_a_day(
    redis: Redis, held: bool
) -> None:
    """A head whose earlier event is still to fan out (answer 2), or whose project is
    moving here (3), waits in the queue; a failed run before had put its job back with a
    day to live (`Claims.again`), and so had it its kept body. Waiting longer than that (an
    earlier event's fan-out held up, a move's hold), the job expired in the queue, was
    dropped unrun and stopped its lane: `Head` keeps what waits for ever, as it parks."""
    project, job_id = "waits", "waits:e1.1@5"
    job, body = keys.arq_job(job_id), keys.BODY_PREFIX + ":lane:waits:e1@5"
    await redis.set(job, b"{}", px=86_400_000)
    await redis.hset(body, mapping={"body": "x", job_id: 1})  # type: ignore[misc]
    await redis.pexpire(body, 86_400_000)
    await redis.zadd("lane-w", {job_id: 2})
    await redis.zadd(keys.lanes_pending(project), {"waits:e0": 1})  # e0: still to fan out
    await redis.zadd(keys.QUEUE, {"waits:e0": now_ms() + 60_000, job_id: 0})
    if held:
        await redis.set(keys.lanes_hold(project), 1)
    head = Head.of(keys, "lane-w", project, job_id, now_ms() + 50, now_ms() + 500, body=body)
    assert await head.run(redis) == (3 if held else 2)
    assert (await redis.pttl(job), await redis.pttl(body)) == (-1, -1)
    assert await redis.zscore(keys.QUEUE, job_id) is not None  # back in the queue, waiting


GONE_REASON = "job data gone when its lane's turn came"


def dropped_jobs() -> float:
    return REGISTRY.get_sample_value("dispatcher_deliveries_dropped_total", {"reason": "job"}) or 0


async def drops(redis: Redis, key: str = keys.DROPPED) -> list[tuple[str, str]]:
    """(jobId, reason) of each recorded drop (every project's, or those of one list),
    newest first."""
    entries = await redis.lrange(key, 0, -1)  # type: ignore[misc]  # sync|async
    return [(d.get("jobId"), d["reason"]) for d in map(orjson.loads, entries)]


async def held_lane(
    redis: Redis,
    slow: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
    steps: int,
    gate: tuple[asyncio.Event, asyncio.Event] | None = None,
) -> tuple[dict[str, bool], str, list[str]]:
    """Build b's `steps` events to an ordered callback whose first attempt of step 0 fails
    (its retry due in a minute), the others parked behind it: the receiver's switch, the
    lane, its members (progress ids, in order). With a `gate` (arrived, go), step 0's
    request once the switch is off sets `arrived` and is answered once `go` is set."""
    failing = {"on": True}

    async def handler(request: web.Request) -> web.StreamResponse:
        step = orjson.loads(await request.read())["data"]["step"]
        if gate is not None and not failing["on"] and step == 0:
            gate[0].set()
            await gate[1].wait()
        return web.Response(status=500 if failing["on"] and step == 0 else 200)

    url = receiver.script("/hook", handler)
    ordered = Options(order_by="buildId")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, options=ordered)
    await Producer(slow, redis).emit_many(
        [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(steps)]
    )
    await run_worker(slow, max_burst_jobs=steps)  # the fan-outs: step 0 failed, the rest parked
    lane = keys.lane(lane_id("demo", url, "buildId", "demo", "b"))
    members = [member.decode() for member in await redis.zrange(lane, 0, -1)]
    assert [m.partition(".")[0] for m in members] == [f"demo:e{s}" for s in range(steps)]
    return failing, lane, members


async def sweep(redis: Redis, settings: Settings, slot: int = 1) -> None:
    """The fleet's sweep of the one shard (one worker's turn, every 5 minutes)."""
    home = Services(settings, redis)
    duties = Duties(settings, home, [home], AttemptStats(), "t", lambda: Counts(0, 0, 0))
    await duties._sweep(home, slot=slot)


async def test_a_lanes_next_delivery_whose_job_is_gone_is_dropped_and_the_lane_goes_on(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Step 1's parked job is gone (an operator deleted it; an expiry of an earlier
    version): when step 0 ends, the release passes over it as a recorded drop and hands
    the lane to step 2. It used to find no data, leave step 1 at the head, and the lane
    stopped for good: step 2 and every later event of the build never sent (review)."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    failing, lane, (head, gone, _) = await held_lane(redis, slow, receiver, run_worker, 3)
    await redis.delete(keys.arq_job(gone))
    before = dropped_jobs()
    failing["on"] = False
    await redis.zadd(keys.QUEUE, {head: 0}, xx=True)  # step 0's retry, due now: it succeeds
    await run_worker(slow)
    assert numbers(receiver) == [("b", 0), ("b", 0), ("b", 2)]
    ends = [
        (r.event_id, r.status.value, r.final)
        for r in await all_records(redis, slow, receiver.url("/hook"))
    ]
    assert ends == [("e0", "FAILED", False), ("e0", "SUCCESS", True), ("e2", "SUCCESS", True)]
    assert await drops(redis) == [(gone, GONE_REASON)]
    assert await drops(redis, keys.dropped("demo")) == [(gone, GONE_REASON)]  # its project's
    assert dropped_jobs() == before + 1
    assert not await redis.exists(lane) and not await redis.zcard(keys.QUEUE)


async def test_a_heads_job_gone_in_the_queue_is_dropped_by_the_sweep_and_its_lane_goes_on(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Step 0's retry waits in the queue with a day to live past its due time (arq's
    rule, `Queue.push`); the fleet away longer, its data expires there. Claimed with no
    data, it is dropped unrun, but that drop cannot name its lane (it is in the gone
    bytes), so no release ran: the lane stopped for good behind it, step 1 never sent.
    The fleet's sweep finds the lane (on the blocked list: its head retried), drops the
    head on record and step 1 is due at once."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    _, lane, (head, parked) = await held_lane(redis, slow, receiver, run_worker, 2)
    assert await redis.zscore(keys.LANES_BLOCKED, lane) is not None
    await redis.delete(keys.arq_job(head))  # expired: a day past its due time
    await redis.zadd(keys.QUEUE, {head: 0}, xx=True)  # the fleet is back
    await run_worker(slow)
    assert await drops(redis) == [(head, "job data expired before it ran")]
    assert await redis.zrange(lane, 0, -1) == [head.encode(), parked.encode()]  # held
    before = dropped_jobs()
    await sweep(redis, slow)
    assert await drops(redis) == [(head, GONE_REASON), (head, "job data expired before it ran")]
    assert dropped_jobs() == before + 1
    assert await redis.zscore(keys.LANES_BLOCKED, lane) is None
    await run_worker(slow)
    assert numbers(receiver) == [("b", 0), ("b", 1)]
    assert not await redis.exists(lane)


async def test_a_poisoned_lane_member_is_dropped_by_the_sweep_and_its_lane_goes_on(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Step 1's job cannot be read (an older worker's, bytes damaged): step 0's release
    takes it, its worker leaves it to its lease, and the claim after records it as poison
    and ends the job, which cannot name its lane: the lane stopped for good, unlisted as
    blocked (its head never retried). The fleet's sweep walks every lane a page at a
    time: it drops step 1 on record, and step 2 is due at once."""
    slow = make_settings(redis_server.url, retry_schedule=(60.0,), lease_seconds=1)
    failing, lane, (head, poisoned, last) = await held_lane(redis, slow, receiver, run_worker, 3)
    await redis.set(keys.arq_job(poisoned), b"\x80not a job")
    failing["on"] = False
    await redis.zadd(keys.QUEUE, {head: 0}, xx=True)
    await run_worker(slow)  # step 0 sent; step 1 taken, left to its lease, then poison
    poison = [orjson.loads(p)["jobId"] for p in await redis.lrange(keys.POISON_JOBS, 0, -1)]  # type: ignore[misc]
    assert poison == [poisoned]
    assert await redis.zrange(lane, 0, -1) == [poisoned.encode(), last.encode()]
    assert await redis.zscore(keys.LANES_BLOCKED, lane) is None
    await sweep(redis, slow)
    assert await drops(redis) == [(poisoned, GONE_REASON)]
    await run_worker(slow)
    assert numbers(receiver) == [("b", 0), ("b", 0), ("b", 2)]
    assert not await redis.exists(lane)


async def test_a_release_waits_for_a_next_delivery_its_events_fan_out_still_runs(
    redis: Redis,
) -> None:
    """A lane's member with no job of its own may be one its event's fan-out attempts now
    (a head when it entered, an earlier event's delivery put ahead of it since): the
    release leaves it to that fan-out, whose attempt releases it. Once the event's job is
    gone too, its turn can never come: the release drops it on record and goes on."""
    lane, first, running, after = keys.lane("l"), "p:e1.1@5", "p:e2.1@6", "p:e3.1@7"
    await redis.zadd(lane, {first: 1, running: 2, after: 3})
    await redis.set(keys.arq_job("p:e2"), b"{}")  # e2's fan-out job: it runs
    await redis.set(keys.arq_job(after), b"{}")  # parked
    release = Release.of(keys, lane, "p", first, token="", lease_ms=1000, now_ms=5,
                         recheck_ms=5, progress_ttl=600)  # fmt: skip
    assert await release.run(redis) == 0
    assert await redis.zrange(lane, 0, -1) == [running.encode(), after.encode()]
    assert not await redis.llen(keys.DROPPED)  # type: ignore[misc]  # sync|async
    await redis.delete(keys.arq_job("p:e2"))  # its fan-out ended (dropped, say): gone
    assert await release.run(redis) == [b"lane:skipped", 1]
    assert await redis.zrange(lane, 0, -1) == [after.encode()]
    assert await redis.zscore(keys.QUEUE, after) == 5  # due now, its turn's check to come
    assert await drops(redis) == [(running, GONE_REASON)]


async def test_a_heads_attempt_in_flight_is_not_dropped_when_its_job_data_expires(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A claim does not extend a job's data: step 0's retry, claimed just before its day
    past its due time ends, has its data expire while its request is in flight. The
    fleet's sweep used to find its job gone (and its event's), drop it on record and make
    step 1 due: step 0 then succeeded too (a success and a drop), step 1 sent while step 0
    was in flight (review). Its lease says it runs: the sweep leaves it, and its release
    hands the lane to step 1 once it ends."""
    arrived, go = asyncio.Event(), asyncio.Event()
    slow = make_settings(redis_server.url, retry_schedule=(60.0,))
    failing, lane, (head, parked) = await held_lane(
        redis, slow, receiver, run_worker, 2, gate=(arrived, go)
    )
    failing["on"] = False
    await redis.zadd(keys.QUEUE, {head: 0}, xx=True)
    worker = asyncio.ensure_future(run_worker(slow))
    try:
        await asyncio.wait_for(arrived.wait(), 30)  # step 0's request is in flight
        await redis.delete(keys.arq_job(head))  # its data's day is over
        await sweep(redis, slow)
        assert await drops(redis) == []
        assert await redis.zrange(lane, 0, -1) == [head.encode(), parked.encode()]
        assert await redis.zscore(keys.QUEUE, parked) is None  # step 1 still parked
    finally:
        go.set()
        await worker
    assert numbers(receiver) == [("b", 0), ("b", 0), ("b", 1)]
    found = await all_records(redis, slow, receiver.url("/hook"))
    ends = [(r.event_id, r.status.value) for r in found]
    assert ends == [("e0", "FAILED"), ("e0", "SUCCESS"), ("e1", "SUCCESS")]
    assert await drops(redis) == [] and not await redis.exists(lane)


@pytest.mark.parametrize("alive", ["leased", "queued", "fan-out leased", "fan-out queued"])
async def test_the_sweep_leaves_a_head_without_job_data_that_is_leased_or_queued(
    redis: Redis, settings: Settings, alive: str
) -> None:
    """A head with no job data is alive while its lease (or its event's fan-out job's)
    says a worker runs it, or while it is in the queue (its claim ends it): the sweep
    drops nothing and queues nothing behind it. Once neither holds, it is dropped."""
    lane, head, after = keys.lane("alive"), "p:e1.1@5", "p:e2.1@6"
    await redis.zadd(lane, {head: 1, after: 2})
    await redis.set(keys.arq_job(after), b"{}")
    holder = head if alive in ("leased", "queued") else "p:e1"
    if alive.endswith("leased"):
        await redis.set(keys.ARQ_IN_PROGRESS_PREFIX + holder, "w")
    else:
        await redis.zadd(keys.QUEUE, {holder: now_ms() + 60_000})
    await sweep(redis, settings)
    assert await drops(redis) == []
    assert await redis.zscore(keys.QUEUE, after) is None
    await redis.delete(keys.ARQ_IN_PROGRESS_PREFIX + holder)
    await redis.zrem(keys.QUEUE, holder)
    await sweep(redis, settings, slot=2)
    assert await drops(redis) == [(head, GONE_REASON)]
    assert await redis.zscore(keys.QUEUE, after) is not None


async def test_a_dropped_member_is_done_off_the_waiting_set_and_gives_back_its_body(
    redis: Redis,
) -> None:
    """A member a release drops (its job gone) is marked done, so a late copy of its
    event's `Enter` leaves it out of its lane; it leaves its project's waiting set (no
    later wake-up finds it) and gives back its reference to its event's kept body (the
    last one out: the body goes)."""
    lane, first, gone, after = keys.lane("l"), "p:e1.1@5", "p:e2.1@6", "p:e3.1@7"
    await redis.zadd(lane, {first: 1, gone: 2, after: 3})
    await redis.set(keys.arq_job(after), b"{}")
    await redis.zadd(keys.lanes_waiting("p"), {gone: 2})
    body = keys.BODY_PREFIX + ":lane:p:e2@6"
    await redis.hset(body, mapping={"body": "x", gone: 1})  # type: ignore[misc]
    release = Release.of(keys, lane, "p", first, token="", lease_ms=1000, now_ms=5,
                         recheck_ms=5, progress_ttl=600)  # fmt: skip
    assert await release.run(redis) == [b"lane:skipped", 1]
    assert await redis.get(keys.delivery(gone)) == b"done"
    assert 0 < await redis.ttl(keys.delivery(gone)) <= 600
    assert await redis.zscore(keys.lanes_waiting("p"), gone) is None
    assert not await redis.exists(body)
    await redis.zadd(keys.lanes_ready("p"), {"p:e2": 2})  # its event's entry, sent again late
    enter = Enter.of(keys, "p", "p:e2", [(lane, gone, b"{}")], progress_ttl=600, now_ms=5,
                     recheck_ms=5, last=True)  # fmt: skip
    assert (await enter.run(redis))[0] == 3  # left alone
    assert await redis.zrange(lane, 0, -1) == [after.encode()]


async def test_the_sweep_of_a_cluster_shard_unblocks_drops_and_gives_back(
    redis_cluster: LocalCluster,
) -> None:
    """On a Redis Cluster, `SCAN` goes to every master and answers a cursor per node: the
    sweep's `int(cursor)` raised after its lanes' script, so its drops were never counted
    nor logged, its pass never went past the first page, and the kept bodies' dangling
    references were never given back there (review). Each shard's keys share one hash
    slot: the sweep scans the node that owns it."""
    redis_cluster.flush()
    settings = make_settings(redis_cluster.url, redis_cluster_shards=4)
    shards = shards_of(settings)[1:3]  # two shards, on two masters
    clients = connect_shards(settings, shards)
    try:
        for shard, client in zip(shards, clients, strict=True):
            await gone_heads(client, shard.keys)
        for shard, client in zip(shards, clients, strict=True):
            k, before = shard.keys, dropped_jobs()
            services = Services(settings, client, shard)
            stats = AttemptStats()
            duties = Duties(settings, services, [services], stats, "t", lambda: Counts(0, 0, 0))
            await duties._sweep(services, slot=1)
            for key in (k.DROPPED, k.dropped("p")):  # every project's, and p's own (its tag)
                found = await client.lrange(key, 0, -1)  # type: ignore[misc]  # sync|async
                assert sorted(orjson.loads(d)["jobId"] for d in found) == ["p:e1.1@5", "p:e3.2@7"]
            assert dropped_jobs() == before + 2
            assert not await client.zcard(k.LANES_BLOCKED)
            assert await client.zscore(k.QUEUE, "p:e2.1@6") is not None
            assert await client.zscore(k.QUEUE, "p:e4.2@8") is not None
            assert not await client.exists(k.BODY_PREFIX + ":lane:p:e9@9")
    finally:
        await close_all(clients)


async def gone_heads(redis: Redis, k: Keys) -> None:
    """A blocked lane and an unlisted one of project p's, each with a head whose job is
    gone and a parked delivery behind it; an empty lane listed as blocked; a kept body
    whose job is gone."""
    listed, unlisted = (k.lane(lane_id("p", "http://x/", "o", "p", n)) for n in ("1", "2"))
    await redis.zadd(listed, {"p:e1.1@5": 1, "p:e2.1@6": 2})
    await redis.zadd(unlisted, {"p:e3.2@7": 1, "p:e4.2@8": 2})
    for parked in ("p:e2.1@6", "p:e4.2@8"):
        await redis.set(k.arq_job(parked), b"{}")
    await redis.zadd(k.LANES_BLOCKED, {listed: 1, k.lane("empty"): 2})
    body = k.BODY_PREFIX + ":lane:p:e9@9"
    await redis.hset(body, mapping={"body": "x", "p:e9.1@9": 1})  # type: ignore[misc]


async def test_the_workers_sweeps_go_on_with_one_pass_over_the_lanes(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep reads a page of every lane a turn, on from where the last one stopped;
    the turns go to whichever worker takes them, each sweep here a new worker's. The
    cursor was each process's own, starting at 0 in a new one: a pass might never reach
    the keyspace's end, and a stopped lane unlisted as blocked never be found (review).
    It is kept in Redis, per shard: the workers' sweeps make one pass together, and it
    finds every lane."""
    monkeypatch.setattr(duties_module, "LANES_PAGE", 5)
    lanes = [keys.lane(f"many{n}") for n in range(60)]
    for n, lane in enumerate(lanes):
        await redis.zadd(lane, {f"p:e{n}.1@5": 1})  # its head's job gone, unlisted
    sweeps = 0
    for slot in range(1, 200):
        await sweep(redis, settings, slot=slot)  # each a new Duties: another worker's turn
        sweeps += 1
        if await redis.get(keys.sweep_cursor("lanes")) in (None, b"0"):
            break
    assert sweeps > 1  # more than one page: a pass shared by the sweeps
    assert not [lane for lane in lanes if await redis.exists(lane)]
    assert len(await drops(redis)) == len(lanes)


async def test_a_head_waiting_for_an_earlier_event_lists_its_lane_blocked_until_it_ends(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """e1's delivery heads its lane but waits for e0, still queued (its fan-out due in an
    hour: a backlog, a fan-out failing again and again). The lane is listed blocked from
    its first wait (`Enter`'s, then `Head`'s at each look, the time kept), so `dispatcher
    status` and `DispatcherLaneBlocked` see it; only a head's retries listed it, and a lane
    held for hours by an earlier event was counted nowhere (review). Once e0 is fanned out
    and both are delivered, the lane is listed no more."""
    settings = make_settings(redis_server.url)
    url = receiver.url()
    ordered = Options(order_by="buildId")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, options=ordered)
    await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"buildId": "b", "step": s}, f"e{s}") for s in range(2)]
    )
    await redis.zadd(keys.QUEUE, {"demo:e0": now_ms() + 3_600_000})  # e0 fans out later
    await run_worker(settings, max_burst_jobs=1)  # e1's fan-out: its delivery waits (Enter)
    lane = keys.lane(lane_id("demo", url, "buildId", "demo", "b"))
    since = await redis.zscore(keys.LANES_BLOCKED, lane)
    assert since is not None
    (waiting,) = await redis.zrange(lane, 0, -1)
    await redis.zadd(keys.QUEUE, {waiting: 0}, xx=True)  # its look at its turn, now
    await run_worker(settings, max_burst_jobs=1)  # it waits again (Head)
    assert await redis.zscore(keys.LANES_BLOCKED, lane) == since  # blocked since the first
    lanes = await read_lanes(redis, keys)
    assert (lanes.blocked, lanes.shown[0].head) == (1, waiting.decode().partition("@")[0])
    assert not receiver.requests()

    await redis.zadd(keys.QUEUE, {"demo:e0": 0}, xx=True)
    await redis.zadd(keys.QUEUE, {waiting: now_ms() + 3_600_000}, xx=True)  # woken by e0
    await run_worker(settings)
    assert numbers(receiver) == [("b", 0), ("b", 1)]
    assert not await redis.zcard(keys.LANES_BLOCKED)
