"""Projects spread over shards, on two independent redis-servers and on a 3-master Redis
Cluster: the seeds' contract, many projects with a platform-wide callback, the operator's
views, a worker's fair turns, and the guard against a reordered list."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis
from typer.testing import CliRunner

from dispatcher.api import create_app
from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.connections import REDIS_ERRORS, connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidInput, InvalidSetting
from dispatcher.history.record import AttemptRecord
from dispatcher.history.shipper import Shipper
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, DeliveryStatus, HistoryPage, Region
from dispatcher.placement import MOVING, rendezvous
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shard import ID_SPAN
from dispatcher.shards import views
from dispatcher.shards.router import Router
from dispatcher.stopping import cancel_all
from dispatcher.topology import Checked, check_shards
from dispatcher.worker import create_worker
from tests.cluster import LocalCluster, grown
from tests.helpers import UID, Receiver, all_records, answer, free_port, make_settings
from tests.service.test_history import URL, record

OP_TOKEN = "op-secret"
OPERATOR = {"X-DEVOPS-OPERATOR-TOKEN": OP_TOKEN}
PROJECTS = [f"proj-{n}" for n in range(8)]


@pytest.fixture(params=["servers", "cluster"])
async def sharded(
    request: pytest.FixtureRequest, shard_servers: list[EmbeddedRedis], redis_cluster: LocalCluster
) -> Settings:
    """Settings of one topology, its servers empty, every shard in use: two redis-servers,
    or four shards on the session's cluster (slots 0, 8192, 4096, 12288: each master has
    one or two)."""
    if request.param == "servers":
        return await two_servers(shard_servers, operator_token=OP_TOKEN)
    redis_cluster.flush()
    settings = make_settings(redis_cluster.url, redis_cluster_shards=4, operator_token=OP_TOKEN)
    return await grown(settings)


async def two_servers(servers: list[EmbeddedRedis], **overrides: Any) -> Settings:
    """Settings of the two shard servers, emptied, both in use."""
    for server in servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in servers]
    return await grown(make_settings(urls[0], redis_shards=urls, **overrides))


@asynccontextmanager
async def api_of(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app on every shard of `settings` (its own clients), over ASGI."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            yield client


async def ok(response: httpx.Response) -> Any:
    """The seeds' envelope of a success: status 0, no message, the data."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"data", "message", "status"} and body["status"] == 0
    return body["data"]


async def one_project_per_shard(
    router: Router, settings: Settings, receiver: Receiver, *, events: int
) -> dict[int, str]:
    """A project on each shard (by shard), with a callback at `/<project>`, and `events`
    events of each queued."""
    on = {router.of(p).shard.index: p for p in PROJECTS}
    for project in on.values():
        registration = Registration(project, receiver.url(f"/{project}"), Region.DEVNET, "t")
        await router.of(project).register(registration, "BUILD_END")
    async with Producer(settings) as producer:
        await producer.emit_many([(p, "BUILD_END", {}) for p in on.values()] * events)
    return on


async def drain(settings: Settings) -> None:
    """A burst worker over every shard until every queue is empty."""
    worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        await asyncio.wait_for(worker.main(), timeout=30)
    finally:
        await worker.close()


async def test_the_seed_contract_holds_on_every_shard(
    sharded: Settings, receiver: Receiver
) -> None:
    async with Router.open(sharded) as router:
        shards = {router.of(p).shard.index for p in PROJECTS}
    assert len(shards) >= 2, "the projects should spread over the shards"
    async with api_of(sharded) as api:
        for project in PROJECTS:
            base = f"/apigw/v4/projects/{project}/callbacks"
            url = receiver.url(f"/{project}")
            query = {"url": url, "region": "DEVNET", "secretToken": "tok"}
            one = {**query, "event": "BUILD_END"}
            assert await ok(await api.post(base, params=one, headers=UID)) is True
            many = {**query, "event": "BUILD_START, NOPE"}
            batch = await ok(await api.post(f"{base}/batch", params=many, headers=UID))
            assert batch["successEvents"] == ["BUILD_START"] and "NOPE" in batch["failureEvents"]
            listed = await ok(await api.get(base, headers=UID))
            assert listed["count"] == 2
        async with Producer(sharded) as producer:  # many projects in one call
            await producer.emit_many([(p, "BUILD_END", {"n": p}) for p in PROJECTS])
        await drain(sharded)
        for project in PROJECTS:
            page = await ok(await api.get(
                f"/ms/openapi/api/apigw/v3/projects/{project}/callbacks/history",
                params={"url": receiver.url(f"/{project}"), "event": "BUILD_END"}, headers=UID,
            ))  # fmt: skip
            assert page["count"] == 1 and page["records"][0]["projectId"] == project
            assert page["records"][0]["status"] == "SUCCESS"
            bad = await api.get(
                f"/ms/openapi/api/apigw/v3/projects/{project}/callbacks/history",
                params={"url": "x", "event": "BUILD_END", "startTime": "yesterday"},
                headers=UID,
            )
            assert bad.status_code == 400 and bad.json()["data"] is None


