"""Who may do what; the gateway token; the emit route; health, readiness and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher.api import create_app
from dispatcher.api.probes import READY_BOUND
from dispatcher.auth import ALL_PROJECTS, Role, Roles
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.producer import Producer
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, RunWorker, free_port, make_settings

keys = Keys()  # today's key names (one shard)

CALLBACKS = "/apigw/v4/projects/demo/callbacks"
HISTORY = "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history"
CREATE = {"event": "BUILD_END", "region": "DEVNET", "url": "http://127.0.0.1:9000/hook"}


@pytest.fixture
def strict_settings(redis_server: EmbeddedRedis) -> Settings:
    return make_settings(redis_server.url, open_access=False, gateway_token="gw-secret")


@pytest.fixture
async def strict_api(strict_settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(strict_settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://d",
            headers={"X-DEVOPS-GATEWAY-TOKEN": "gw-secret"},
        ) as client:
            yield client


def as_user(uid: str) -> dict[str, str]:
    return {"X-DEVOPS-UID": uid}


async def test_gateway_token_is_required_when_configured(strict_api: httpx.AsyncClient) -> None:
    for token in ("", "wrong", "gw-secre"):
        response = await strict_api.get(
            CALLBACKS, headers={**as_user("alice"), "X-DEVOPS-GATEWAY-TOKEN": token}
        )
        assert response.status_code == 401
        assert "GATEWAY-TOKEN" in response.json()["message"]
    probe = await strict_api.get("/healthz", headers={"X-DEVOPS-GATEWAY-TOKEN": ""})
    assert probe.status_code == 200  # probes come from inside, not through the gateway


@pytest.fixture
async def roles(redis: Redis, strict_settings: Settings) -> Roles:
    """`admin-user` and `member-user` of project demo."""
    roles = Roles(redis, strict_settings, keys)
    await roles.grant("demo", "admin-user", Role.ADMIN)
    await roles.grant("demo", "member-user", Role.MEMBER)
    return roles


async def test_roles_decide_who_may_do_what(strict_api: httpx.AsyncClient, roles: Roles) -> None:
    await roles.grant(ALL_PROJECTS, "platform", Role.ADMIN)

    nobody = await strict_api.post(CALLBACKS, params=CREATE, headers=as_user("stranger"))
    assert nobody.status_code == 403
    assert "admin role in project 'demo'" in nobody.json()["message"]
    member = await strict_api.post(CALLBACKS, params=CREATE, headers=as_user("member-user"))
    assert member.status_code == 403 and "(has member)" in member.json()["message"]
    admin = await strict_api.post(CALLBACKS, params=CREATE, headers=as_user("admin-user"))
    assert admin.json()["data"] is True
    everywhere = await strict_api.post(
        "/apigw/v4/projects/other/callbacks", params=CREATE, headers=as_user("platform")
    )
    assert everywhere.json()["data"] is True

    listed = await strict_api.get(CALLBACKS, headers=as_user("member-user"))
    assert listed.json()["data"]["count"] == 1
    assert (await strict_api.get(CALLBACKS, headers=as_user("stranger"))).status_code == 403
    hist = await strict_api.get(
        HISTORY, params={"url": CREATE["url"], "event": "BUILD_END"}, headers=as_user("member-user")
    )
    assert hist.status_code == 200
    cb_id = listed.json()["data"]["records"][0]["id"]
    denied = await strict_api.delete(f"{CALLBACKS}/{cb_id}", headers=as_user("member-user"))
    assert denied.status_code == 403

    assert await roles.revoke("demo", "admin-user")
    revoked = await strict_api.post(CALLBACKS, params=CREATE, headers=as_user("admin-user"))
    assert revoked.status_code == 403


async def test_emit_route_queues_and_delivers(
    api: httpx.AsyncClient, receiver: Receiver, run_worker: RunWorker
) -> None:
    await api.post(CALLBACKS, params={**CREATE, "url": receiver.url()}, headers=UID)
    response = await api.post(
        "/apigw/v4/projects/demo/events",
        json={"event": "BUILD_END", "data": {"buildId": "b-7", "nested": {"ok": [1, 2]}}},
        headers=UID,
    )
    body = response.json()
    assert body["status"] == 0 and body["data"]["queued"] is True
    assert body["data"]["eventId"].startswith("evt_")
    await run_worker()
    [seen] = receiver.requests()
    assert seen.body == (
        b'{"event":"BUILD_END","projectId":"demo","data":{"buildId":"b-7","nested":{"ok":[1,2]}}}'
    )
    assert seen.headers["X-DEVOPS-PROJECT-ID"] == "demo"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"event": "NOPE", "data": {}}, "event"),
        ({"event": "BUILD_END", "data": [1, 2]}, "data"),
        ({"data": {}}, "'event' is required"),
    ],
)
async def test_emit_route_refuses_bad_bodies(
    api: httpx.AsyncClient, payload: dict[str, Any], fragment: str
) -> None:
    response = await api.post("/apigw/v4/projects/demo/events", json=payload, headers=UID)
    assert response.status_code == 400 and fragment in response.json()["message"]


async def test_emit_route_refuses_non_json_and_oversized_bodies(api: httpx.AsyncClient) -> None:
    bad = await api.post(
        "/apigw/v4/projects/demo/events",
        content=b"not json",
        headers={**UID, "Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["status"] == 400
    huge = await api.post(
        "/apigw/v4/projects/demo/events",
        content=b'{"event":"BUILD_END","data":{"x":"' + b"a" * (2 * 1024 * 1024) + b'"}}',
        headers={**UID, "Content-Type": "application/json"},
    )
    assert huge.status_code == 413 and huge.json()["status"] == 413


async def test_health_readiness_and_metrics(
    api: httpx.AsyncClient, receiver: Receiver, run_worker: RunWorker
) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json()["data"] == "ready"
    await api.post(CALLBACKS, params={**CREATE, "url": receiver.url()}, headers=UID)
    await api.post("/apigw/v4/projects/demo/events", json={"event": "BUILD_END"}, headers=UID)
    queued = (await api.get("/metrics")).text
    assert "dispatcher_queue_depth 1.0" in queued

    def delivered(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('dispatcher_deliveries_total{event="BUILD_END",outcome="success"}'):
                return float(line.split()[-1])
        return 0.0

    before = delivered(queued)
    await run_worker()
    after = (await api.get("/metrics")).text
    assert delivered(after) == before + 1
    assert "dispatcher_queue_depth 0.0" in after


async def test_readiness_fails_when_redis_is_unreachable(settings: Settings) -> None:
    from redis.asyncio import Redis

    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    app = create_app(settings, nowhere)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == 503
            assert ready.json()["message"] == "Redis unreachable"  # no address, no error text
            listed = await client.get(CALLBACKS, headers=UID)
            assert listed.status_code == 503
            assert listed.json() == {
                "data": None,
                "message": "storage (Redis) is unreachable; retry in a few seconds",
                "status": 503,
            }
    await nowhere.aclose()


async def test_readiness_holds_while_one_shard_answers(settings: Settings) -> None:
    """One shard away: ready, the shard named (its projects get 503s from their routes);
    not-ready took every API process out of service, every shard's projects with it. The
    message names no address or error text (anyone may ask)."""
    shards = [settings.redis_url or "", "redis://127.0.0.1:1/0"]
    sharded = settings.model_copy(update={"redis_shards": shards, "redis_timeout": 0.5})
    app = create_app(sharded)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "data": "ready",
        "message": "Redis unreachable on shard(s) 1",
        "status": 0,
    }


async def test_readiness_does_not_wait_out_a_frozen_shard(settings: Settings) -> None:
    """A shard that takes connections and never answers (a Redis stopped with SIGSTOP):
    /readyz waited `DISPATCHER_REDIS_TIMEOUT` (5 s) for it, past the Kubernetes probe's 3 s,
    and every API pod went NotReady (review). It answers within `READY_BOUND`, the shard
    named; here the Redis timeout is an hour, and the guard below is 20 times the bound."""

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # takes the PING, answers nothing

    port = free_port()
    shards = [settings.redis_url or "", f"redis://127.0.0.1:{port}/0"]
    sharded = settings.model_copy(update={"redis_shards": shards, "redis_timeout": 3600})
    app = create_app(sharded)
    async with app.router.lifespan_context(app):  # shard 1 refuses: a quick start
        frozen = await asyncio.start_server(silent, "127.0.0.1", port)  # now it hangs
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
                async with asyncio.timeout(20 * READY_BOUND):  # a hang guard, not a timing
                    ready = await client.get("/readyz")
        finally:
            frozen.close()
            for writer in held:
                writer.close()
            await frozen.wait_closed()
    assert ready.status_code == 200, ready.text
    assert ready.json()["message"] == "Redis unreachable on shard(s) 1"


async def test_a_query_parameter_given_twice_is_refused(api: httpx.AsyncClient) -> None:
    """No route takes a list: the last value won in silence (`role=admin&role=member`
    stored `member`; review). A 400 naming it, as a repeated identity header; nothing
    is registered. Once each, and a value holding `&` escaped, go through."""
    query = "event=BUILD_END&region=DEVNET&url=https://e.com/h&url=https://evil.example/h"
    refused = await api.post(f"{CALLBACKS}?{query}", headers=UID)
    assert refused.status_code == 400, refused.text
    assert refused.json()["message"] == "query parameter 'url' given more than once: send it once"
    assert (await api.get(CALLBACKS, headers=UID)).json()["data"]["records"] == []
    spelled = "event=BUILD_END&region=DEVNET&url=https://e.com/h&ur%6C=https://evil.example/h"
    assert (await api.post(f"{CALLBACKS}?{spelled}", headers=UID)).status_code == 400
    once = "event=BUILD_END&region=DEVNET&url=https://e.com/h%3Fa%3D1%26url%3D2"
    assert (await api.post(f"{CALLBACKS}?{once}", headers=UID)).json()["status"] == 0


async def test_oversized_query_string_is_refused(api: httpx.AsyncClient) -> None:
    response = await api.get(CALLBACKS, params={"pad": "x" * 9000}, headers=UID)
    assert response.status_code == 400 and "query string longer" in response.json()["message"]


async def test_every_answer_names_its_request_id(strict_api: httpx.AsyncClient) -> None:
    """The limits' own refusals included (they once ran outside the request-id middleware)."""
    refusals = [
        await strict_api.get(CALLBACKS, headers={**as_user("a"), "X-DEVOPS-GATEWAY-TOKEN": "no"}),
        await strict_api.get(CALLBACKS, params={"pad": "x" * 9000}, headers=as_user("a")),
        await strict_api.post(
            "/apigw/v4/projects/demo/events", content=b"x" * (2 * 1024 * 1024),
            headers={**as_user("a"), "Content-Type": "application/json"},
        ),
    ]  # fmt: skip
    assert [r.status_code for r in refusals] == [401, 400, 413]
    for response in refusals:
        assert len(response.headers["X-Request-ID"]) == 32
    mine = await strict_api.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert mine.headers["X-Request-ID"] == "trace-42"


