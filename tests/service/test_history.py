"""The history store and its seed route: paging, windows, defaults, bad input, retention,
redelivery. One contract, two backends: every test that takes `settings` runs against the
Redis store and against the PostgreSQL store (records shipped from the stream first)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from dispatcher import keys as keys_module
from dispatcher.api import create_app
from dispatcher.auth import Role, Roles
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidInput, NotFound
from dispatcher.history import HistoryStore, Recent, open_history, parse_window
from dispatcher.history.record import AttemptRecord
from dispatcher.keys import Keys
from dispatcher.models import DeliveryStatus, Event, HistoryPage, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.replication import run_replicated
from dispatcher.services import RECENT_CALLBACKS_READ, RECENT_URLS_MAX, Services
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, RunWorker, answer, make_settings, ship_all

V3 = "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history"
V4 = "/apigw-app/v4/projects/demo/callbacks/history"
V4_BASE = "/apigw-app/v4/projects/demo"
URL = "http://127.0.0.1:9000/hook"
SHANGHAI = ZoneInfo("Asia/Shanghai")


keys = Keys()  # today's key names (one shard)


def ms(text: str, tz: ZoneInfo = SHANGHAI) -> int:
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=tz).timestamp() * 1000)


def record(created: int, *, url: str = URL, event: str = "BUILD_END", n: int = 0) -> AttemptRecord:
    return {
        "projectId": "demo",
        "callBackUrl": url,
        "events": event,
        "status": "SUCCESS",
        "errorMsg": None,
        "requestHeaders": [{"name": "X-DEVOPS-WEBHOOK-TOKEN", "value": "******"}],
        "requestBody": f'{{"n": {n}}}',
        "responseCode": 200,
        "responseBody": "ok",
        "startTime": created - 5,
        "endTime": created,
        "createdTime": created,
        "attempt": 1,
        "deliveryId": f"evt_{n}.1",
    }


@pytest.fixture(params=["redis", "postgres"])
def settings(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> Settings:
    """The contract runs on both backends."""
    if request.param == "postgres":
        return make_settings(redis_server.url, history_url=request.getfixturevalue("pg_url"))
    return make_settings(redis_server.url)


@pytest.fixture
async def store(settings: Settings, redis: Redis) -> AsyncIterator[HistoryStore]:
    history = open_history(settings, redis, keys)
    yield history
    await history.close()


@pytest.fixture
def tz_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"timezone": "Asia/Shanghai"})


@pytest.fixture
async def tz_api(tz_settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(tz_settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            yield client


async def fill(redis: Redis, settings: Settings, times: list[int], **kw: Any) -> list[int]:
    """Records written through the store, then (PostgreSQL) shipped."""
    history = open_history(settings, redis, keys)
    try:
        ids = [await history.add(record(t, n=i, **kw)) for i, t in enumerate(times)]
    finally:
        await history.close()
    await ship_all(settings, redis)
    return ids


async def test_seed_shape_and_newest_first(tz_api: httpx.AsyncClient, redis: Redis,
                                           tz_settings: Settings) -> None:  # fmt: skip
    now = now_ms()
    ids = await fill(redis, tz_settings, [now - 3000, now - 2000, now - 1000])
    response = await tz_api.get(V3, params={"url": URL, "event": "BUILD_END"}, headers=UID)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"data", "message", "status"} and body["status"] == 0
    data = body["data"]
    assert (data["count"], data["totalPages"], data["page"], data["pageSize"]) == (3, 1, 1, 20)
    assert [r["id"] for r in data["records"]] == list(reversed(ids))
    seed_fields = {"callBackUrl", "responseBody", "responseCode", "errorMsg", "requestHeaders",
                   "requestBody", "createdTime", "startTime", "id", "endTime", "projectId",
                   "events", "status"}  # fmt: skip
    assert seed_fields <= set(data["records"][0])
    assert data["records"][0]["requestHeaders"] == [
        {"name": "X-DEVOPS-WEBHOOK-TOKEN", "value": "******"}
    ]
    same = await tz_api.get(V4, params={"url": URL, "event": "BUILD_END"}, headers=UID)
    assert same.json() == body


async def test_paging_arithmetic(redis: Redis, settings: Settings, store: HistoryStore) -> None:
    now = now_ms()
    await fill(redis, settings, [now - 10_000 + i for i in range(45)])
    history = store

    async def page(n: int, size: int = 20) -> HistoryPage:
        return await history.query(
            "demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now, page=n, page_size=size
        )

    first, third, past = await page(1), await page(3), await page(4)
    assert (first.count, first.total_pages, len(first.records)) == (45, 3, 20)
    assert (third.count, third.total_pages, len(third.records)) == (45, 3, 5)  # partial
    assert (past.count, past.records) == (45, [])
    created = [r.created_time for p in (first, await page(2), third) for r in p.records]
    assert created == sorted(created, reverse=True) and len(set(created)) == 45
    capped = await page(1, 1000)
    assert capped.page_size == 100 and len(capped.records) == 45


async def test_pages_of_a_window_whose_end_is_past_repeat_nothing_while_attempts_come(
    redis: Redis, settings: Settings, store: HistoryStore
) -> None:
    """Pages count from the newest record (the seeds fix the parameters: no cursor): an
    attempt recorded between two pages' reads moves every record one place down, and the
    next page of a window still open repeats the last one shown (review). With its end
    pinned in the past the window's records stay put, and its pages hold each once."""
    now = now_ms()
    await fill(redis, settings, [now - 10_000 + i for i in range(45)])
    pinned = {"start_ms": now - 60_000, "end_ms": now - 1_000, "page_size": 20}
    still_open = {**pinned, "end_ms": now + 60_000}
    first = await store.query("demo", URL, "BUILD_END", page=1, **pinned)
    first_open = await store.query("demo", URL, "BUILD_END", page=1, **still_open)
    await fill(redis, settings, [now - 100])  # recorded meanwhile
    second = await store.query("demo", URL, "BUILD_END", page=2, **pinned)
    second_open = await store.query("demo", URL, "BUILD_END", page=2, **still_open)
    shown = [r.id for r in first.records + second.records]
    assert len(shown) == len(set(shown)) == 40 and second.count == 45
    assert first_open.records[-1].id == second_open.records[0].id  # shown twice


