"""Receiver controls over the real app, a real Redis, real burst workers and a real
receiver: the options on every registration path and their 400s, filters matching and
not (and failing), a secret rotation verified with the `standardwebhooks` library, a
`maxInFlight` observed at the receiver, the event catalogue. (The limits across worker
processes, and a killed worker's slot: tests/faults/test_receiver_limits.py.)"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from standardwebhooks import Webhook, WebhookVerificationError

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.lua import Script
from dispatcher.models import PLATFORM_PROJECT, Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registration, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.tokens import TokenCipher
from dispatcher.worker import create_worker
from dispatcher.worker.claims import Finish
from dispatcher.worker.controls import Admit, Release
from tests.helpers import Overlap, Receiver, RunWorker, app_client, make_settings

keys = Keys()  # today's key names (one shard)

ALICE = {"X-DEVOPS-UID": "alice"}
OPERATOR = {"X-DEVOPS-OPERATOR-TOKEN": "op-secret"}
CALLBACKS = "/apigw/v4/projects/demo/callbacks"


@pytest.fixture
async def op_api(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(redis_server.url, operator_token="op-secret")
    async with app_client(settings, redis) as client:
        yield client


Query = dict[str, str | int | float]


def params(url: str, event: str = "BUILD_END", **extra: str | int | float) -> Query:
    return {"event": event, "region": "DEVNET", "url": url, **extra}


async def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def refused(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    message: str = response.json()["message"]
    assert param in message, message
    return message


def whsec(token: str) -> Webhook:
    return Webhook("whsec_" + base64.b64encode(token.encode()).decode())


async def test_every_registration_path_takes_lists_and_checks_the_controls(
    op_api: httpx.AsyncClient,
) -> None:
    controls: Query = {"maxPerSecond": 10, "maxInFlight": 3, "filter": "data.status == 'FAILED'"}
    url = "http://127.0.0.1:9/h"
    paths = [
        (CALLBACKS, ALICE),
        (f"{CALLBACKS}/batch", ALICE),
        ("/apigw/v4/projects/demo/pipelines/p1/callbacks", ALICE),
        ("/operator/callbacks", OPERATOR),
        ("/operator/callbacks/batch", OPERATOR),
    ]
    for n, (path, who) in enumerate(paths):
        await ok(await op_api.post(path, params={**params(f"{url}{n}"), **controls}, headers=who))
    listed = await ok(await op_api.get(CALLBACKS, headers=ALICE))
    platform = await ok(await op_api.get("/operator/callbacks", headers=OPERATOR))
    for cb in listed["records"] + platform["records"]:
        assert {k: cb[k] for k in controls} == controls
        assert cb["rotationEndTime"] is None and cb["filterErrors"] == 0
    assert len(listed["records"]) == 3 and len(platform["records"]) == 2
    # registering again without them clears them (a registration states the whole callback)
    await ok(await op_api.post(CALLBACKS, params=params(f"{url}0"), headers=ALICE))
    (first, *_) = (await ok(await op_api.get(CALLBACKS, headers=ALICE)))["records"]
    assert (first["maxPerSecond"], first["maxInFlight"], first["filter"]) == (None, None, None)

    bad: Query = {"maxPerSecond": 0, "maxInFlight": "many", "filter": "data.status =="}
    for name, value in bad.items():
        for path, who in paths:
            await refused(
                await op_api.post(path, params={**params(url), name: value}, headers=who), name
            )
    message = await refused(
        await op_api.post(CALLBACKS, params=params(url, filter="data.[x"), headers=ALICE), "filter"
    )
    assert "Expecting" in message or "expression" in message  # the parser's words
    await refused(
        await op_api.post(CALLBACKS, params=params(url, filter="up(data)"), headers=ALICE), "up()"
    )
    for nested in ("(" * 500 + "a" + ")" * 500, "!" * 1000 + "a"):  # a 500 before (review)
        response = await op_api.post(CALLBACKS, params=params(url, filter=nested), headers=ALICE)
        await refused(response, "nested too deeply")


async def test_filters_let_through_only_what_matches_and_count_their_failures(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    wanted = "data.status == 'FAILED' && data.branch == 'main' && projectId == 'demo'"
    for path, expression in (
        ("/failed-main", wanted),
        ("/all", None),
        ("/broken", "length(data.buildNo) > `0`"),
    ):
        extra = {"filter": expression} if expression else {}
        await ok(
            await api.post(CALLBACKS, params=params(receiver.url(path), **extra), headers=ALICE)
        )
    events = [
        {"status": "FAILED", "branch": "main", "buildNo": 1},
        {"status": "FAILED", "branch": "dev", "buildNo": 2},
        {"status": "SUCCEED", "branch": "main", "buildNo": 3},
        {"status": "FAILED", "branch": "main", "buildNo": 4},
    ]
    errors_before = _metric("dispatcher_filtered_total", result="error")
    skipped_before = _metric("dispatcher_filtered_total", result="skipped")
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", e) for e in events])
    await run_worker()
    assert [_body(s.body)["data"]["buildNo"] for s in receiver.requests("/failed-main")] in (
        [1, 4],
        [4, 1],
    )
    assert len(receiver.requests("/all")) == 4 and not receiver.requests("/broken")
    assert _metric("dispatcher_filtered_total", result="error") - errors_before == 4
    assert _metric("dispatcher_filtered_total", result="skipped") - skipped_before == 2
    listed = (await ok(await api.get(CALLBACKS, headers=ALICE)))["records"]
    broken = next(cb for cb in listed if cb["url"].endswith("/broken"))
    assert broken["filterErrors"] == 4 and "length()" in broken["filterLastError"]
    page = (await api.get("/console/projects/demo")).text
    assert "failed on 4 events" in page and "length()" in page
    # registering again starts the count again; deleting the callback leaves nothing behind
    await ok(await api.post(CALLBACKS, params=params(receiver.url("/broken")), headers=ALICE))
    assert not await redis.exists(keys.filter_errors(broken["id"]))


async def test_a_filter_that_would_build_without_end_fails_alone(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """A filter of 1,017 characters whose every stage doubles a string (2^67 times the
    event) was accepted, and its first event filled the worker's memory. Now it spends its
    owner's budget for the event and fails alone, counted: the callback beside it, another
    project's filtered callback and a platform-wide one (the same event, another owner's
    budget) get their events."""
    doubling = "to_string(@)" + "|join('',[@,@])" * 67
    await ok(
        await api.post(
            CALLBACKS, params=params(receiver.url("/evil"), filter=doubling), headers=ALICE
        )
    )
    await ok(await api.post(CALLBACKS, params=params(receiver.url("/plain")), headers=ALICE))
    builds = Options(filter="contains([data.n], `1`)")  # a list: it spends units too
    for owner, path in (("other", "/other"), (PLATFORM_PROJECT, "/platform")):
        await Registry(redis).create(
            owner, receiver.url(path), Event.BUILD_END, Region.DEVNET, options=builds
        )
    producer = Producer(settings, redis)
    await producer.emit_many([(p, "BUILD_END", {"n": 1}) for p in ("demo", "other")])
    await run_worker()
    assert len(receiver.requests("/plain")) == 1 and len(receiver.requests("/other")) == 1
    assert len(receiver.requests("/platform")) == 2  # its own budget beside demo's
    assert not receiver.requests("/evil")
    listed = (await ok(await api.get(CALLBACKS, headers=ALICE)))["records"]
    evil = next(cb for cb in listed if cb["url"].endswith("/evil"))
    assert evil["filterErrors"] == 1 and "spent their budget" in evil["filterLastError"]


async def test_a_project_whose_filters_take_the_loop_waits_in_the_queue_for_a_while(
    redis: Redis, settings: Settings, receiver: Receiver
) -> None:
    """demo's callback has a filter that walks 20,000 items of every event (about 25 ms
    of the loop each, within its budget). After 32 of demo's events, while another
    project is busy in the worker, a real worker's claim leaves demo's due jobs in the
    queue and takes the other's: the filters run on one project's events take at most
    their share of the loop (a quarter), not all of it."""
    walk = "length(data.items[?n < `0`]) > `0`"  # false: none is delivered
    registry = Registry(redis)
    await registry.create("demo", receiver.url("/evil"), Event.BUILD_END, Region.DEVNET,
                          options=Options(filter=walk))  # fmt: skip
    await registry.create("other", receiver.url("/plain"), Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    items = [{"n": n} for n in range(20_000)]
    await producer.emit_many([("demo", "BUILD_END", {"items": items})] * 32)
    worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        await asyncio.wait_for(worker.main(), timeout=30)
        await producer.emit_many([(p, "BUILD_END", {"n": 9}) for p in ("demo", "other")])
        worker.served[0].engine.shares.job_started("other:busy")  # a job of its runs here
        claimed = await worker.served[0].claim(10, [], 0.01)
    finally:
        await worker.close()
    assert [job.job_id.split(":")[0] for job in claimed or []] == ["other"]
    assert not receiver.requests("/evil")


async def test_a_rotation_signs_with_both_secrets_until_the_overlap_ends(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.script("/hook", web_answer(500), web_answer(200))  # the 2nd try succeeds
    await ok(await api.post(CALLBACKS, params=params(url, secretToken="old-secret"), headers=ALICE))
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-1"})
    await run_worker()
    (cb,) = (await ok(await api.get(CALLBACKS, headers=ALICE)))["records"]
    rotate = f"{CALLBACKS}/{cb['id']}/secret"
    before = now_ms()
    shown = await ok(await api.post(rotate, params={"secretToken": "new-secret"}, headers=ALICE))
    assert 24 * 3600_000 <= shown["rotationEndTime"] - before < 24 * 3600_000 + 60_000
    assert "secret" not in str(shown).replace("Secret", "")
    # a redelivery of the first (old) request uses the current secrets
    records = await _records(redis, settings, url)
    await ok(
        await api.post(
            f"/apigw/v4/projects/demo/callbacks/history/{records[-1].id}/retry", headers=ALICE
        )
    )
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-2"})
    await run_worker()
    seen_all = receiver.requests()
    before_rotation, rotated = seen_all[:2], seen_all[2:]  # the 500, then its retry
    for seen in before_rotation:
        whsec("old-secret").verify(seen.body, dict(seen.headers))
        with pytest.raises(WebhookVerificationError):
            whsec("new-secret").verify(seen.body, dict(seen.headers))
    # the recorded request sent again, and the new event (in either order: one worker sends
    # both at once)
    assert sorted(seen.body for seen in rotated) == sorted(
        [before_rotation[0].body, before_rotation[0].body.replace(b"b-1", b"b-2")]
    )
    for seen in rotated:
        assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "new-secret"
        for secret in ("new-secret", "old-secret"):  # a receiver with either verifies
            whsec(secret).verify(seen.body, dict(seen.headers))
    # overlap 0: the old secret stops at once
    shown = await ok(
        await api.post(rotate, params={"secretToken": "newest", "overlapHours": 0}, headers=ALICE)
    )
    assert shown["rotationEndTime"] is None
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-3"})
    await run_worker()
    last = receiver.requests()[-1]
    whsec("newest").verify(last.body, dict(last.headers))
    with pytest.raises(WebhookVerificationError):
        whsec("new-secret").verify(last.body, dict(last.headers))
    cases: list[tuple[Query, str]] = [
        ({"secretToken": ""}, "secretToken"),
        ({}, "secretToken"),
        ({"secretToken": "x", "overlapHours": -1}, "overlapHours"),
        ({"secretToken": "x", "overlapHours": 169}, "overlapHours"),
    ]
    for query, param in cases:
        await refused(await api.post(rotate, params=query, headers=ALICE), param)
    missing = await api.post(f"{CALLBACKS}/999/secret", params={"secretToken": "x"}, headers=ALICE)
    assert missing.status_code == 404


async def test_rotation_on_pipeline_and_platform_callbacks(op_api: httpx.AsyncClient) -> None:
    for base, who in (
        ("/apigw/v4/projects/demo/pipelines/p1/callbacks", ALICE),
        ("/operator/callbacks", OPERATOR),
    ):
        await ok(
            await op_api.post(
                base, params=params("http://127.0.0.1:9/p", secretToken="a"), headers=who
            )
        )
        (cb,) = (await ok(await op_api.get(base, headers=who)))["records"]
        shown = await ok(
            await op_api.post(
                f"{base}/{cb['id']}/secret",
                params={"secretToken": "b", "overlapHours": 2},
                headers=who,
            )
        )
        assert shown["rotationEndTime"] is not None
    other = await op_api.post(
        "/apigw/v4/projects/other/callbacks/1/secret", params={"secretToken": "x"}, headers=ALICE
    )
    assert other.status_code == 404  # another project's callback is not found


async def test_max_in_flight_is_what_the_receiver_sees_and_waiting_spends_no_attempt(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    run_worker: RunWorker,
    receiver: Receiver,
) -> None:
    overlap = Overlap(0.2)
    url = receiver.script("/slow", overlap.handle)
    await ok(await api.post(CALLBACKS, params=params(url, maxInFlight=2), headers=ALICE))
    deferred = _metric("dispatcher_deliveries_deferred_total", reason="in_flight")
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(8)])
    await run_worker()
    assert len(receiver.requests("/slow")) == 8 and overlap.most == 2
    assert _metric("dispatcher_deliveries_deferred_total", reason="in_flight") > deferred
    records = await _records(redis, settings, url)
    assert len(records) == 8 and {(r.attempt, r.status.value) for r in records} == {(1, "SUCCESS")}
    assert not await redis.exists(keys.limits(1)[1])  # every slot given back


async def test_a_project_flooding_a_platform_callback_waits_behind_its_own_backlog(
    settings: Settings, redis: Redis, run_worker: RunWorker, receiver: Receiver
) -> None:
    """A platform-wide callback's line was first come, first served across the projects
    emitting to it: 30 events of one project queued ahead made another's 2 wait for all
    30 (review). Turns are taken per project now, so the quiet project's come next."""
    url = receiver.url("/platform")
    await Registry(redis).create(
        PLATFORM_PROJECT, url, Event.BUILD_END, Region.DEVNET, options=Options(max_in_flight=1)
    )
    producer = Producer(settings, redis)
    await producer.emit_many([("flood", "BUILD_END", {"n": i}) for i in range(30)])
    await producer.emit_many([("quiet", "BUILD_END", {"n": i}) for i in range(2)])
    await run_worker()
    emitters = [seen.headers["X-DEVOPS-PROJECT-ID"] for seen in receiver.requests("/platform")]
    assert sorted(emitters) == ["flood"] * 30 + ["quiet"] * 2  # each once
    quiet = [n for n, emitter in enumerate(emitters) if emitter == "quiet"]
    assert max(quiet) < 8, emitters  # not behind the flood's 30 (its 31st and 32nd)


