"""Subscriptions at three levels (platform-wide, project, pipeline), one delivery per URL,
the custom auth header, and who may manage platform-wide callbacks: over the real app, a
real Redis, real burst workers and a real receiver."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from dispatcher.auth import ALL_PROJECTS, Role, Roles
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidInput
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, HistoryRecord
from dispatcher.producer import Producer
from dispatcher.settings import Settings
from dispatcher.tokens import TokenCipher
from tests.helpers import Receiver, RunWorker, answer, app_client, make_settings

keys = Keys()  # today's key names (one shard)

OP_TOKEN = "op-secret"
OPERATOR = {"X-DEVOPS-OPERATOR-TOKEN": OP_TOKEN}
ALICE = {"X-DEVOPS-UID": "alice"}
PLATFORM = "/operator/callbacks"


def project(project_id: str) -> str:
    return f"/apigw/v4/projects/{project_id}/callbacks"


def pipeline(project_id: str, pipeline_id: str) -> str:
    return f"/apigw/v4/projects/{project_id}/pipelines/{pipeline_id}/callbacks"


def params(url: str, event: str = "BUILD_END", **extra: str) -> dict[str, str]:
    return {"event": event, "region": "DEVNET", "url": url, **extra}


@pytest.fixture
def op_settings(redis_server: EmbeddedRedis) -> Settings:
    """Test settings with the operator token on (role checks off, as in `settings`)."""
    return make_settings(redis_server.url, operator_token=OP_TOKEN)


@pytest.fixture
async def op_api(op_settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(op_settings, redis) as client:
        yield client


async def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def add(
    client: httpx.AsyncClient, route: str, url: str, event: str = "BUILD_END", **extra: str
) -> None:
    """Register `url` through `route`, as the operator on /operator routes, else as alice."""
    who = OPERATOR if route.startswith(PLATFORM) else ALICE
    assert await ok(await client.post(route, params=params(url, event, **extra), headers=who))


async def history(
    redis: Redis, settings: Settings, owner: str, url: str, event: str
) -> list[HistoryRecord]:
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        owner, url, event, start_ms=now - 60_000, end_ms=now + 60_000, page_size=100
    )
    return list(reversed(page.records))


def sent_data(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    return [orjson.loads(seen.body)["data"] for seen in receiver.requests(path)]


async def test_project_events_reach_platform_callbacks_and_no_other_project(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    await add(op_api, PLATFORM, receiver.url("/platform"), "PROJECT_CREATE")
    for name in ("a", "b"):
        await add(op_api, project(name), receiver.url(f"/{name}"), "PROJECT_CREATE")
    await Producer(op_settings, redis).emit("a", "PROJECT_CREATE", {"projectId": "a", "n": 1})
    await run_worker()
    assert sent_data(receiver, "/platform") == [{"projectId": "a", "n": 1}]
    assert sent_data(receiver, "/a") == [{"projectId": "a", "n": 1}]
    assert receiver.requests("/b") == []  # another project's callbacks never see it
    # the platform's deliveries are on its own record, not in the project's history
    url = receiver.url("/platform")
    [record] = await history(redis, op_settings, PLATFORM_PROJECT, url, "PROJECT_CREATE")
    assert record.status.value == "SUCCESS"
    assert await history(redis, op_settings, "a", url, "PROJECT_CREATE") == []


async def test_a_platform_subscriber_gets_build_end_of_every_project(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    await add(op_api, PLATFORM, receiver.url("/audit"))
    await add(op_api, project("a"), receiver.url("/a"))
    producer = Producer(op_settings, redis)
    await producer.emit("a", "BUILD_END", {"projectId": "a", "buildId": "b-1"})
    await producer.emit("b", "BUILD_END", {"projectId": "b", "buildId": "b-2"})
    await producer.emit("c", "BUILD_START", {"projectId": "c"})  # not subscribed
    await run_worker()
    got = sorted(sent_data(receiver, "/audit"), key=lambda data: data["projectId"])
    assert got == [{"projectId": "a", "buildId": "b-1"}, {"projectId": "b", "buildId": "b-2"}]
    assert sent_data(receiver, "/a") == [{"projectId": "a", "buildId": "b-1"}]


async def test_a_pipeline_callback_gets_its_pipelines_builds_only(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    await add(op_api, pipeline("demo", "p1"), receiver.url("/p1"))
    await add(op_api, project("demo"), receiver.url("/all"))
    producer = Producer(op_settings, redis)
    for project_id, pipeline_id in [("demo", "p1"), ("demo", "p2"), ("demo", None),
                                    ("other", "p1"), ("demo", "p1:x")]:  # fmt: skip
        data = {"pipelineId": pipeline_id} if pipeline_id else {}
        await producer.emit(project_id, "BUILD_END", {**data, "projectId": project_id})
    await producer.emit("demo", "BUILD_START", {"pipelineId": "p1"})  # another event
    await run_worker()
    assert sent_data(receiver, "/p1") == [{"pipelineId": "p1", "projectId": "demo"}]
    assert len(receiver.requests("/all")) == 4  # the project's own: all of demo's builds

    listed = await ok(await op_api.get(project("demo"), headers=ALICE))
    assert sorted((cb["level"], cb["pipelineId"]) for cb in listed["records"]) == [
        ("pipeline", "p1"), ("project", None),
    ]  # fmt: skip
    only = await ok(await op_api.get(pipeline("demo", "p1"), headers=ALICE))
    assert [cb["url"] for cb in only["records"]] == [receiver.url("/p1")]
    assert (await ok(await op_api.get(pipeline("demo", "p2"), headers=ALICE)))["count"] == 0
    page = await op_api.get("/console/projects/demo", headers=ALICE)
    assert "<td>pipeline <span" in page.text and "<td>project</td>" in page.text

    callback_id = only["records"][0]["id"]
    gone = await op_api.delete(f"{pipeline('demo', 'p2')}/{callback_id}", headers=ALICE)
    assert gone.status_code == 404  # not that pipeline's
    await ok(await op_api.delete(f"{pipeline('demo', 'p1')}/{callback_id}", headers=ALICE))
    assert (await ok(await op_api.get(project("demo"), headers=ALICE)))["count"] == 1


async def test_project_events_are_not_pipeline_subscriptions(op_api: httpx.AsyncClient) -> None:
    """Nor is STREAM_ENABLED, whose data names no pipeline: a pipeline's callback to it was
    taken, and got nothing unless an emitter put a `pipelineId` in the data (review)."""
    url = "http://127.0.0.1:9/h"
    for event in ("PROJECT_UPDATE", "STREAM_ENABLED"):
        one = await op_api.post(pipeline("demo", "p1"), params=params(url, event),
                                headers=ALICE)  # fmt: skip
        assert one.status_code == 400 and "not a pipeline" in one.json()["message"]
    events = "BUILD_END,PROJECT_UPDATE,STREAM_ENABLED"
    batch = await ok(await op_api.post(f"{pipeline('demo', 'p1')}/batch",
                                       params=params(url, events), headers=ALICE))  # fmt: skip
    assert batch["successEvents"] == ["BUILD_END"]
    assert "project event" in batch["failureEvents"]["PROJECT_UPDATE"]
    assert "Git project" in batch["failureEvents"]["STREAM_ENABLED"]
    bad = await op_api.post(pipeline("demo", "a b"), params=params(url), headers=ALICE)
    assert bad.status_code == 400 and "pipelineId" in bad.json()["message"]


async def test_a_url_registered_at_two_levels_receives_each_event_once(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    url = receiver.url("/same")
    await add(op_api, PLATFORM, url, secretToken="platform")
    await add(op_api, project("demo"), url, secretToken="project")
    await add(op_api, pipeline("demo", "p1"), url, secretToken="pipe")
    producer = Producer(op_settings, redis)
    await producer.emit("demo", "BUILD_END", {"pipelineId": "p1"})
    await run_worker()
    [seen] = receiver.requests("/same")
    assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "platform"  # the broadest level sends it

    listed = await ok(await op_api.get(PLATFORM, headers=OPERATOR))
    [platform_cb] = listed["records"]
    assert platform_cb["level"] == "platform"
    await ok(await op_api.put(f"{PLATFORM}/{platform_cb['id']}/disable", headers=OPERATOR))
    await producer.emit("demo", "BUILD_END", {"pipelineId": "p1"})
    await run_worker()
    assert [s.headers["X-DEVOPS-WEBHOOK-TOKEN"] for s in receiver.requests("/same")] == [
        "platform", "project",
    ]  # fmt: skip
    assert len(await history(redis, op_settings, "demo", url, "BUILD_END")) == 1


# A URL registered at two levels for one event: (broader route, narrower route, what the
# event's data holds besides its status).
SHADOWS = {
    "platform-project": (PLATFORM, project("projA"), {}),
    "project-pipeline": (project("projA"), pipeline("projA", "p1"), {"pipelineId": "p1"}),
}
ONLY_FAILED = "data.status == 'FAILED'"


def chunked(chunk: int | None, settings: Settings) -> Settings:
    """`settings` with fan-out chunks of `chunk` callbacks (None: as they are)."""
    return (
        make_settings(settings.redis_url or "", operator_token=OP_TOKEN, fan_out_chunk=chunk)
        if chunk
        else settings
    )


async def shadowed_delivery(
    op_api: httpx.AsyncClient, redis: Redis, settings: Settings, receiver: Receiver,
    run_worker: RunWorker, pair: str, status: str, *, chunk: int | None,
) -> tuple[str, list[HistoryRecord]]:  # fmt: skip
    """The broader level of `pair` filters on FAILED, the narrower one takes everything;
    `chunk` 1 puts them in chunks of their own, the narrower one read first. Emits one
    event of `status`: the token of the one request the URL gets, and projA's records."""
    broader, narrower, extra = SHADOWS[pair]
    url = receiver.url("/same")
    registered = [(narrower, "narrow", {}), (broader, "broad", {"filter": ONLY_FAILED})]
    for route, token, more in registered if chunk else reversed(registered):
        await add(op_api, route, url, secretToken=token, **more)
    await Producer(settings, redis).emit("projA", "BUILD_END", {**extra, "status": status})
    await run_worker(chunked(chunk, settings))
    [seen] = receiver.requests("/same")
    return seen.headers["X-DEVOPS-WEBHOOK-TOKEN"], await history(
        redis, settings, "projA", url, "BUILD_END"
    )