async def test_many_projects_reach_a_platform_wide_callback_once_each(
    sharded: Settings, receiver: Receiver
) -> None:
    platform_url = receiver.url("/platform")
    async with api_of(sharded) as api:
        await ok(await api.post("/operator/callbacks", headers=OPERATOR, params={
            "url": platform_url, "event": "BUILD_END", "region": "DEVNET",
        }))  # fmt: skip
        for project in PROJECTS:  # receiver controls too: their scripts run on each shard
            limits: dict[str, str | int] = {
                "maxInFlight": 3, "maxPerSecond": 1000, "filter": "event == 'BUILD_END'"
            }  # fmt: skip
            await ok(await api.post(f"/apigw/v4/projects/{project}/callbacks", headers=UID,
                                    params={"url": receiver.url(f"/{project}"), **limits,
                                            "event": "BUILD_END", "region": "DEVNET"}))  # fmt: skip
        async with Producer(sharded) as producer:
            ids = await producer.emit_many([(p, "BUILD_END", {}) for p in PROJECTS])
        await drain(sharded)
        # the platform-wide callback: one delivery of every project's event, none twice
        seen = receiver.requests("/platform")
        assert sorted(orjson.loads(r.body)["projectId"] for r in seen) == sorted(PROJECTS)
        delivery_ids = [r.headers["X-DEVOPS-DELIVERY-ID"] for r in seen]
        assert len(set(delivery_ids)) == len(PROJECTS)
        assert {orjson.loads(r.body)["data"] == {} for r in seen} == {True}
        for project in PROJECTS:
            assert len(receiver.requests(f"/{project}")) == 1
        listed = await ok(await api.get("/operator/callbacks", headers=OPERATOR))
        assert listed["count"] == 1 and listed["records"][0]["enabled"] is True
    async with Router.open(sharded) as router:
        # one id on every shard, every shard holding a copy
        copies = {s.shard.index: await s.registry.get(listed["records"][0]["id"])
                  for s in router.shards}  # fmt: skip
        assert len(copies) == len(router.shards)
        merged = await views.history_page(router, PLATFORM_PROJECT, platform_url, "BUILD_END")
        # every shard's attempts, one success per delivery (a slow machine may add a retry)
        assert merged.count == len(merged.records) >= len(PROJECTS)
        succeeded = [r for r in merged.records if r.status is DeliveryStatus.SUCCESS]
        assert sorted(r.delivery_id or "" for r in succeeded) == sorted(delivery_ids)
        status = await views.status(router)
        assert status.queue_due == 0 and status.disabled == 0
        assert await views.dead_letters(router) == []
    assert len(ids) == len(PROJECTS)
    if sharded.redis_shards is None:  # the cluster: every key carries a shard's hash tag
        await _every_key_tagged(sharded)


async def _every_key_tagged(settings: Settings) -> None:
    async with Router.open(settings) as router:
        found = [key async for key in router.home.redis.scan_iter(count=1000)]
    assert found
    untagged = [key for key in found if not key.startswith(b"{d")]
    assert untagged == []