async def rewrite(redis: Redis, settings: Settings, record_id: int, **changes: Any) -> None:
    """A stored record's JSON changed in place (in the store that serves it)."""
    if not settings.history_url:
        key = keys.history_record(record_id)
        await redis.set(key, orjson.dumps({**orjson.loads(await redis.get(key)), **changes}))
        return
    conn = await asyncpg.connect(settings.history_url)
    try:
        doc = orjson.loads(await conn.fetchval(DOC_SQL, record_id))
        await conn.execute(REWRITE_SQL, record_id, orjson.dumps({**doc, **changes}).decode())
    finally:
        await conn.close()


DOC_SQL = "SELECT doc FROM history_attempts WHERE id = $1"
REWRITE_SQL = "UPDATE history_attempts SET doc = $2 WHERE id = $1"


@pytest.mark.parametrize("refused", [{"status": "SKIPPED"}, {"startTime": None}])
async def test_a_stored_record_the_model_refuses_is_left_out_and_its_page_shown(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, store: HistoryStore,
    refused: dict[str, Any],
) -> None:  # fmt: skip
    now = now_ms()
    ids = await fill(redis, settings, [now - 5000 + i for i in range(5)])
    await rewrite(redis, settings, ids[2], requestBody="a-secret-body", **refused)
    with capture_logs() as logs:
        response = await api.get(V3, params={"url": URL, "event": "BUILD_END"}, headers=UID)
        with pytest.raises(NotFound):
            await store.get(ids[2], "demo")
    assert response.status_code == 200  # it was a 500, on every page holding the record
    data = response.json()["data"]
    assert data["count"] == 5  # the count is of what is stored
    assert [r["id"] for r in data["records"]] == [ids[4], ids[3], ids[1], ids[0]]
    unreadable = [e for e in logs if e["event"] == "history.record_unreadable"]
    assert unreadable and {e["record_id"] for e in unreadable} == {str(ids[2])}
    assert unreadable[0]["fields"] == sorted(refused) and "a-secret-body" not in str(logs)


async def test_window_is_inclusive_in_the_configured_time_zone(
    tz_api: httpx.AsyncClient, redis: Redis, tz_settings: Settings
) -> None:
    today = datetime.now(SHANGHAI).strftime("%Y-%m-%d")
    inside = [ms(f"{today} 00:00:00"), ms(f"{today} 00:00:10") + 999]
    outside = [ms(f"{today} 00:00:00") - 1, ms(f"{today} 00:00:11")]
    if max(inside + outside) > now_ms():
        pytest.skip("the test's window lies in the future just after midnight in Shanghai")
    await fill(redis, tz_settings, inside + outside)
    response = await tz_api.get(
        V3,
        params={"url": URL, "event": "BUILD_END",
                "startTime": f"{today} 00:00:00", "endTime": f"{today} 00:00:10"},
        headers=UID,
    )  # fmt: skip
    data = response.json()["data"]
    assert data["count"] == 2
    assert sorted(r["createdTime"] for r in data["records"]) == inside


def test_window_defaults() -> None:
    now = datetime(2024, 5, 1, 15, 30, tzinfo=SHANGHAI)
    assert parse_window(None, None, SHANGHAI, now=now) == (
        ms("2024-05-01 00:00:00"),
        ms("2024-05-02 00:00:00") - 1,
    )
    assert parse_window("2024-04-30 12:00:00", None, SHANGHAI, now=now) == (
        ms("2024-04-30 12:00:00"),
        ms("2024-05-02 00:00:00") - 1,
    )
    assert parse_window(None, "2024-04-20 08:00:00", SHANGHAI, now=now) == (
        ms("2024-04-20 00:00:00"),
        ms("2024-04-20 08:00:00") + 999,
    )
    utc = ZoneInfo("UTC")
    assert parse_window("2024-05-01 00:00:00", None, utc, now=now)[0] == ms(
        "2024-05-01 00:00:00", utc
    )
    with pytest.raises(
        InvalidInput, match=r"startTime \(2024-05-03 00:00:00\) is after the end of today"
    ):
        parse_window("2024-05-03 00:00:00", None, SHANGHAI, now=now)  # it said "endTime (None)"


async def test_only_the_asked_url_and_event_are_returned(
    redis: Redis, settings: Settings, store: HistoryStore
) -> None:
    now = now_ms()
    await fill(redis, settings, [now - 1000])
    await fill(redis, settings, [now - 900], url="http://127.0.0.1:9000/other")
    await fill(redis, settings, [now - 800], event="BUILD_START")
    page = await store.query("demo", URL, "BUILD_END", start_ms=now - 5000, end_ms=now)
    assert [(r.call_back_url, r.events) for r in page.records] == [(URL, "BUILD_END")]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"startTime": "2024-05-01"}, "startTime"),
        ({"startTime": "2024/05/01 10:00:00"}, "startTime"),
        ({"endTime": "2024-13-01 10:00:00"}, "endTime"),
        ({"endTime": "yesterday"}, "endTime"),
        ({"startTime": "2024-05-02 00:00:00", "endTime": "2024-05-01 00:00:00"}, "endTime"),
        ({"page": "0"}, "page"),
        ({"page": "two"}, "page"),
        ({"pageSize": "0"}, "pageSize"),
        ({"pageSize": "1.5"}, "pageSize"),
        ({"event": "BUILD_FINISHED"}, "event"),
        ({"url": None}, "'url' is required"),
        ({"event": None}, "'event' is required"),
    ],
)
async def test_bad_input_is_a_400_naming_the_parameter(
    api: httpx.AsyncClient, params: dict[str, str | None], fragment: str
) -> None:
    query = {"url": URL, "event": "BUILD_END", **params}
    response = await api.get(V3, params={k: v for k, v in query.items() if v is not None},
                             headers=UID)  # fmt: skip
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400 and body["data"] is None
    assert fragment in body["message"]


async def test_history_needs_an_identity(api: httpx.AsyncClient) -> None:
    response = await api.get(V3, params={"url": URL, "event": "BUILD_END"})
    assert response.status_code == 401


async def test_redelivery_sends_the_same_body_again_with_a_new_record(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.script("/hook", answer(404), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "old-token")
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-9"})
    await run_worker()
    [first] = (await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)).json()[
        "data"
    ]["records"]
    assert first["responseCode"] == 404
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "new-token")

    response = await api.post(f"{V3}/{first['id']}/retry", headers=UID)
    assert response.json()["status"] == 0
    await run_worker()
    one, two = receiver.requests()
    assert two.body == one.body
    assert two.headers["webhook-id"] == one.headers["webhook-id"]
    assert two.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "new-token"
    records = (await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)).json()[
        "data"
    ]["records"]
    assert [r["responseCode"] for r in records] == [200, 404]
    assert records[0]["redeliveryOf"] == first["id"]