async def test_a_request_id_is_taken_only_as_plain_text(strict_api: httpx.AsyncClient) -> None:
    """Every log line of the request carries it: C1 controls (NEL, CSI), white space or
    markup in it would reach them as they came; such an id is replaced by a new one."""
    for kept in ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", "ci.build_7:step-2", "x" * 64):
        answer = await strict_api.get("/healthz", headers={"X-Request-ID": kept})
        assert answer.headers["X-Request-ID"] == kept
    long = await strict_api.get("/healthz", headers={"X-Request-ID": "y" * 65})
    assert long.headers["X-Request-ID"] == "y" * 64  # its first 64, as before
    refused = (b'abc\x85{"level":"critical"}\x9b2J', b"a b", b"a\tb", b"<b>", b"a=1;b", b"\xc3\xa9")
    for sent in refused:
        answer = await strict_api.get("/healthz", headers=[(b"X-Request-ID", sent)])
        given = answer.headers["X-Request-ID"]
        assert len(given) == 32 and given.isalnum(), (sent, given)


async def test_a_body_sent_without_its_length_is_held_to_the_limit(
    api: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (512 * 1024)

    response = await api.post(
        "/apigw/v4/projects/demo/events", content=chunks(),
        headers={**UID, "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 413
    assert response.json() == {
        "data": None, "message": "request body larger than 1048576 bytes", "status": 413,
    }  # fmt: skip


def _emitted() -> float:
    return REGISTRY.get_sample_value("dispatcher_events_emitted_total") or 0.0


async def test_every_producer_counts_emitted_events(
    api: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    """The route, `Producer.emit` and `emit_many` move the same counter (it once counted
    the route only)."""
    before = _emitted()
    await api.post("/apigw/v4/projects/demo/events", json={"event": "BUILD_END"}, headers=UID)
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_END", {})
    await producer.emit_many([("demo", "BUILD_END", {})] * 3)
    assert _emitted() == before + 5


async def test_the_batch_emit_route_needs_the_admin_role(
    strict_api: httpx.AsyncClient, roles: Roles, redis: Redis, strict_settings: Settings
) -> None:
    batch, events = "/apigw/v4/projects/demo/events/batch", [{"event": "BUILD_END"}]
    member = await strict_api.post(batch, json=events, headers=as_user("member-user"))
    assert member.status_code == 403 and "(has member)" in member.json()["message"]
    assert await redis.zcard(strict_settings.queue_name) == 0
    admin = await strict_api.post(batch, json=events, headers=as_user("admin-user"))
    assert admin.json()["data"]["accepted"] == 1