@pytest.mark.parametrize("chunk", [None, 1], ids=["one-chunk", "chunk-each"])
@pytest.mark.parametrize("pair", list(SHADOWS))
@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED"], ids=["skipped", "taken"])
async def test_a_url_at_two_levels_gets_an_event_from_the_broader_one_only_if_its_filter_takes_it(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker, pair: str, chunk: int | None, status: str,
) -> None:  # fmt: skip
    token, records = await shadowed_delivery(
        op_api, redis, op_settings, receiver, run_worker, pair, status, chunk=chunk
    )
    if status == "FAILED":  # the broader callback's filter takes it: one request, its own
        assert token == "broad"
        assert len(records) == (1 if pair == "project-pipeline" else 0)  # the platform's: its own
        return
    assert token == "narrow"  # the broader callback does not take it: the narrower one does
    [record] = records
    assert record.status.value == "SUCCESS"
    [narrower] = (await ok(await op_api.get(SHADOWS[pair][1], headers=ALICE)))["records"]
    assert record.callback_id == narrower["id"]  # on the narrower callback's history


@pytest.mark.parametrize("chunk", [None, 1], ids=["one-chunk", "chunk-each"])
async def test_a_url_at_three_levels_gets_each_event_from_the_broadest_that_takes_it(
    op_api: httpx.AsyncClient, redis: Redis, op_settings: Settings, receiver: Receiver,
    run_worker: RunWorker, chunk: int | None,
) -> None:  # fmt: skip
    """The platform's filter takes FAILED and fails on the rest (`abs` of a string), the
    project's takes ABORTED, the pipeline's everything: each event reaches the URL once."""
    url = receiver.url("/same")
    levels = [
        (pipeline("projA", "p1"), "pipe", {}),
        (project("projA"), "proj", {"filter": "data.status == 'ABORTED'"}),
        (PLATFORM, "plat", {"filter": "data.status == 'FAILED' || abs(data.status) > `0`"}),
    ]  # narrowest first: the lowest ids, read first when each is a chunk of its own
    for route, token, more in levels if chunk else reversed(levels):
        await add(op_api, route, url, secretToken=token, **more)
    producer = Producer(op_settings, redis)
    for status in ("FAILED", "ABORTED", "SUCCEEDED"):
        await producer.emit("projA", "BUILD_END", {"pipelineId": "p1", "status": status})
    await run_worker(chunked(chunk, op_settings))
    got = {
        orjson.loads(seen.body)["data"]["status"]: seen.headers["X-DEVOPS-WEBHOOK-TOKEN"]
        for seen in receiver.requests("/same")
    }
    assert len(receiver.requests("/same")) == 3
    assert got == {"FAILED": "plat", "ABORTED": "proj", "SUCCEEDED": "pipe"}
    [platform_cb] = (await ok(await op_api.get(PLATFORM, headers=OPERATOR)))["records"]
    assert platform_cb["filterErrors"] == 2  # counted once an event, where it was its own