def admitting(redis: Redis, callback_id: int) -> Callable[[str, str], Awaitable[Any]]:
    """`Admit` of one job of a project to a callback allowing one request in flight (its
    slot named after the job), as a worker runs it."""
    starts, running, line, seen, turns = keys.limits(callback_id)

    async def admit(job: str, emitter: str) -> Any:
        return await Admit(
            starts=starts, running=running, line=line, seen=seen, turns=turns, per_second=0,
            in_flight=1, token=f"slot-{job}", job=job, emitter=emitter, slot_ms=60_000,
            keep_ms=60_000, min_wait_ms=50,
        ).run(redis)  # fmt: skip

    return admit


async def test_the_line_takes_turns_per_project_and_keeps_each_ones_order(redis: Redis) -> None:
    """With one slot held: a project's deliveries wait in the order they came, and another
    project's first takes the turn after the first one waiting, not the last (turns that
    tie go by job id)."""
    admit = admitting(redis, 7)
    _, running, line, _, _ = keys.limits(7)
    assert await admit("a1", "projA") == 0  # the slot
    for job, emitter in [("a2", "projA"), ("a3", "projA"), ("b1", "projB"), ("a4", "projA")]:
        assert await admit(job, emitter) != 0
    assert await redis.zrange(line, 0, -1) == [b"a2", b"b1", b"a3", b"a4"]
    assert await admit("a3", "projA") != 0  # back before its turn: it keeps its place
    await redis.zrem(running, "slot-a1")  # a1's slot given back
    assert await admit("b2", "projB") != 0  # a newcomer: behind the turns before its own
    assert await admit("a2", "projA") == 0  # the first in line starts
    assert await redis.zrange(line, 0, -1) == [b"b1", b"a3", b"b2", b"a4"]