async def test_redelivery_of_unknown_record_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post(f"{V3}/999999/retry", headers=UID)
    assert response.status_code == 404 and response.json()["status"] == 404


async def test_another_projects_record_is_not_found_as_one_that_is_not_there(
    api: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    """The 404s differed ("... not found in project demo" for another project's record):
    a project could learn which ids other projects' records hold (review)."""
    history = open_history(settings, redis, keys)
    theirs = await history.add({**record(now_ms()), "projectId": "other"})
    await history.close()
    await ship_all(settings, redis)
    answers = [
        (await api.post(f"{V3}/{record_id}/retry", headers=UID)).json()["message"]
        for record_id in (theirs, theirs + 1000)
    ]
    assert answers == [
        f"history record {theirs} not found in project demo",
        f"history record {theirs + 1000} not found in project demo",
    ]


async def test_dead_letters_and_redelivery_of_a_windows_failures(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.script("/hook", answer(404))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    await Registry(redis).create("other", url, Event.BUILD_END, Region.DEVNET, "t")
    producer = Producer(settings, redis)
    ids = await producer.emit_many([("demo", "BUILD_END", {"n": i}) for i in range(3)])
    await producer.emit("other", "BUILD_END", {})
    await run_worker()

    dead = await api.get(f"{V4_BASE}/callbacks/history/dead-letters", headers=UID)
    records = dead.json()["data"]
    assert {r["eventId"] for r in records} == set(ids)  # this project's only
    assert all(r["final"] and r["status"] == "FAILED" for r in records)

    receiver.script("/hook", answer(200))
    retried = await api.post(f"{V3}/retry", params={"url": url, "event": "BUILD_END"}, headers=UID)
    queued = {"queued": 3, "alreadyQueued": 0, "bodyNotKept": 0, "callbackGone": 0}
    assert retried.json() == {"data": queued, "message": None, "status": 0}
    await run_worker()
    again = receiver.requests()[4:]  # after the 4 first attempts
    assert sorted(s.headers["webhook-id"].split(".")[0] for s in again) == sorted(
        f"demo:{i}" for i in ids
    )
    page = await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)
    assert [r["status"] for r in page.json()["data"]["records"]].count("SUCCESS") == 3


async def test_dead_letters_list_each_delivery_once_and_not_one_redelivered_with_success(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """The view listed a delivery once per final failure (three failed redeliveries: four
    entries, pushing other deliveries past the limit) and one redelivered with success
    since, as FAILED (review). Now each delivery once, as its newest attempt; none whose
    newest attempt succeeded."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 3)
    view = f"{V4_BASE}/callbacks/history/dead-letters"
    first = (await api.get(view, headers=UID)).json()["data"]
    again, succeeded, left = sorted(first, key=lambda r: int(r["id"]))
    receiver.script("/hook", answer(404), answer(404), answer(404), answer(200))
    for _ in range(3):
        await api.post(f"{V3}/{again['id']}/retry", headers=UID)
        await run_worker(settings.model_copy(update={"retry_schedule": ()}))
    await api.post(f"{V3}/{succeeded['id']}/retry", headers=UID)
    await run_worker()
    await ship_all(settings, redis)
    attempts = (await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)).json()
    newest = max(
        (r for r in attempts["data"]["records"] if r.get("redeliveryOf") == again["id"]),
        key=lambda r: (r["createdTime"], r["id"]),
    )
    for limit in (50, 2):
        dead = (await api.get(f"{view}?limit={limit}", headers=UID)).json()["data"]
        assert [(r["deliveryId"], r["id"]) for r in dead] == [
            (again["deliveryId"], newest["id"]),
            (left["deliveryId"], left["id"]),
        ]
    assert dead[0]["final"] and dead[0]["status"] == "FAILED"


async def test_dead_letters_leave_out_a_delivery_whose_newest_attempt_is_no_final_failure(
    settings: Settings, redis: Redis, store: HistoryStore
) -> None:
    """One entry a delivery, its newest attempt, when that is a final failure: not one
    retried since (its newest attempt a failure that is not final) nor one that succeeded
    since; a delivery that gave up twice is listed once, as the later; one entry per
    delivery within the limit, in every project's view too (review)."""
    now = now_ms()
    history = open_history(settings, redis, keys)

    async def attempt(at: int, n: int, status: str = "FAILED", final: bool = True) -> int:
        written: AttemptRecord = {**record(now - at, n=n), "status": status, "final": final}
        return await history.add(written, dead=status == "FAILED" and final)

    try:
        await attempt(900, n=1)
        await attempt(800, n=2)
        twice = [await attempt(700, n=3), await attempt(600, n=3)]
        once = await attempt(500, n=4)
        await attempt(400, n=1, final=False)  # being retried
        await attempt(300, n=2, status="SUCCESS")
        gave_up_again = await attempt(200, n=3)
    finally:
        await history.close()
    await ship_all(settings, redis)
    assert [r.id for r in await store.dead("demo")] == [gave_up_again, once]
    assert [r.id for r in await store.dead("demo", limit=2)] == [gave_up_again, once]
    assert [r.id for r in await store.dead(limit=2)] == [gave_up_again, once]  # every project's
    assert twice[0] not in [r.id for r in await store.dead()]


async def test_window_redelivery_sends_each_failed_delivery_once_and_not_one_that_succeeded(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """Each call queued every final failure of the window again, a redelivery's own too:
    3, then 6, then 12 for three deliveries to a receiver still down (review). Now each
    failed delivery once; none once its redelivery succeeded."""
    url = receiver.script("/hook", answer(404))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(3)])
    await run_worker()

    async def retry_window() -> int:
        params = {"url": url, "event": "BUILD_END"}
        retried = await api.post(f"{V3}/retry", params=params, headers=UID)
        queued: int = retried.json()["data"]["queued"]
        await run_worker()
        return queued

    assert [await retry_window(), await retry_window()] == [3, 3]  # still down
    assert len(receiver.requests()) == 9
    receiver.script("/hook", answer(200))
    assert await retry_window() == 3
    assert await retry_window() == 0  # each succeeded since
    assert len(receiver.requests()) == 12


async def failed_for_good(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, n: int
) -> tuple[str, int]:
    """`n` deliveries of a demo callback that failed for good (a 404, no retries), their
    records in the history; its receiver answers 200 from then on. Returns its URL and id."""
    url = receiver.script("/hook", answer(404))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(n)])
    await run_worker(settings.model_copy(update={"retry_schedule": ()}))
    await ship_all(settings, redis)
    receiver.script("/hook", answer(200))
    return url, callback_id


