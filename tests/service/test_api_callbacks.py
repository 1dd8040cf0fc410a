"""The registration routes of the seeds, and their neighbours, over the real app and Redis."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from redis.asyncio import Redis

from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from tests.helpers import UID

BASE = "/apigw-user/v4/projects/demo/callbacks"


async def create(api: httpx.AsyncClient, **params: str) -> httpx.Response:
    query = {"event": "BUILD_END", "region": "DEVNET", "url": "http://127.0.0.1:9000/hook"}
    query.update(params)
    return await api.post(BASE, params=query, headers={**UID, "Content-Type": "application/json"})


async def test_seed_create_example(api: httpx.AsyncClient, redis: Redis) -> None:
    response = await create(api, secretToken="s3cret")
    assert response.status_code == 200
    assert response.json() == {"data": True, "message": None, "status": 0}
    [target] = await Registry(redis).match("demo", "BUILD_END")
    assert (target.url, target.region, target.secret_token) == (
        "http://127.0.0.1:9000/hook",
        Region.DEVNET,
        "s3cret",
    )


@pytest.mark.parametrize("apigw", ["apigw-user", "apigw-app", "apigw"])
async def test_every_apigw_type_is_served(api: httpx.AsyncClient, apigw: str) -> None:
    response = await api.post(
        f"/{apigw}/v4/projects/demo/callbacks",
        params={"event": "BUILD_START", "region": "OSS", "url": "https://example.com/x"},
        headers=UID,
    )
    assert response.json()["data"] is True


async def test_unknown_apigw_type_is_a_clear_400(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/apigw-foo/v4/projects/demo/callbacks",
        params={"event": "BUILD_START", "region": "OSS", "url": "https://example.com/x"},
        headers=UID,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400 and body["data"] is None
    assert "apigwType" in body["message"]


async def test_upsert_updates_token_and_reenables(api: httpx.AsyncClient, redis: Redis) -> None:
    registry = Registry(redis)
    await create(api, secretToken="one")
    [first] = await registry.match("demo", "BUILD_END")
    await registry.set_enabled(first.id, False, "broken")
    assert await registry.match("demo", "BUILD_END") == []

    await create(api, secretToken="two", region="IDC")
    [again] = await registry.match("demo", "BUILD_END")
    assert again.id == first.id
    assert (again.secret_token, again.region) == ("two", Region.IDC)
    listed = (await api.get(BASE, headers=UID)).json()["data"]
    assert listed["count"] == 1
    assert listed["records"][0]["enabled"] is True
    assert listed["records"][0]["disabledReason"] is None


async def test_seed_batch_example(api: httpx.AsyncClient, redis: Redis) -> None:
    response = await api.post(
        f"{BASE}/batch",
        params={
            "event": " BUILD_START, BUILD_END ,NOT_AN_EVENT,BUILD_END,",
            "region": "DEVNET",
            "url": "http://127.0.0.1:9000/hook",
            "secretToken": "t",
        },
        headers=UID,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == 0
    assert body["data"]["successEvents"] == ["BUILD_START", "BUILD_END"]
    assert list(body["data"]["failureEvents"]) == ["NOT_AN_EVENT"]
    assert "unknown event" in body["data"]["failureEvents"]["NOT_AN_EVENT"]
    registry = Registry(redis)
    assert len(await registry.match("demo", "BUILD_START")) == 1
    assert len(await registry.match("demo", "BUILD_END")) == 1
    assert (await registry.list("demo")).count == 2


async def test_batch_with_no_valid_event_saves_nothing(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    response = await api.post(
        f"{BASE}/batch",
        params={"event": "NOPE", "region": "DEVNET", "url": "http://127.0.0.1:9000/h"},
        headers=UID,
    )
    body = response.json()
    assert body["data"] == {"failureEvents": {"NOPE": body["data"]["failureEvents"]["NOPE"]},
                            "successEvents": []}  # fmt: skip
    assert (await Registry(redis).list("demo")).count == 0


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"region": "MARS"}, "region"),
        ({"event": "BUILD_FINISHED"}, "event"),
        ({"url": "ftp://example.com/x"}, "http:// or https://"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://"}, "no host"),
        ({"url": "http://169.254.169.254/latest"}, "metadata"),
        ({"url": "http://example.com:6379/"}, "port 6379"),
    ],
)
async def test_bad_input_is_a_clear_400(
    api: httpx.AsyncClient, redis: Redis, params: dict[str, str], fragment: str
) -> None:
    response = await create(api, **params)
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400 and body["data"] is None
    assert fragment in body["message"]
    assert (await Registry(redis).list("demo")).count == 0


async def test_missing_parameters_are_named(api: httpx.AsyncClient) -> None:
    response = await api.post(BASE, params={"event": "BUILD_END"}, headers=UID)
    assert response.status_code == 400
    message = response.json()["message"]
    assert "'url' is required" in message and "'region' is required" in message


async def test_missing_uid_is_401(api: httpx.AsyncClient) -> None:
    response = await api.post(
        BASE, params={"event": "BUILD_END", "region": "DEVNET", "url": "http://127.0.0.1:1/h"}
    )
    assert response.status_code == 401
    assert response.json() == {
        "data": None,
        "message": "header X-DEVOPS-UID is required (the calling user's name)",
        "status": 401,
    }


async def test_list_pages_and_never_shows_tokens(api: httpx.AsyncClient) -> None:
    for i in range(5):
        await create(api, url=f"http://127.0.0.1:9000/h{i}", secretToken=f"secret-{i}")
    first = await api.get(BASE, params={"page": 1, "pageSize": 2}, headers=UID)
    last = await api.get(BASE, params={"page": 3, "pageSize": 2}, headers=UID)
    past = await api.get(BASE, params={"page": 4, "pageSize": 2}, headers=UID)
    assert [r["url"] for r in first.json()["data"]["records"]] == [
        "http://127.0.0.1:9000/h0",
        "http://127.0.0.1:9000/h1",
    ]
    assert [r["url"] for r in last.json()["data"]["records"]] == ["http://127.0.0.1:9000/h4"]
    assert past.json()["data"]["records"] == []
    assert first.json()["data"]["count"] == 5 and first.json()["data"]["totalPages"] == 3
    assert first.json()["data"]["records"][0]["hasSecretToken"] is True
    assert "secret-" not in first.text + last.text


async def test_delete_and_enable_disable(api: httpx.AsyncClient, redis: Redis) -> None:
    await create(api)
    [cb] = (await api.get(BASE, headers=UID)).json()["data"]["records"]
    disabled = await api.put(f"{BASE}/{cb['id']}/disable", params={"reason": "maint"}, headers=UID)
    assert disabled.json()["data"] is True
    shown = (await api.get(f"{BASE}/{cb['id']}", headers=UID)).json()["data"]
    assert (shown["enabled"], shown["disabledReason"]) == (False, "maint")
    assert await Registry(redis).match("demo", "BUILD_END") == []

    assert (await api.put(f"{BASE}/{cb['id']}/enable", headers=UID)).json()["data"] is True
    assert len(await Registry(redis).match("demo", "BUILD_END")) == 1

    assert (await api.delete(f"{BASE}/{cb['id']}", headers=UID)).json()["data"] is True
    gone = await api.delete(f"{BASE}/{cb['id']}", headers=UID)
    assert gone.status_code == 404 and gone.json()["status"] == 404
    assert await Registry(redis).match("demo", "BUILD_END") == []
    # the upsert key went with it: registering again creates a new callback
    await create(api)
    [fresh] = (await api.get(BASE, headers=UID)).json()["data"]["records"]
    assert fresh["id"] != cb["id"]


@pytest.mark.parametrize("reason", ["maint\r\nX-Forged: 1", "\x1b[2J", "a\x00b", "\u202eevil"])
async def test_a_disabled_reason_with_control_characters_is_refused(
    api: httpx.AsyncClient, reason: str
) -> None:
    """A reason is shown as it is (console, CLI, logs): control characters in it are
    refused with a 400 naming `reason`, as in a URL; the callback stays as it was."""
    await create(api)
    [cb] = (await api.get(BASE, headers=UID)).json()["data"]["records"]
    refused = await api.put(f"{BASE}/{cb['id']}/disable", params={"reason": reason}, headers=UID)
    assert refused.status_code == 400, refused.text
    assert "reason" in refused.json()["message"]
    shown = (await api.get(f"{BASE}/{cb['id']}", headers=UID)).json()["data"]
    assert (shown["enabled"], shown["disabledReason"]) == (True, None)


@pytest.mark.parametrize("text", ["\x1b[2J\x1b]0;pwned\x07", "a\x00b", "\u202eevil", "x\u200by"])
async def test_a_pipeline_id_or_filter_with_control_characters_is_refused(
    api: httpx.AsyncClient, text: str
) -> None:
    """A pipeline id and a filter are shown as they are (console, CLI, logs): with ESC in
    them `dispatcher callbacks list` cleared the operator's screen and retitled the
    terminal (review). Both are a 400 naming them, and nothing is stored."""
    pipeline = quote(f"p1{text}", safe="")
    where = f"/apigw-user/v4/projects/demo/pipelines/{pipeline}/callbacks"
    params = {"event": "BUILD_END", "region": "DEVNET", "url": "https://e.com/h"}
    refused = await api.post(where, params=params, headers=UID)
    assert refused.status_code == 400 and "pipelineId" in refused.json()["message"], refused.text
    with_filter = {**params, "filter": f"data.x == '{text}'"}
    refused = await api.post(BASE, params=with_filter, headers=UID)
    assert refused.status_code == 400 and "filter" in refused.json()["message"], refused.text
    assert (await api.get(BASE, headers=UID)).json()["data"]["records"] == []


async def test_other_projects_callbacks_are_not_found(api: httpx.AsyncClient) -> None:
    await create(api)
    [cb] = (await api.get(BASE, headers=UID)).json()["data"]["records"]
    other = "/apigw-user/v4/projects/other/callbacks"
    assert (await api.delete(f"{other}/{cb['id']}", headers=UID)).status_code == 404
    assert (await api.put(f"{other}/{cb['id']}/disable", headers=UID)).status_code == 404
    assert (await api.get(f"{other}/{cb['id']}", headers=UID)).status_code == 404


async def test_an_id_of_any_length_is_a_clear_404(api: httpx.AsyncClient) -> None:
    """Past 4,300 digits Python refuses to read a number: the id route answered 500 before
    any check (review). An id longer than 64 bits can name nothing: no route."""
    for digits in (19, 20, 5000):
        for method, path in (
            ("GET", ""),
            ("DELETE", ""),
            ("POST", "/secret?secretToken=s"),
            ("PUT", "/enable"),
        ):
            response = await api.request(method, f"{BASE}/{'9' * digits}{path}", headers=UID)
            assert response.status_code == 404, (digits, method, response.text[:200])
            assert response.json()["status"] == 404
    retry = await api.post(f"{BASE}/history/{'9' * 5000}/retry", headers=UID)
    assert retry.status_code == 404 and retry.json()["status"] == 404


async def test_match_returns_only_enabled_callbacks_of_that_event(redis: Redis) -> None:
    registry = Registry(redis)
    a, _ = await registry.create("p", "http://127.0.0.1:1/a", Event.BUILD_END, Region.OSS)
    b, _ = await registry.create("p", "http://127.0.0.1:1/b", Event.BUILD_END, Region.OSS)
    await registry.create("p", "http://127.0.0.1:1/c", Event.BUILD_START, Region.OSS)
    await registry.create("q", "http://127.0.0.1:1/d", Event.BUILD_END, Region.OSS)
    await registry.set_enabled(b, False, "off")
    assert [t.id for t in await registry.match("p", "BUILD_END")] == [a]


async def test_openapi_describes_every_route(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    v4 = "/{apigwType}/v4/projects/{projectId}"
    assert {"post"} <= set(paths[f"{v4}/callbacks"])
    assert "get" in paths[f"{v4}/callbacks"]
    assert "post" in paths[f"{v4}/callbacks/batch"]
    assert "get" in paths["/ms/openapi/api/apigw/v3/projects/{projectId}/callbacks/history"]
    assert "get" in paths[f"{v4}/callbacks/history"]
    assert {"get", "delete"} <= set(paths[f"{v4}/callbacks/{{callbackId}}"])
    assert "put" in paths[f"{v4}/callbacks/{{callbackId}}/enable"]
    assert "post" in paths[f"{v4}/events"]
    pipeline = f"{v4}/pipelines/{{pipelineId}}/callbacks"
    assert {"post", "get"} <= set(paths[pipeline]) and "post" in paths[f"{pipeline}/batch"]
    assert "delete" in paths[f"{pipeline}/{{callbackId}}"]
    assert {"post", "get"} <= set(paths["/operator/callbacks"])
    assert "post" in paths["/operator/callbacks/batch"]
    assert {"get", "delete"} <= set(paths["/operator/callbacks/{callbackId}"])
    assert "put" in paths["/operator/callbacks/{callbackId}/enable"]
    assert "put" in paths["/operator/callbacks/{callbackId}/disable"]
    for prefix in (v4, f"{v4}/pipelines/{{pipelineId}}", "/operator"):
        assert "post" in paths[f"{prefix}/callbacks/{{callbackId}}/secret"]
    assert "get" in paths["/{apigwType}/v4/callbacks/events"]
    seed = {"event", "url", "region", "secretToken", "authHeaderName", "authHeaderValue"}
    seed |= {"maxPerSecond", "maxInFlight", "filter", "orderBy"}  # the receiver controls
    params = {p["name"] for p in paths[f"{v4}/callbacks"]["post"]["parameters"]}
    assert params == seed | {"apigwType", "projectId", "X-DEVOPS-UID"}
    params = {p["name"] for p in paths[pipeline]["post"]["parameters"]}
    assert params == seed | {"apigwType", "projectId", "pipelineId", "X-DEVOPS-UID"}
    params = {p["name"] for p in paths["/operator/callbacks"]["post"]["parameters"]}
    assert params == seed | {"X-DEVOPS-OPERATOR-TOKEN", "X-DEVOPS-UID"}