async def test_the_custom_auth_header_arrives_is_masked_and_never_shown(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    settings = make_settings(
        redis_server.url, operator_token=OP_TOKEN, token_keys=TokenCipher.new_key()
    )
    secrets = {"/proj": "PROJ-SECRET-1", "/pipe": "PIPE-SECRET-2", "/plat": "PLAT-SECRET-3"}
    receiver.script("/proj", answer(503), answer(200))  # its retry carries the header too
    routes = {"/proj": (project("demo"), ALICE), "/pipe": (pipeline("demo", "p1"), ALICE),
              "/plat": (PLATFORM, OPERATOR)}  # fmt: skip
    texts = []
    async with app_client(settings, redis) as client:
        for path, (route, who) in routes.items():
            header = {"authHeaderName": "X-Api-Key", "authHeaderValue": secrets[path]}
            created = await client.post(route, params=params(receiver.url(path), **header),
                                        headers=who)  # fmt: skip
            assert created.json()["data"] is True, created.text
            texts.append(created.text)
        await Producer(settings, redis).emit("demo", "BUILD_END", {"pipelineId": "p1"})
        with capture_logs() as logs:
            await run_worker(settings)
        for route, who in routes.values():
            listed = await client.get(route, headers=who)
            assert all(cb["hasAuthHeader"] for cb in listed.json()["data"]["records"])
            texts.append(listed.text)
            for cb in listed.json()["data"]["records"]:
                base = PLATFORM if who is OPERATOR else project("demo")
                texts.append((await client.get(f"{base}/{cb['id']}", headers=who)).text)
        texts.append((await client.get(
            "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history",
            params={"url": receiver.url("/proj"), "event": "BUILD_END"}, headers=ALICE,
        )).text)  # fmt: skip
        texts.append((await client.get("/console/projects/demo", headers=ALICE)).text)

    for path, secret in secrets.items():
        assert [s.headers["X-Api-Key"] for s in receiver.requests(path)] == [secret] * (
            2 if path == "/proj" else 1
        )
    records: list[HistoryRecord] = []
    for path in secrets:
        owner = PLATFORM_PROJECT if path == "/plat" else "demo"
        records += await history(redis, settings, owner, receiver.url(path), "BUILD_END")
    assert len(records) == 4
    for record in records:
        shown = {h.name: h.value for h in record.request_headers}
        assert shown["X-Api-Key"] == "******"
        texts.append(record.model_dump_json())
    stored = [
        await redis.hgetall(keys.callback(cid))  # type: ignore[misc]  # sync|async
        for cid in (1, 2, 3)
    ]
    texts += [repr(stored), repr(logs)]
    for secret in secrets.values():
        assert not any(secret in text for text in texts), secret


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("Host", "x", "reserved"),
        ("Content-Length", "1", "reserved"),
        ("transfer-encoding", "chunked", "reserved"),
        ("Connection", "close", "reserved"),
        ("X-DEVOPS-WEBHOOK-TOKEN", "x", "reserved"),
        ("X-Devops-Anything", "x", "reserved"),
        ("webhook-signature", "v1,x", "reserved"),
        ("Bad Name", "x", "HTTP header name"),
        ("X-Api-Key", "a\r\nX-Injected: 1", "line breaks"),
        ("X-Api-Key", "caf\u00e9", "printable ASCII"),
        ("X-Api-Key", None, "go together"),
        (None, "x", "go together"),
    ],
)
async def test_auth_header_names_and_values_are_checked(
    op_api: httpx.AsyncClient, name: str | None, value: str | None, fragment: str
) -> None:
    query = params("http://127.0.0.1:9/h")
    if name is not None:
        query["authHeaderName"] = name
    if value is not None:
        query["authHeaderValue"] = value
    for route, who in [(project("demo"), ALICE), (PLATFORM, OPERATOR)]:
        response = await op_api.post(route, params=query, headers=who)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["message"]
    assert (await ok(await op_api.get(project("demo"), headers=ALICE)))["count"] == 0