async def test_the_url_a_callback_was_registered_with_finds_its_history_as_given(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """A registration trims its URL; the history's reads took it as given, so the string a
    callback was registered with, spaces around it, found nothing (review). The query, the
    window's redelivery and the console's recent deliveries trim it the same way."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 1)
    given = f"  {url}\t"
    page = await api.get(V3, params={"url": given, "event": "BUILD_END"}, headers=UID)
    assert page.json()["data"]["count"] == 1
    async with Services.open(settings, redis) as services:
        recent = await services.recent("demo", url=given)
    assert [r.call_back_url for r in recent.records] == [url]
    retried = await api.post(f"{V4}/retry", params={"url": given, "event": "BUILD_END"},
                             headers=UID)  # fmt: skip
    assert retried.json()["data"]["queued"] == 1


async def test_window_redeliveries_at_once_send_each_failure_once(
    settings: Settings,
    redis: Redis,
    api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """Two calls before a worker takes the first one's jobs (two people, or a retried
    request) queued each failure twice, and the receiver got it twice (review)."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 3)
    params = {"url": url, "event": "BUILD_END"}
    calls = await asyncio.gather(
        *(api.post(f"{V3}/retry", params=params, headers=UID) for _ in range(2))
    )
    later = await api.post(f"{V3}/retry", params=params, headers=UID)
    await run_worker()
    counts = sorted((c.json()["data"]["queued"], c.json()["data"]["alreadyQueued"]) for c in calls)
    assert counts == [(0, 3), (3, 0)]
    assert later.json()["data"] == {
        "queued": 0, "alreadyQueued": 3, "bodyNotKept": 0, "callbackGone": 0
    }  # fmt: skip
    assert len(receiver.requests()) == 6  # 3 failures, each sent again once