async def test_projects_flooding_at_once_each_wait_behind_their_own_backlog(
    redis: Redis,
) -> None:
    """Two projects with 20 deliveries each waiting, 10 of them started: a third project's
    newcomer takes the next turn. The line's clock once counted starts, not turns, and ran
    ahead by the number of projects flooding: the newcomer went behind 10 (review)."""
    admit = admitting(redis, 8)
    _, running, line, _, _ = keys.limits(8)
    assert await admit("a0", "projA") == 0
    held = "slot-a0"
    for emitter in ("projA", "projB"):
        for n in range(1, 21):
            assert await admit(f"{emitter[-1].lower()}{n:02}", emitter) != 0
    for _ in range(10):  # a start at each slot given back: the first in line
        await redis.zrem(running, held)
        [first] = await redis.zrange(line, 0, 0)
        assert await admit(first.decode(), f"proj{first.decode()[0].upper()}") == 0
        held = f"slot-{first.decode()}"
    assert await admit("q01", "projQ") != 0
    assert await redis.zrank(line, "q01") == 2  # behind a06 and b06, whose turn it shares


async def test_a_slot_given_back_wakes_no_more_than_the_rate_lets_start(redis: Redis) -> None:
    """A callback at 2 a second with 10 slots: a slot given back while this second's starts
    are taken wakes no one (each woken job was claimed, refused by `Admit` and put back:
    a callback at 50/s with 1,000 slots made ~780 such round trips a second; review); with
    one start left in the second it wakes one, the first in line."""
    starts, running, line, _, _ = keys.limits(11)
    later = now_ms() + 60_000
    for n in range(5):
        await redis.zadd(line, {f"j{n}": n + 1})
        await redis.zadd(keys.QUEUE, {f"j{n}": later})

    async def release(started: int) -> None:
        await redis.delete(starts)
        if started:
            await redis.zadd(starts, {f"s{n}": now_ms() for n in range(started)})
        await redis.zadd(running, {"slot": now_ms() + 60_000})
        await Release(
            starts=starts, running=running, line=line, queue=keys.QUEUE, token="slot",
            in_flight=10, per_second=2,
        ).run(redis)  # fmt: skip

    await release(started=2)
    assert {int(due) for _, due in await redis.zrange(keys.QUEUE, 0, -1, withscores=True)} == {
        later
    }
    await release(started=1)
    woken = [
        job for job, due in await redis.zrange(keys.QUEUE, 0, -1, withscores=True) if due < later
    ]
    assert woken == [b"j0"]