async def test_only_the_operator_token_manages_platform_callbacks(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, operator_token=OP_TOKEN, open_access=False)
    roles = Roles(redis, settings, keys)
    await roles.grant("demo", "alice", Role.ADMIN)
    await roles.grant(ALL_PROJECTS, "svc", Role.ADMIN)  # a platform service account
    with pytest.raises(InvalidInput, match="operator token"):
        await roles.grant(PLATFORM_PROJECT, "alice", Role.ADMIN)
    url = "http://127.0.0.1:9/audit"
    async with app_client(settings, redis) as client:
        emit = f"/apigw/v4/projects/{PLATFORM_PROJECT}/events"
        for who in ({"X-DEVOPS-UID": "alice"}, {"X-DEVOPS-UID": "svc"}):
            denied = [
                await client.post(PLATFORM, params=params(url), headers=who),
                await client.get(PLATFORM, headers=who),
                await client.post(project(PLATFORM_PROJECT), params=params(url), headers=who),
                await client.get(project(PLATFORM_PROJECT), headers=who),
                await client.post(emit, json={"event": "BUILD_END"}, headers=who),
            ]
            assert [r.status_code for r in denied] == [403] * len(denied), denied[-1].text
        wrong = await client.get(PLATFORM, headers={"X-DEVOPS-OPERATOR-TOKEN": "nope"})
        assert wrong.status_code == 401
        assert (await client.get(PLATFORM)).status_code == 401  # no credential at all

        await ok(await client.post(PLATFORM, params=params(url), headers=OPERATOR))
        [cb] = (await ok(await client.get(PLATFORM, headers=OPERATOR)))["records"]
        shown = (cb["level"], cb["projectId"], cb["creator"])
        assert shown == ("platform", PLATFORM_PROJECT, "operator")
        for who in ({"X-DEVOPS-UID": "alice"}, {"X-DEVOPS-UID": "svc"}):
            for response in [
                await client.put(f"{PLATFORM}/{cb['id']}/disable", headers=who),
                await client.delete(f"{PLATFORM}/{cb['id']}", headers=who),
                await client.delete(f"{project(PLATFORM_PROJECT)}/{cb['id']}", headers=who),
            ]:
                assert response.status_code == 403
            elsewhere = await client.get(f"{project('demo')}/{cb['id']}", headers=who)
            assert elsewhere.status_code == 404
        await ok(await client.put(f"{PLATFORM}/{cb['id']}/disable", headers=OPERATOR))
        await ok(await client.put(f"{PLATFORM}/{cb['id']}/enable", headers=OPERATOR))
        await ok(await client.delete(f"{PLATFORM}/{cb['id']}", headers=OPERATOR))
        assert (await ok(await client.get(PLATFORM, headers=OPERATOR)))["count"] == 0