async def test_a_projects_window_redeliveries_walk_their_windows_one_at_a_time(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Each reads every record of its window (successes too, with their bodies): a
    project's admin asking for many at once had as many walks share Redis and the API
    process with everyone else's requests (review). Another project's is not held up."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 2)
    walks: list[str] = []
    async with Services.open(settings, redis) as services:
        read = services.history.final_failures

        def traced(project_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async def walk() -> AsyncIterator[Any]:
                walks.append(f"{project_id} in")
                async for record in read(project_id, *args, **kwargs):
                    await asyncio.sleep(0.01)  # a walk that takes a while
                    yield record
                walks.append(f"{project_id} out")

            return walk()

        services.history.final_failures = traced  # type: ignore[method-assign]
        asked = [("demo", url), ("demo", url), ("other", url)]
        await asyncio.gather(*(services.redeliver_failed(p, u, "BUILD_END") for p, u in asked))
    first = walks.index("demo out")
    assert walks[first + 1 :].count("demo in") == 1  # the second began after the first ended
    assert walks.index("other in") < walks.index("demo out")  # not behind demo's


async def test_window_redelivery_leaves_out_a_disabled_callback_until_it_is_enabled(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A disabled callback's redeliveries were queued and dropped with no attempt to show,
    and the one id of each then held its place for days: enabled again, its failures
    could not be sent again (review). Disabled when asked, they are left out; disabled
    after, their drop frees their ids."""
    url, callback_id = await failed_for_good(settings, redis, receiver, run_worker, 2)
    registry = Registry(redis)
    async with Services.open(settings, redis) as services:
        await registry.set_enabled(callback_id, False, "paused by an admin")
        disabled = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker()
        await registry.set_enabled(callback_id, True)
        dropped = await services.redeliver_failed("demo", url, "BUILD_END")
        await registry.set_enabled(callback_id, False, "paused before a worker took them")
        await run_worker()
        await registry.set_enabled(callback_id, True)
        enabled = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker()
    assert (disabled.queued, dropped.queued, enabled.queued) == (0, 2, 2)
    assert (disabled.callback_gone, dropped.callback_gone) == (2, 0)  # said, not silent
    assert len(receiver.requests()) == 4  # 2 failures, then each redelivery once


async def test_a_window_redelivery_counts_a_body_not_kept_and_sends_an_older_whole_one(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A failure whose record cut its body was left out without a word: the call said
    `queued: 0` and the console "no delivery of this window had finally failed" (the
    dead letters listed it). It is counted now; a delivery whose newest failure was cut but
    an older one kept whole is still sent, with the whole body."""
    url = receiver.script("/hook", answer(404))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    whole = settings.model_copy(update={"retry_schedule": ()})
    cut = whole.model_copy(update={"max_request_body": 200})
    await producer.emit("demo", "BUILD_END", {"pad": "w" * 600})
    await run_worker(whole)  # its record keeps the body whole
    await producer.emit("demo", "BUILD_END", {"pad": "c" * 600})
    await run_worker(cut)  # its record cuts it
    async with Services.open(settings, redis) as services:
        first = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker(cut)  # the redelivery fails again, its record cut
        second = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker(cut)
    assert (first.queued, first.body_not_kept) == (1, 1)
    assert (second.queued, second.body_not_kept) == (1, 1)  # the older whole record, sent
    bodies = [orjson.loads(seen.body)["data"]["pad"][0] for seen in receiver.requests()]
    assert sorted(bodies) == ["c", "w", "w", "w"]  # each "w" whole, never a cut one


async def test_a_window_redelivery_counts_only_deliveries_that_still_failed(
    settings: Settings, redis: Redis
) -> None:
    """A failure redelivered since with success was counted as left out when its callback
    was disabled after, or when its record in the window was cut (review): it needs
    nothing. Counted: a delivery whose newest attempt is still a final failure."""
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", URL, Event.BUILD_END, Region.DEVNET)
    now = now_ms()

    def attempt(n: int, ago: int, status: str, **more: Any) -> AttemptRecord:
        shape = {"status": status, "final": True, "callbackId": callback_id, **more}
        return cast("AttemptRecord", {**record(now - ago, n=n), **shape})

    await add_all(redis, settings, [
        attempt(1, 50, "FAILED", requestBodyTruncated=True), attempt(1, 40, "SUCCESS"),
        attempt(2, 30, "FAILED"), attempt(2, 20, "SUCCESS"),
        attempt(3, 10, "FAILED", requestBodyTruncated=True),  # cut, still failed
        attempt(4, 5, "FAILED"),  # whole, still failed: its callback is disabled
    ])  # fmt: skip
    await registry.set_enabled(callback_id, False, "paused")
    async with Services.open(settings, redis) as services:
        done = await services.redeliver_failed("demo", URL, "BUILD_END")
    assert (done.queued, done.body_not_kept, done.callback_gone) == (0, 1, 1)


async def test_a_window_redelivery_whose_job_expired_unsent_can_be_asked_again(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A job whose data expired before it ran is dropped on record without an attempt;
    a window redelivery's kept its queued-once key, so asking again sent nothing for days
    (review). The drop frees it."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 1)
    async with Services.open(settings, redis) as services:
        first = await services.redeliver_failed("demo", url, "BUILD_END")
        [job_id] = await redis.zrange(keys.QUEUE, 0, -1)
        await redis.delete(keys.arq_job(job_id.decode()))  # its data expired before it ran
        await run_worker()
        again = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker()
    entries = await redis.lrange(keys.DROPPED, 0, -1)  # type: ignore[misc]  # sync|async
    dropped = [orjson.loads(entry) for entry in entries]
    assert (first.queued, again.queued) == (1, 1)
    assert [entry["reason"] for entry in dropped] == ["job data expired before it ran"]
    assert len(receiver.requests()) == 2  # its failure, then the redelivery asked again


async def test_a_window_redelivery_whose_answer_was_lost_is_counted_as_queued(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The producer tries again when Redis' answer is lost; the jobs its first try queued
    were then counted as queued before: 0 (review)."""
    url, _ = await failed_for_good(settings, redis, receiver, run_worker, 2)
    tries = 0

    async def answer_lost_once(*args: Any) -> list[Any]:
        answers = await run_replicated(*args)
        nonlocal tries
        tries += 1
        if tries == 1:
            raise RedisConnectionError("the answer was lost")
        return answers

    monkeypatch.setattr("dispatcher.producer.run_replicated", answer_lost_once)
    async with Services.open(settings, redis) as services:
        queued = await services.redeliver_failed("demo", url, "BUILD_END")
    await run_worker()
    assert (tries, queued.queued, queued.already_queued) == (2, 2, 0)
    assert len(receiver.requests()) == 4


async def test_window_redelivery_is_for_admins_dead_letters_for_members(
    settings: Settings, redis: Redis
) -> None:
    settings = settings.model_copy(update={"open_access": False})
    await Roles(redis, settings, keys).grant("demo", "member-user", Role.MEMBER)
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            member = {"X-DEVOPS-UID": "member-user"}
            params = {"url": URL, "event": "BUILD_END"}
            denied = await client.post(f"{V4}/retry", params=params, headers=member)
            assert denied.status_code == 403 and "admin role" in denied.json()["message"]
            seen = await client.get(f"{V4}/dead-letters", headers=member)
            assert seen.status_code == 200 and seen.json()["data"] == []
            stranger = await client.get(f"{V4}/dead-letters", headers={"X-DEVOPS-UID": "x"})
            assert stranger.status_code == 403


async def test_a_deliverys_attempts_include_its_retries_and_redeliveries(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    async with Services.open(settings, redis) as services:
        await attempts_of_a_delivery(services, redis, receiver, run_worker)


async def attempts_of_a_delivery(
    services: Services, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(500), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await services.producer.emit("demo", "BUILD_END", {"n": 1})
    await services.producer.emit("demo", "BUILD_END", {"n": 2})  # another delivery
    await run_worker()
    page = await services.history_page("demo", url, "BUILD_END")
    first = min(page.records, key=lambda r: r.id)
    retried = await services.attempts(first)
    assert [(r.attempt, r.response_code) for r in retried] == [(2, 200), (1, 500)]
    assert {r.delivery_id for r in retried} == {first.delivery_id}

    await services.redeliver(first.id, "demo")
    await run_worker()
    again = await services.attempts(await services.get_record(first.id, "demo"))
    assert len(again) == 3 and again[0].redelivery_of == first.id
    assert [r.id for r in again] == sorted((r.id for r in again), reverse=True)  # newest first
    assert await services.history.attempts(first.delivery_id or "", "other") == []
    with pytest.raises(NotFound):
        await services.get_record(first.id, "other")


async def add_all(redis: Redis, settings: Settings, records: list[AttemptRecord]) -> list[int]:
    """Records of any shape written through the store, then (PostgreSQL) shipped."""
    history = open_history(settings, redis, keys)
    try:
        ids = [await history.add(r, dead=r["status"] == "FAILED") for r in records]
    finally:
        await history.close()
    await ship_all(settings, redis)
    return ids


# A record's shape: (ms ago, url, event, status, project)
Shape = tuple[int, str, str, str, str]


async def add_shapes(
    redis: Redis, settings: Settings, now: int, shapes: list[Shape]
) -> list[tuple[AttemptRecord, int]]:
    """Records of these shapes (the n-th's delivery `evt_n.1`) written, each with its id."""
    records: list[AttemptRecord] = [
        {**record(now - ago, url=url, event=event, n=i), "status": status, "projectId": project}
        for i, (ago, url, event, status, project) in enumerate(shapes)
    ]
    return list(zip(records, await add_all(redis, settings, records), strict=True))


def newest_first(
    written: list[tuple[AttemptRecord, int]], keep: Callable[[AttemptRecord], bool]
) -> list[int]:
    """The ids of the records `keep` keeps, newest first (ties: the higher id first)."""
    return [
        i for _, i in sorted(((r["createdTime"], i) for r, i in written if keep(r)), reverse=True)
    ]


async def test_a_projects_every_url_listing_is_bounded_and_one_at_a_time(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Recent deliveries" of every URL read up to 1,000 URLs, two indexes each, for a
    page of 50, as many at once as a member asked: a project of 1,000 URLs loaded the Redis
    every project shares (review). Now 100 URLs, one such listing of a project at a time."""
    registry = Registry(redis)
    for n in range(RECENT_URLS_MAX + 20):
        await registry.create("demo", f"https://e.com/{n}", Event.BUILD_END, Region.DEVNET)
    asked: list[tuple[str, int]] = []
    listings = {"running": 0, "most": 0}  # demo's every-URL listings at once
    async with Services.open(settings, redis) as services:
        real = services.history.recent

        async def counted(project_id: str, urls: list[str], **window: Any) -> Recent:
            asked.append((project_id, len(urls)))
            every = project_id == "demo" and len(urls) > 1
            listings["running"] += every
            listings["most"] = max(listings["most"], listings["running"])
            try:
                await asyncio.sleep(0.05)
                return await real(project_id, urls, **window)
            finally:
                listings["running"] -= every

        real_failures = services.history.failures
        failures_read: list[str] = []

        async def failures(project_id: str, **window: Any) -> Recent:
            failures_read.append(project_id)
            return await real_failures(project_id, **window)

        monkeypatch.setattr(services.history, "recent", counted)
        monkeypatch.setattr(services.history, "failures", failures)
        await asyncio.gather(
            *(services.recent(project) for project in ("demo", "demo", "demo", "other")),
            *(services.recent("demo", url=f"https://e.com/{n}") for n in range(2)),
        )
    assert sorted(asked) == [("demo", 1)] * 2 + [("demo", RECENT_URLS_MAX)] * 3 + [("other", 0)]
    assert sorted(failures_read) == ["demo"] * 3 + ["other"]  # one read each, every URL
    assert listings["most"] == 1
    assert not services._listing  # each project's lock goes with its last listing


async def test_the_every_url_listing_reads_a_bounded_number_of_callbacks(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project whose callbacks share few URLs (one URL, a callback per pipeline) made the
    every-URL listing read every callback looking for 100 distinct URLs: 10,000
    callbacks, 101 registry pages on each view (review). It looks among the first 1,000."""
    registry = Registry(redis)
    for n in range(RECENT_CALLBACKS_READ + 50):
        await registry.create("demo", "https://e.com/one", Event.BUILD_END, Region.DEVNET,
                              pipeline_id=f"pipe-{n}")  # fmt: skip
    await registry.create("demo", "https://e.com/two", Event.BUILD_START, Region.DEVNET)
    read: list[int] = []
    async with Services.open(settings, redis) as services:
        real = services.registry.list

        async def counted(project_id: str, page: int, size: int, **kw: Any) -> Any:
            found = await real(project_id, page, size, **kw)
            read.append(len(found.records))
            return found

        monkeypatch.setattr(services.registry, "list", counted)
        assert await services._urls("demo") == ["https://e.com/one"]
    assert sum(read) == RECENT_CALLBACKS_READ


async def test_recent_deliveries_of_a_url_across_its_events(
    redis: Redis, settings: Settings, store: HistoryStore
) -> None:
    now = now_ms()
    other = "http://127.0.0.1:9000/other"
    shapes: list[Shape] = [
        (9000, URL, "BUILD_END", "SUCCESS", "demo"),
        (8000, URL, "BUILD_START", "FAILED", "demo"),
        (7000, other, "BUILD_END", "FAILED", "demo"),
        (6000, URL, "BUILD_END", "SUCCESS", "elsewhere"),
        (5000, URL, "BUILD_START", "SUCCESS", "demo"),
        (5000, URL, "BUILD_END", "FAILED", "demo"),  # the same millisecond
        (5000, URL, "BUILD_STAGE_END", "SUCCESS", "demo"),
        (4000, URL, "BUILD_END", "FAILED", "demo"),
    ]
    written = await add_shapes(redis, settings, now, shapes)
    start, end = now - 60_000, now
    mine = newest_first(written, lambda r: r["callBackUrl"] == URL and r["projectId"] == "demo")

    found = await store.recent("demo", [URL], start_ms=start, end_ms=end)
    assert [r.id for r in found.records] == mine and found.next is None
    assert {r.events for r in found.records} == {"BUILD_END", "BUILD_START", "BUILD_STAGE_END"}

    failed = await store.recent(
        "demo", [URL], status=DeliveryStatus.FAILED, start_ms=start, end_ms=end
    )
    assert [r.status for r in failed.records] == [DeliveryStatus.FAILED] * 3
    succeeded = await store.recent(
        "demo", [URL], status=DeliveryStatus.SUCCESS, start_ms=start, end_ms=end
    )
    assert {r.id for r in failed.records} | {r.id for r in succeeded.records} == set(mine)

    # page by page through the cursor, ties at one millisecond included: each once, in order
    seen, before = [], None
    for _ in range(10):
        page = await store.recent("demo", [URL], before=before, limit=2, start_ms=start, end_ms=end)
        seen += [r.id for r in page.records]
        if page.next is None:
            break
        before = page.next
    assert seen == mine

    both = await store.recent(
        "demo", [URL, other], status=DeliveryStatus.FAILED, start_ms=start, end_ms=end
    )
    assert [r.call_back_url for r in both.records] == [URL, URL, other, URL]
    narrow = await store.recent("demo", [URL], start_ms=now - 5000, end_ms=now - 4500)
    assert [r.id for r in narrow.records] == mine[1:4]
    assert (await store.recent("demo", [], start_ms=start, end_ms=end)).records == []
    assert (
        await store.recent("demo", [URL], start_ms=0, end_ms=now - 86_400_000 * 8)
    ).records == []


async def test_a_projects_failures_are_every_failed_attempt_of_any_url_it_recorded(
    redis: Redis, settings: Settings, store: HistoryStore
) -> None:
    """ "Failures, last hour" read the first 100 URLs of the project's callbacks: a project
    of more missed the others' failures. It now reads every failed attempt the project
    recorded, whatever its URL and event, and no other project's."""
    now = now_ms()
    gone = "http://127.0.0.1:9000/removed"  # a URL no callback holds now
    shapes: list[Shape] = [
        (9000, URL, "BUILD_END", "FAILED", "demo"),
        (8000, gone, "BUILD_START", "FAILED", "demo"),
        (7000, URL, "BUILD_END", "SUCCESS", "demo"),
        (6000, URL, "BUILD_END", "FAILED", "demo2"),  # its id starts with demo's
        (5000, gone, "BUILD_END", "FAILED", "demo"),
        (5000, URL, "BUILD_STAGE_END", "FAILED", "demo"),  # the same millisecond
        (4000, URL, "BUILD_END", "FAILED", "elsewhere"),
        (3000, URL, "BUILD_END", "SUCCESS", "demo"),
    ]
    written = await add_shapes(redis, settings, now, shapes)
    mine = newest_first(written, lambda r: r["projectId"] == "demo" and r["status"] == "FAILED")
    start, end = now - 60_000, now

    found = await store.failures("demo", start_ms=start, end_ms=end)
    assert [r.id for r in found.records] == mine and found.next is None
    assert {r.call_back_url for r in found.records} == {URL, gone}
    seen, before = [], None
    for _ in range(10):  # page by page, the tie included: each once, in order
        page = await store.failures("demo", before=before, limit=1, start_ms=start, end_ms=end)
        seen += [r.id for r in page.records]
        if page.next is None:
            break
        before = page.next
    assert seen == mine
    narrow = await store.failures("demo", start_ms=now - 8500, end_ms=now - 4500)
    assert [r.id for r in narrow.records] == mine[:3]
    assert [
        r.project_id for r in (await store.failures("demo2", start_ms=start, end_ms=end)).records
    ] == ["demo2"]
    assert (await store.failures("nobody", start_ms=start, end_ms=end)).records == []


async def test_failures_of_the_last_hour_cover_a_project_of_more_than_100_urls(
    settings: Settings, redis: Redis
) -> None:
    """The console's "Failures, last hour" of a project past the every-URL listing's 100
    URLs: the failure of its last URL is listed. The every-URL listing of all statuses
    shows it too, beside the successes of the first 100 URLs (not those of the others),
    page by page."""
    registry = Registry(redis)
    for n in range(RECENT_URLS_MAX + 20):
        await registry.create("demo", f"https://e.com/{n}", Event.BUILD_END, Region.DEVNET)
    last, now = f"https://e.com/{RECENT_URLS_MAX + 19}", now_ms()
    oldest, failed_id, first_ok, last_ok = await add_all(redis, settings, [
        {**record(now - 4000, url="https://e.com/5", n=4), "status": "FAILED"},
        {**record(now - 3000, url=last, n=1), "status": "FAILED"},
        record(now - 2000, url="https://e.com/0", n=2),
        record(now - 1000, url=last, n=3),  # past the first 100 URLs: not listed
    ])  # fmt: skip
    async with Services.open(settings, redis) as services:
        failures = await services.recent("demo", status="FAILED", within="1h")
        every = await services.recent("demo", within="1h")
        ok = await services.recent("demo", status="SUCCESS", within="1h")
        seen, before = [], None
        for _ in range(5):
            page = await services.recent("demo", within="1h", limit=1, before=before)
            seen += [r.id for r in page.records]
            if page.next is None:
                break
            before = str(page.next)
    assert [r.id for r in failures.records] == [failed_id, oldest]
    assert [r.id for r in every.records] == [first_ok, failed_id, oldest] and every.next is None
    assert [r.id for r in ok.records] == [first_ok] and last_ok not in seen
    assert seen == [first_ok, failed_id, oldest]  # the last two: failures alone, more after


async def test_a_signature_stored_by_an_older_version_is_masked_when_read(
    settings: Settings, redis: Redis, api: httpx.AsyncClient
) -> None:
    """Older workers stored `webhook-signature` in clear: every read masks it, in both
    stores, on the API and on the console's attempt page."""
    old = record(now_ms())
    old["requestHeaders"] = [
        {"name": "X-DEVOPS-WEBHOOK-TOKEN", "value": "******"},
        {"name": "webhook-id", "value": "evt_0.1"},
        {"name": "Webhook-Signature", "value": "v1,CLEARsignatureBASE64="},
    ]
    old |= {"status": "FAILED", "final": True, "responseCode": 500}
    history = open_history(settings, redis, keys)
    try:
        record_id = await history.add(old, dead=True)
    finally:
        await history.close()
    await ship_all(settings, redis)
    texts = [
        (await api.get(V3, params={"url": URL, "event": "BUILD_END"}, headers=UID)).text,
        (await api.get(f"/console/projects/demo/history/{record_id}", headers=UID)).text,
    ]
    async with Services.open(settings, redis) as services:
        got = await services.get_record(record_id, "demo")
        texts.append(got.model_dump_json())
        dead = await services.dead_letters("demo")
        texts += [r.model_dump_json() for r in dead]
    assert [r.id for r in dead] == [record_id]
    assert {h.name: h.value for h in got.request_headers} == {
        "X-DEVOPS-WEBHOOK-TOKEN": "******", "webhook-id": "evt_0.1", "Webhook-Signature": "******",
    }  # fmt: skip
    assert not any("CLEARsignature" in text for text in texts)


async def test_redelivery_of_an_older_record_sends_its_stored_body_as_it_was(
    settings: Settings, redis: Redis, api: httpx.AsyncClient, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    """A record of an older version has no `projectId` in its body: it is sent as stored
    (its signature covers those bytes), and the project header names the record's project."""
    callback_id, _ = await Registry(redis).create(
        "demo", receiver.url(), Event.BUILD_END, Region.DEVNET
    )
    old = record(now_ms(), url=receiver.url())
    old |= {"requestBody": '{"event":"BUILD_END","data":{"n":1}}', "callbackId": callback_id}
    history = open_history(settings, redis, keys)
    try:
        record_id = await history.add(old)
    finally:
        await history.close()
    await ship_all(settings, redis)
    assert (await api.post(f"{V3}/{record_id}/retry", headers=UID)).json()["status"] == 0
    await run_worker()
    [seen] = receiver.requests()
    assert seen.body == b'{"event":"BUILD_END","data":{"n":1}}'
    assert seen.headers["X-DEVOPS-PROJECT-ID"] == "demo"


async def test_a_nul_in_the_url_is_a_400_on_both_backends(
    settings: Settings, redis: Redis, api: httpx.AsyncClient
) -> None:
    """No callback's URL holds a NUL, and PostgreSQL refuses one in text: it was a 500
    there (an empty page in Redis), asked for a page, a window's redelivery or a URL's
    recent deliveries (hostile-input review)."""
    params = {"url": "http://127.0.0.1:9000/\x00", "event": "BUILD_END"}
    asked = [
        await api.get(V3, params=params, headers=UID),
        await api.post(f"{V4}/retry", params=params, headers=UID),
    ]
    for response in asked:
        body = response.json()
        assert (response.status_code, body["status"]) == (400, 400), body
        assert body["message"] == "url must not contain a NUL character"
    async with Services.open(settings, redis) as services:
        with pytest.raises(InvalidInput, match="NUL"):
            await services.recent("demo", url=params["url"])


async def test_a_url_no_callback_can_have_is_a_400_and_reads_keep_no_url(
    api: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    """Every history read hashed its `url` through a cache of 16,384 URLs, and the
    parameter had no limit but the 8 KB query string: distinct long URLs kept ~129 MiB in
    each API process (review). A URL longer than any callback's (2,048 characters) is a
    400 naming `url`; a read hashes the URL it is asked for without keeping it (the cache
    is the worker's, for the URLs it writes records of)."""
    kept = keys_module._url_hash.cache_info().currsize
    for n in range(20):
        params = {"url": f"http://x.example/{n}/" + "a" * 4000, "event": "BUILD_END"}
        for response in (
            await api.get(V3, params=params, headers=UID),
            await api.post(f"{V4}/retry", params=params, headers=UID),
        ):
            body = response.json()
            assert (response.status_code, body["status"]) == (400, 400), body
            assert "'url'" in body["message"] and "2048 characters" in body["message"]
        params["url"] = f"http://x.example/{n:04d}/".ljust(2048, "a")  # any callback's length
        page = await api.get(V3, params=params, headers=UID)
        assert (page.status_code, page.json()["data"]["count"]) == (200, 0)
        retried = await api.post(f"{V4}/retry", params=params, headers=UID)
        assert retried.json()["data"]["queued"] == 0
        deliveries = await api.get("/console/projects/demo/deliveries",
                                   params={"url": params["url"]}, headers=UID)  # fmt: skip
        assert deliveries.status_code == 200
    assert keys_module._url_hash.cache_info().currsize == kept
    await fill(redis, settings, [now_ms()], url=f"http://x.example/{id(api)}/written")
    written = 0 if settings.history_url else 1  # the Redis store's write: its URL's hash kept
    assert keys_module._url_hash.cache_info().currsize == kept + written


async def test_a_record_past_the_retention_is_not_opened_listed_or_redelivered(
    api: httpx.AsyncClient, settings: Settings, redis: Redis, store: HistoryStore
) -> None:
    """Records past the retention are hidden from every read at once: the Redis store's
    page and attempts hid one an hour past it, but it could still be opened, listed as a
    dead letter and redelivered until the sweep took it (review)."""
    now = now_ms()
    old = now - settings.retention_ms - 3_600_000
    history = open_history(settings, redis, keys)
    stale = await history.add({**record(old, n=1), "status": "FAILED", "final": True}, dead=True)
    await ship_all(settings, redis, now_ms=old + 1000)  # PostgreSQL: shipped in its time
    fresh = await history.add(
        {**record(now - 9, n=2), "status": "FAILED", "final": True}, dead=True
    )
    await history.close()
    await ship_all(settings, redis)
    for limit in (50, 1):
        dead = await api.get(f"{V4_BASE}/callbacks/history/dead-letters?limit={limit}", headers=UID)
        assert [r["id"] for r in dead.json()["data"]] == [fresh]
    assert [r.id for r in await store.dead()] == [fresh]  # every project's
    retried = await api.post(f"{V3}/{stale}/retry", headers=UID)
    assert (retried.status_code, retried.json()["status"]) == (404, 404)
    assert retried.json()["message"] == f"history record {stale} not found in project demo"
    pages = [
        await api.get(f"/console/projects/demo/history/{n}", headers=UID) for n in (stale, fresh)
    ]
    assert [page.status_code for page in pages] == [404, 200]
    with pytest.raises(NotFound):
        await store.get(stale)
    assert await redis.zcard(settings.queue_name) == 0  # nothing redelivered


async def test_an_id_past_a_bigint_is_a_404_on_both_backends(api: httpx.AsyncClient) -> None:
    """A path takes 19 digits; past 2**63 - 1, PostgreSQL's bigint refused the id: a 500
    where any other unknown id is a 404 (hostile-input review)."""
    for record_id in (2**63 - 1, 2**63, 9_999_999_999_999_999_999):
        response = await api.post(f"{V3}/{record_id}/retry", headers=UID)
        assert (response.status_code, response.json()["status"]) == (404, 404), record_id


async def test_redelivering_a_record_of_a_disabled_callback_is_refused(
    settings: Settings, redis: Redis, api: httpx.AsyncClient, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    """It was answered as queued, then dropped by the worker unsent: no attempt to show
    for a 200 (the window's redelivery leaves such records out). Enabled again, it goes."""
    url = receiver.script("/hook", answer(404), answer(200))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()
    await ship_all(settings, redis)
    [first] = (await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)).json()[
        "data"
    ]["records"]
    await Registry(redis).set_enabled(callback_id, False, "paused")
    refused = await api.post(f"{V3}/{first['id']}/retry", headers=UID)
    assert (refused.status_code, refused.json()["status"]) == (409, 409)
    assert f"callback {callback_id} of history record {first['id']}" in refused.json()["message"]
    assert await redis.zcard(settings.queue_name) == 0  # nothing queued
    await Registry(redis).set_enabled(callback_id, True)
    queued = await api.post(f"{V3}/{first['id']}/retry", headers=UID)
    assert queued.json()["status"] == 0
    await run_worker()
    assert [s.path for s in receiver.seen] == ["/hook", "/hook"]


async def test_redelivering_a_record_of_a_deleted_callback_says_it_cannot_be(
    settings: Settings, redis: Redis, api: httpx.AsyncClient, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    """A deleted callback's records cannot be redelivered, and the 409 says so: it said
    "enable it (or register its URL again)", but a URL registered again is a new callback
    whose id the old records do not name, so they stayed refused for good (review)."""
    url = receiver.script("/hook", answer(404))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()
    await ship_all(settings, redis)
    page = await api.get(V3, params={"url": url, "event": "BUILD_END"}, headers=UID)
    [first] = page.json()["data"]["records"]
    await Registry(redis).set_enabled(callback_id, False, "paused")
    disabled = (await api.post(f"{V3}/{first['id']}/retry", headers=UID)).json()
    assert disabled["status"] == 409 and "is disabled: enable it" in disabled["message"]
    await Registry(redis).delete("demo", callback_id)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)  # a new id
    deleted = await api.post(f"{V3}/{first['id']}/retry", headers=UID)
    assert deleted.status_code == 409, deleted.text
    message = deleted.json()["message"]
    assert f"callback {callback_id} of history record {first['id']} is deleted" in message
    assert "cannot be redelivered" in message and "register" not in message.split("(")[0]
    assert await redis.zcard(settings.queue_name) == 0