async def test_a_delivery_lined_up_by_the_version_before_turns_takes_a_turn(
    redis: Redis,
) -> None:
    """The version before scored the line by arrival (epoch ms): such an entry sorted
    behind every turn, and waited while newcomers kept coming (review)."""
    admit = admitting(redis, 9)
    _, _, line, seen, _ = keys.limits(9)
    assert await admit("a1", "projA") == 0
    await redis.zadd(line, {"old": now_ms()})  # its place, as that version wrote it
    await redis.zadd(seen, {"old": now_ms() + 60_000})
    for job in ("b1", "b2", "b3"):
        assert await admit(job, "projB") != 0
    assert await redis.zrange(line, 0, -1) == [b"b1", b"b2", b"b3", b"old"]
    assert await admit("old", "projC") != 0  # back: it takes its project's next turn
    assert await redis.zrange(line, 0, -1) == [b"b1", b"old", b"b2", b"b3"]


async def test_a_batchs_slot_releases_run_together_and_its_records_end_their_jobs(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    run_worker: RunWorker,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deliveries to a callback with `maxInFlight` are admitted in the read pipeline's
    joint calls, and those that end with their attempt give their slots back in the
    writer's (one `EVALSHA` for many, after the records'); each record's script ends its
    job: no `Finish` of its own, every slot back. (The limit is not reached: a delivery
    put in line ends its fan-out job on its own.)"""
    url = receiver.url("/limited")
    await ok(await api.post(CALLBACKS, params=params(url, maxInFlight=1000), headers=ALICE))
    sizes: dict[str, list[int]] = {"Admit": [], "Release": []}  # the calls of each joint call
    together = Script.queue_together.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Script], pipe: Any, calls: list[Script]) -> None:
        sizes[cls.__name__].append(len(calls))
        together(cls, pipe, calls)

    finishes: list[Finish] = []
    finish = Finish.queue_on

    def noted(self: Finish, pipe: Any) -> None:
        finishes.append(self)
        finish(self, pipe)

    for kind in (Admit, Release):
        monkeypatch.setattr(kind, "queue_together", classmethod(counted))
    monkeypatch.setattr(Finish, "queue_on", noted)
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(40)])
    await run_worker()
    records = await _records(redis, settings, url)
    assert len(records) == 40 and {(r.attempt, r.status.value) for r in records} == {(1, "SUCCESS")}
    assert all(sum(n) == 40 and max(n) > 1 for n in sizes.values()) and not finishes, sizes
    assert not await redis.exists(keys.limits(1)[1])  # every slot given back
    assert not await redis.zcard(keys.QUEUE)


async def test_the_event_catalogue(api: httpx.AsyncClient) -> None:
    events = await ok(await api.get("/apigw-app/v4/callbacks/events", headers=ALICE))
    assert len(events) == 18 and events[6]["event"] == "BUILD_END"
    assert events[6]["levels"] == ["platform", "project", "pipeline"]
    assert events[6]["example"]["buildNo"] == 42 and events[6]["emittedBy"]
    assert (await api.get("/apigw-app/v4/callbacks/events")).status_code == 401
    page = (await api.get("/console/events")).text
    assert "BUILD_TASK_PAUSE" in page and "/apigw/v4/callbacks/events" in page


def web_answer(status: int) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="")

    return handler


def _body(raw: bytes) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(raw)
    return body


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _records(redis: Redis, settings: Settings, url: str) -> list[HistoryRecord]:
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        "demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 60_000, page_size=100
    )
    return page.records


# long enough that the page's random CSRF token cannot hold them by chance ("s2" once did)
FIRST_SECRET, SECOND_SECRET = "first-console-secret", "second-console-secret"


async def test_the_consoles_forms_register_with_controls_and_rotate(
    api: httpx.AsyncClient,
) -> None:
    page = await api.get("/console/projects/demo")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token and "Register a callback" in page.text and "/console/events" in page.text
    wanted = "data.status == 'FAILED'"
    form = {
        "csrf_token": token[1],
        "url": "http://127.0.0.1:9/c",
        "region": "OSS",
        "event": "BUILD_END, BUILD_START",
        "secretToken": FIRST_SECRET,
        "maxPerSecond": "5",
        "maxInFlight": "",
        "filter": wanted,
    }
    done = await api.post("/console/projects/demo/callbacks", data=form)
    assert done.status_code == 303 and "notice=registered" in done.headers["location"]
    listed = (await ok(await api.get(CALLBACKS, headers=ALICE)))["records"]
    shown = [(cb["event"], cb["maxPerSecond"], cb["maxInFlight"], cb["filter"]) for cb in listed]
    assert shown == [("BUILD_END", 5, None, wanted), ("BUILD_START", 5, None, wanted)]
    bad = await api.post("/console/projects/demo/callbacks", data={**form, "filter": "data.["})
    assert bad.status_code == 400 and "filter" in bad.text
    rotate = f"/console/projects/demo/callbacks/{listed[0]['id']}/secret"
    done = await api.post(rotate, data={"csrf_token": token[1], "secretToken": SECOND_SECRET})
    assert done.status_code == 303
    text = (await api.get("/console/projects/demo")).text
    assert "old one signs until" in text
    assert FIRST_SECRET not in text and SECOND_SECRET not in text


async def test_the_previous_token_is_encrypted_at_rest_like_the_token(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    keys_ = f"{TokenCipher.new_key()},{TokenCipher.new_key()}"
    settings = make_settings(redis_server.url, token_keys=keys_)
    services = Services(settings, redis)
    registration = Registration(
        "demo", "http://127.0.0.1:9/e", Region.DEVNET, "alice", "old-secret"
    )
    cid = await services.register(registration, "BUILD_END")
    await services.rotate_secret(cid, "demo", "new-secret", 1)
    stored = await redis.hmget(keys.callback(cid), ["secretToken", "previousToken"])  # type: ignore[misc]  # sync|async
    assert all(value.startswith(b"fernet:") for value in stored)
    assert b"secret" not in b"".join(stored)
    target = await services.registry.target(cid)
    assert target is not None
    assert (target.secret_token, target.previous_token) == ("new-secret", "old-secret")
    assert await services.registry.rotate_tokens() == (2, 0, 0, ())  # both, the first key
    assert await redis.hget(keys.callback(cid), "previousToken") != stored[1]  # type: ignore[misc]  # sync|async