async def test_the_reserved_project_is_no_event_source(op_settings: Settings, redis: Redis) -> None:
    with pytest.raises(InvalidInput, match="platform-wide"):
        await Producer(op_settings, redis).emit(PLATFORM_PROJECT, "BUILD_END", {})


async def test_a_platform_receiver_knows_which_project_emitted_an_event(
    redis_server: Any, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """projB's admin emits a PROJECT_DISABLE naming projA in its data: the receiver reads
    the emitter from the route, signed (`projectId` in the body) and in a header, on the
    first attempt and on the retry; no callback can send a header of that name itself."""
    settings = make_settings(redis_server.url, operator_token=OP_TOKEN, open_access=False)
    await Roles(redis, settings, keys).grant("projB", "bob", Role.ADMIN)
    bob = {"X-DEVOPS-UID": "bob"}
    url = receiver.script("/platform", answer(500), answer(200))
    async with app_client(settings, redis) as client:
        query = params(url, "PROJECT_DISABLE", secretToken="platform-token")
        await ok(await client.post(PLATFORM, params=query, headers=OPERATOR))
        forged = params(receiver.url("/b"), authHeaderName="X-DEVOPS-PROJECT-ID",
                        authHeaderValue="projA")  # fmt: skip
        refused = await client.post(project("projB"), params=forged, headers=bob)
        assert refused.status_code == 400 and "reserved" in refused.json()["message"]
        emitted = await client.post(
            "/apigw/v4/projects/projB/events", headers=bob,
            json={"event": "PROJECT_DISABLE", "data": {"projectId": "projA"}},
        )  # fmt: skip
        assert emitted.status_code == 200, emitted.text
    await run_worker(settings)

    first, retry = receiver.requests("/platform")
    key = "whsec_" + base64.b64encode(b"platform-token").decode()
    for seen in (first, retry):
        assert seen.body == (
            b'{"event":"PROJECT_DISABLE","projectId":"projB","data":{"projectId":"projA"}}'
        )
        assert seen.headers["X-DEVOPS-PROJECT-ID"] == "projB"
        Webhook(key).verify(seen.body, dict(seen.headers))  # the signature covers projectId