async def test_dead_letters_and_failing_callbacks_cover_every_shard(
    sharded: Settings, receiver: Receiver
) -> None:
    gone = receiver.script("/dead", answer(500))
    sharded = sharded.model_copy(update={"circuit_threshold": 1000})  # one host fails all
    async with Router.open(sharded) as router:
        for project in PROJECTS[:4]:
            await router.of(project).register(
                Registration(project, gone, Region.DEVNET, "t"), "BUILD_END"
            )
        async with Producer(sharded) as producer:
            await producer.emit_many([(p, "BUILD_END", {}) for p in PROJECTS[:4]])
        await drain(sharded)
        dead = await views.dead_letters(router)
        assert sorted(r.project_id for r in dead) == sorted(PROJECTS[:4])
        failing = await views.failing(router)
        assert (failing.total, failing.projects, len(failing.shown)) == (4, 4, 4)
        shards = {router.of(p).shard.index for p in PROJECTS[:4]}
        assert len(shards) >= 2


async def test_a_worker_takes_turns_between_shards(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    settings = await two_servers(shard_servers, worker_max_jobs=4)
    async with Router.open(settings) as router:
        busy = next(p for p in (f"busy-{n}" for n in range(50)) if router.of(p).shard.index == 0)
        quiet = next(p for p in (f"quiet-{n}" for n in range(50)) if router.of(p).shard.index == 1)
        for project in (busy, quiet):
            registration = Registration(project, receiver.url(f"/{project}"), Region.DEVNET, "t")
            await router.of(project).register(registration, "BUILD_END")
        async with Producer(settings) as producer:
            await producer.emit_many([(busy, "BUILD_END", {"n": n}) for n in range(60)])
            await producer.emit_many([(quiet, "BUILD_END", {"n": n}) for n in range(4)])
    await drain(settings)
    order = [r.path for r in receiver.seen]
    assert order.count(f"/{busy}") == 60 and order.count(f"/{quiet}") == 4
    last_quiet = max(i for i, path in enumerate(order) if path == f"/{quiet}")
    assert last_quiet < 30, "the quiet shard's events waited behind the busy shard's"


async def test_a_full_project_is_claimed_for_as_its_jobs_end_with_an_empty_shard_beside(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A project at its share of a worker's slots on one shard, nothing on the other: the
    wakes its jobs' ends give reach the claim loop across the empty shard's claims, so 40
    deliveries take well under a second, never a poll interval (a minute here). (The
    wake lost to the next shard's claim needs jobs to end during a claim's round trip:
    this run does not make it happen on demand; `tests/unit/test_shares.py` pins the
    shares' side.)"""
    settings = await two_servers(shard_servers, worker_max_jobs=8)
    async with Router.open(settings) as router:
        busy = next(p for p in (f"busy-{n}" for n in range(50)) if router.of(p).shard.index == 0)
        registration = Registration(busy, receiver.url(f"/{busy}"), Region.DEVNET, "t")
        await router.of(busy).register(registration, "BUILD_END")
        async with Producer(settings) as producer:
            await producer.emit_many([(busy, "BUILD_END", {"n": n}) for n in range(40)])
    worker = create_worker(settings, poll_delay=60, handle_signals=False)
    main = asyncio.create_task(worker.main())
    try:
        await receiver.wait_for(40, f"/{busy}", within=20)
    finally:
        worker.stop()
        await main
        await worker.close()


async def test_a_worker_serves_only_the_shards_it_is_given(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    settings = await two_servers(shard_servers)
    async with Router.open(settings) as router:
        on = await one_project_per_shard(router, settings, receiver, events=1)
        await drain(settings.model_copy(update={"worker_shards": [1]}))
        assert receiver.requests(f"/{on[1]}") and not receiver.requests(f"/{on[0]}")
        assert (await router.shards[0].queue.depth())[0] == 1


async def test_a_reordered_list_of_shards_is_refused(shard_servers: list[EmbeddedRedis]) -> None:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    settings = make_settings(urls[0], redis_shards=urls)
    (warning,) = (await check_shards(settings)).warnings  # a new shard takes no project until grown
    assert "2 shards are listed, 1 in use" in warning
    assert await check_shards(await grown(settings)) == Checked()
    with pytest.raises(InvalidSetting) as refused:
        await check_shards(make_settings(urls[1], redis_shards=urls[::-1]))
    assert refused.value.param == "DISPATCHER_REDIS_SHARDS"


async def test_a_refused_list_leaves_no_mark_that_refuses_the_corrected_one(
    shard_servers: list[EmbeddedRedis], tmp_path: Path
) -> None:
    """A new server listed before an old one: the list is refused as reordered. It marked
    the new server first, so the corrected list (the new one last) was refused too until
    someone deleted the mark by hand (review). The marks are all read before any is
    written."""
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    a, b = (server.url for server in shard_servers)
    await check_shards(make_settings(a, redis_shards=[a, b]))
    with EmbeddedRedis(tmp_path, persist=False) as new:
        with pytest.raises(InvalidSetting, match="reordered"):
            await check_shards(make_settings(a, redis_shards=[a, new.url, b]))
        assert sync_redis.Redis.from_url(new.url).dbsize() == 0
        await check_shards(make_settings(a, redis_shards=[a, b, new.url]))


async def test_postgresql_history_takes_every_shards_stream_into_one_database(
    shard_servers: list[EmbeddedRedis], pg_url: str, receiver: Receiver
) -> None:
    settings = await two_servers(shard_servers, history_url=pg_url)
    async with Router.open(settings) as router:
        on = await one_project_per_shard(router, settings, receiver, events=3)
        await drain(settings)  # its shippers ship each shard's stream, under its own lock
        for services in router.shards:  # what they left, if anything
            shipper = Shipper(services.redis, settings, services.shard, elect=False)
            await shipper.open()
            try:
                await shipper.drain()
            finally:
                await shipper.close()
            assert (await services.history.backlog())[0] == 0
        for index, project in on.items():
            page = await router.of(project).history_page(project, receiver.url(f"/{project}"),
                                                         "BUILD_END")  # fmt: skip
            assert page.count == 3
            assert {r.id // ID_SPAN for r in page.records} == {index}  # ids from its range


async def test_ordered_lanes_live_on_each_project_shard(
    sharded: Settings, receiver: Receiver
) -> None:
    """A platform-wide callback and the projects' own, ordered by build, on every shard
    (the cluster: every lane script keeps to its shard's slot); every other request fails,
    and each project's steps still succeed in order at both (one whose retries all failed
    is skipped)."""
    fails = [answer(500), answer(200)] * (len(PROJECTS) * 20)  # never runs out
    order: dict[str, str | int] = {"event": "BUILD_END", "region": "DEVNET", "orderBy": "buildId"}
    async with api_of(sharded) as api:
        platform = receiver.script("/platform", *fails)
        await ok(await api.post("/operator/callbacks", headers=OPERATOR,
                                params={"url": platform, **order}))  # fmt: skip
        for project in PROJECTS:
            url = receiver.script(f"/{project}", *fails)
            await ok(await api.post(f"/apigw/v4/projects/{project}/callbacks", headers=UID,
                                    params={"url": url, **order}))  # fmt: skip
    steps = range(4)
    async with Producer(sharded) as producer:
        await producer.emit_many(
            [(p, "BUILD_END", {"buildId": "b", "step": s}) for s in steps for p in PROJECTS]
        )
    await drain(sharded)
    for path in ["/platform", *(f"/{p}" for p in PROJECTS)]:
        firsts: dict[str, list[int]] = {}
        for seen, status in zip(receiver.requests(path), [500, 200] * len(fails), strict=False):
            body = orjson.loads(seen.body)
            mine = firsts.setdefault(body["projectId"], [])
            if status == 200 and body["data"]["step"] not in mine:
                mine.append(body["data"]["step"])
        assert all(got == sorted(got) for got in firsts.values()), (path, firsts)
        assert len(firsts) == (len(PROJECTS) if path == "/platform" else 1)
        tried = {(orjson.loads(r.body)["projectId"], orjson.loads(r.body)["data"]["step"])
                 for r in receiver.requests(path)}  # fmt: skip
        assert len(tried) == len(firsts) * len(steps)  # every step was tried


async def test_a_sharded_producer_closes_however_its_placement_refresh_is_caught(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A producer of a sharded fleet refreshes the placements in the background; closing
    it stops that task. A cancel landing inside the Redis client's read could be lost
    there, and the close then waited for ever (2 closes in 53 hung, refreshing every ms).
    The task is now cancelled until it ends: 80 closes, each in time."""
    urls = [server.url for server in shard_servers]
    settings = make_settings(urls[0], redis_shards=urls, placement_refresh=0.001)
    for i in range(80):
        async with asyncio.timeout(5):
            async with Producer(settings):
                await asyncio.sleep(0.003 * (i % 7))


async def test_cancel_all_ends_a_task_that_swallows_its_first_cancel() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as the Redis client's read can

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_all([task])
    assert task.cancelled() and swallowed == 1


async def test_the_consoles_forms_refuse_changes_while_a_project_moves(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The console's forms wrote to a moving project's old shard, which the move then
    cleared: a rotation of a leaked secret, or a disable, answered done and was lost
    (review). They answer 503, as the API does, and change nothing."""
    settings = await two_servers(shard_servers)
    on = rendezvous("victim", 2)
    base = "/apigw/v4/projects/victim/callbacks"
    async with api_of(settings) as api:
        registered = await api.post(
            base, params={"event": "BUILD_END", "region": "DEVNET", "url": "https://e.com/h"},
            headers=UID,
        )  # fmt: skip
        assert registered.json()["data"] is True
        [callback] = (await ok(await api.get(base, headers=UID)))["records"]
    home = sync_redis.Redis.from_url(shard_servers[0].url)
    home.hset(Keys().PLACEMENT, "victim", f"{on}{MOVING}{1 - on}")  # a move under way
    home.incr(Keys().PLACEMENT_VERSION)
    home.close()
    page = f"/console/projects/victim/callbacks/{callback['id']}"
    async with api_of(settings) as api:
        form = await api.get("/console/projects/victim", headers=UID)
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text
        data = {"csrf_token": token.group(1), "secretToken": "new-secret", "reason": "leaked",
                "url": "https://e.com/new", "event": "BUILD_START"}  # fmt: skip
        answers = [
            await api.post(path, data=data, headers=UID)
            for path in (f"{page}/secret", f"{page}/disable", f"{page}/enable",
                         "/console/projects/victim/callbacks")
        ]  # fmt: skip
        after = (await ok(await api.get(base, headers=UID)))["records"]
    assert [a.status_code for a in answers] == [503] * 4
    assert all("is moving to another shard" in a.text for a in answers)
    assert [(cb["enabled"], cb["rotationEndTime"], cb["url"]) for cb in after] == [
        (True, None, "https://e.com/h")
    ]


async def test_a_redelivery_refused_as_its_project_moves_gives_back_its_cost(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A single redelivery refused because its project moves (503, before anything is
    queued) gives back what it paid, on the API's route and the console's: each try again
    "in a minute" cost a whole body of the project's share, and three left it refused (429)
    once the move ended (review). Once moved, it is queued as paid for."""
    settings = await two_servers(
        shard_servers,
        api_max_body_bytes=16 * 1024,
        emit_batch_max_bytes=32 * 1024,
        emit_batch_max_events=32,
        emit_project_rate=1024,
        emit_project_burst=64 * 1024,
        max_request_body=30 * 1024,
        retry_schedule=(),
    )
    on = rendezvous("victim", 2)
    receiver.script("/hook", answer(400))
    async with Router.open(settings) as router:
        registration = Registration("victim", receiver.url("/hook"), Region.DEVNET, "t")
        await router.of("victim").register(registration, "BUILD_END")
    async with Producer(settings) as producer:
        await producer.emit("victim", "BUILD_END", {"n": 1})
    await drain(settings)
    async with Router.open(settings) as router:
        shard = router.of("victim").redis
        [record] = await all_records(shard, settings, receiver.url("/hook"), "victim")
    home = sync_redis.Redis.from_url(shard_servers[0].url)
    home.hset(Keys().PLACEMENT, "victim", f"{on}{MOVING}{1 - on}")  # a move under way
    home.incr(Keys().PLACEMENT_VERSION)
    retry = f"/apigw/v4/projects/victim/callbacks/history/{record.id}/retry"
    async with api_of(settings) as api:
        form = (await api.get("/console/projects/victim", headers=UID)).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None
        console = f"/console/projects/victim/history/{record.id}/redeliver"
        moving = [(await api.post(retry, headers=UID)).status_code for _ in "abc"]
        moving += [
            (await api.post(console, data={"csrf_token": token[1]}, headers=UID)).status_code
            for _ in "abc"
        ]
        home.hdel(Keys().PLACEMENT, "victim")  # the move ended where it began
        home.incr(Keys().PLACEMENT_VERSION)
        home.close()
        await asyncio.sleep(3 * settings.placement_refresh)
        moved = [(await api.post(retry, headers=UID)).status_code for _ in "abc"]
    assert moving == [503] * 6
    assert moved == [200, 200, 429]


async def test_platform_callbacks_failing_on_two_shards_are_counted_once_in_a_short_listing(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """10 platform-wide callbacks failing on both shards: listed 5 at a time
    (`--project DEVOPS_ALL_PROJECT --limit 5`), the count is 10. Each shard read the 5 it
    showed, and the merge took the 10 it counted on each less those read twice: 15
    (review)."""
    settings = await two_servers(shard_servers)
    async with Router.open(settings) as router:
        ids = []
        for n in range(10):
            registration = Registration(
                PLATFORM_PROJECT, f"https://p.example/{n}", Region.DEVNET, "t"
            )
            ids.append(await router.platform.register(registration, "BUILD_END"))
        for shard in router.shards:
            for times, cid in enumerate(ids, 1):
                for _ in range(times):
                    await shard.health.failed(cid, "HTTP 500")
        found = await views.failing(router, PLATFORM_PROJECT, rows=5)
        ((group,),) = [found.groups]
        assert (group.count, len(group.shown), found.total) == (10, 5, 10)
        assert [f.callback_id for f in group.shown] == ids[:-6:-1]  # the most failures


async def test_the_platforms_merged_history_checks_its_page_and_bounds_its_depth(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform's history merged over two shards (`dispatcher history --project
    DEVOPS_ALL_PROJECT`) refuses a page or page size below 1 as one shard does: a page size
    of 0 divided by zero, a page of 0 or less was an empty page (review). A page deeper than
    `SPREAD_DEPTH` records (each shard's newest read down to it, in memory) is a 400; one
    past the end is empty, with the count, whatever its depth."""
    monkeypatch.setattr(views, "SPREAD_DEPTH", 6)
    settings = await two_servers(shard_servers, history_max_page_size=3)
    now = now_ms()
    async with Router.open(settings) as router:
        written = []
        for i, services in enumerate(router.shards):
            for n in range(5):
                at = now - 10_000 + 10 * n + i
                platform: AttemptRecord = {**record(at, n=n), "projectId": PLATFORM_PROJECT}
                written.append((at, await services.history.add(platform)))
        newest = [record_id for _, record_id in sorted(written, reverse=True)]

        async def page(number: int, size: int = 3) -> HistoryPage:
            return await views.history_page(
                router, PLATFORM_PROJECT, URL, "BUILD_END", page=number, page_size=size
            )

        for number, size, param in [(0, 3, "page"), (-1, 3, "page"), (1, 0, "pageSize")]:
            with pytest.raises(InvalidInput) as refused:
                await page(number, size)
            assert refused.value.param == param
        first, second = await page(1, 20), await page(2)  # (20: capped to 3)
        assert [r.id for r in first.records + second.records] == newest[:6]
        assert (second.count, second.total_pages, second.page_size) == (10, 4, 3)
        for deeper in (3, 4):  # records 7-9, 10: each shard's newest 9 or 12 read
            with pytest.raises(InvalidInput, match="past the newest 6 records") as refused:
                await page(deeper)
            assert refused.value.param == "page"
        past = await page(5)
        assert (past.count, past.total_pages, past.records) == (10, 4, [])


def no_cluster_answers() -> str:
    """A cluster URL none of whose nodes listens (two ports found free, then left closed)."""
    return f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/"


async def test_a_cluster_none_of_whose_nodes_answers_is_an_outage() -> None:
    """Every caller waits out a `ConnectionError` (`connections.REDIS_ERRORS`): a cluster
    none of whose nodes answers raises one, as a single Redis does. redis-py's own
    `RedisClusterException` stopped a worker and the API with a traceback (review)."""
    url = no_cluster_answers()
    redis = connect(make_settings(url, redis_timeout=1), url)
    try:
        with pytest.raises(REDIS_ERRORS, match="Redis Cluster cannot be connected"):
            await redis.ping()
    finally:
        await redis.aclose()


@pytest.mark.parametrize("command", [["status"], ["shards", "list"]])
def test_the_cli_names_a_cluster_none_of_whose_nodes_answers(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A view of every shard says no shard answered (exit 1), with no traceback."""
    monkeypatch.setenv("DISPATCHER_REDIS_URL", no_cluster_answers())
    monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "1")
    result = CliRunner().invoke(app, command)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "no shard answered" in result.output or "Redis unreachable" in result.output
