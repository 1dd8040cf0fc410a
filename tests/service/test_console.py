"""The console over ASGI: what it shows is escaped, its forms need a valid CSRF token and
the admin role, it answers with pages (not JSON), and /docs works without a CDN."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html import unescape
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from redis.asyncio import Redis

from dispatcher.api import create_app
from dispatcher.auth import Role, Roles
from dispatcher.clock import now_ms
from dispatcher.console.csrf import COOKIE
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history import HistoryStore, open_history
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.stats import AttemptStats
from tests.helpers import (
    Receiver,
    RunWorker,
    answer,
    app_client,
    make_settings,
    serving_api,
)

keys = Keys()  # today's key names (one shard)

PROJECT = "/console/projects/demo"
XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'
SALT = "dispatcher-console-csrf"


class Markup(HTMLParser):
    """The elements and attributes a browser would build from a page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def token_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


@pytest.fixture
def strict_settings(redis_server: EmbeddedRedis) -> Settings:
    return make_settings(redis_server.url, open_access=False)


@pytest.fixture
async def strict(strict_settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(strict_settings, redis) as client:
        yield client


async def failed_delivery(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, **data: Any
) -> str:
    """One delivery whose only attempt failed for good (a 418 with an HTML body)."""
    url = receiver.script("/hook", answer(418, f"teapot {XSS}"))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "s3cret")
    await Producer(settings, redis).emit("demo", "BUILD_END", data)
    await run_worker()
    return url


async def dead_record_id(redis: Redis) -> int:
    [dead] = await redis.zrange(keys.HISTORY_DEAD, 0, -1)
    return int(dead)


async def test_everything_shown_is_escaped(
    api: httpx.AsyncClient, settings: Settings, redis: Redis, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    url = await failed_delivery(settings, redis, receiver, run_worker, note=XSS, html=IMG)
    other, _ = await Registry(redis).create(
        "demo", url + '?q="><i>x</i>', Event.BUILD_START, Region.DEVNET
    )
    await api.post(f"{PROJECT}/callbacks/{other}/disable")  # refused (no token): nothing changes
    page = await api.get(PROJECT)
    await api.post(
        f"{PROJECT}/callbacks/{other}/disable",
        data={"csrf_token": token_of(page.text), "reason": IMG},
    )
    rid = await dead_record_id(redis)
    pages = [
        PROJECT,
        f"{PROJECT}/history?url={url}&event=BUILD_END",
        f"{PROJECT}/history/{rid}",
        f"{PROJECT}/dead-letters",
    ]
    for path in pages:
        response = await api.get(path)
        assert response.status_code == 200, path
        markup = Markup(response.text)
        assert "script" not in markup.tags and "img" not in markup.tags and "i" not in markup.tags
        assert not [name for name in markup.attributes if name.startswith("on")], path
        assert "default-src 'none'" in response.headers["content-security-policy"]
    detail = Markup((await api.get(f"{PROJECT}/history/{rid}")).text)
    text = "".join(detail.text)
    assert XSS in text and f"teapot {XSS}" in text  # shown as text, request and response
    assert "s3cret" not in text and "******" in text  # the token header stays masked
    callbacks = "".join(Markup((await api.get(PROJECT)).text).text)
    assert IMG in callbacks and '"><i>x</i>' in callbacks


async def test_a_form_without_a_valid_csrf_token_is_refused(
    api: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    callback_id, _ = await Registry(redis).create(
        "demo", "http://127.0.0.1:9000/hook", Event.BUILD_END, Region.DEVNET
    )
    disable = f"{PROJECT}/callbacks/{callback_id}/disable"
    token = token_of((await api.get(PROJECT)).text)
    nonce = api.cookies[COOKIE]
    forged = URLSafeTimedSerializer("another key", salt=SALT)
    # the signature's first character changed: every bit of it counts (its last one's
    # lowest two do not: "...xx" for "...xw" was the same signature, once in 1,024 runs)
    signed, signature = token.rsplit(".", 1)
    wrong = f"{signed}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"

    refused = {
        "no token": await api.post(disable, data={"reason": "x"}),
        "a wrong token": await api.post(disable, data={"csrf_token": wrong}),
        "a token signed with another key": await api.post(
            disable, data={"csrf_token": forged.dumps(["anonymous", nonce])}
        ),
        "another user's token": await api.post(
            disable, data={"csrf_token": token}, headers={"X-DEVOPS-UID": "mallory"}
        ),
    }
    api.cookies.clear()
    refused["no cookie"] = await api.post(disable, data={"csrf_token": token})
    token = token_of((await api.get(PROJECT)).text)  # a new cookie, and its token
    assert api.cookies[COOKIE] != nonce
    refused["another browser's token"] = await api.post(
        disable, data={"csrf_token": forged.dumps(["anonymous", nonce])}
    )
    for why, response in refused.items():
        assert response.status_code == 403, why
        assert "CSRF" in response.text and response.headers["content-type"].startswith("text/html")
    assert (await Registry(redis).get(callback_id)).enabled

    done = await api.post(disable, data={"csrf_token": token, "reason": "maintenance"})
    assert done.status_code == 303
    assert done.headers["location"] == f"{PROJECT}?notice=disabled"
    callback = await Registry(redis).get(callback_id)
    assert (callback.enabled, callback.disabled_reason) == (False, "maintenance")
    assert "Callback disabled." in (await api.get(done.headers["location"])).text


async def test_members_look_and_admins_act(
    strict: httpx.AsyncClient, strict_settings: Settings, redis: Redis, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    roles = Roles(redis, strict_settings, keys)
    await roles.grant("demo", "ada", Role.ADMIN)
    await roles.grant("demo", "mia", Role.MEMBER)
    await failed_delivery(strict_settings, redis, receiver, run_worker)
    rid = await dead_record_id(redis)
    detail, redeliver = f"{PROJECT}/history/{rid}", f"{PROJECT}/history/{rid}/redeliver"
    queue = Queue(redis, Keys(strict_settings.queue_name))

    mia = {"X-DEVOPS-UID": "mia"}
    seen = await strict.get(detail, headers=mia)
    assert seen.status_code == 200 and "teapot" in seen.text
    assert "/redeliver" not in seen.text and "member of demo" in seen.text
    assert "/disable" not in (await strict.get(PROJECT, headers=mia)).text
    # no form for her; a token she makes by hand with the key is valid, her role is not
    key = await redis.get(keys.CONSOLE_CSRF_KEY)
    mine = URLSafeTimedSerializer(key, salt=SALT).dumps(["mia", strict.cookies[COOKIE]])
    refused = await strict.post(redeliver, data={"csrf_token": mine}, headers=mia)
    assert refused.status_code == 403 and "needs the admin role" in refused.text
    assert await queue.depth() == (0, 0.0)

    ada = {"X-DEVOPS-UID": "ada"}
    page = await strict.get(detail, headers=ada)
    assert f'action="{redeliver}"' in page.text
    done = await strict.post(redeliver, data={"csrf_token": token_of(page.text)}, headers=ada)
    assert done.status_code == 303 and done.headers["location"] == f"{detail}?notice=redelivered"
    assert (await queue.depth())[0] == 1

    stranger = await strict.get(PROJECT, headers={"X-DEVOPS-UID": "eve"})
    assert stranger.status_code == 403 and "Not allowed" in stranger.text
    nobody = await strict.get(PROJECT)
    assert nobody.status_code == 401 and "through the gateway" in nobody.text
    assert (await strict.get("/console/status")).status_code == 401


async def test_the_status_page_is_for_members_of_every_project(
    strict: httpx.AsyncClient, strict_settings: Settings, redis: Redis
) -> None:
    """It names every project's blocked ordered lanes (their keys are event data), failing
    callbacks and the fleet's hosts: anyone the gateway named could read them (review)."""
    roles = Roles(redis, strict_settings, keys)
    await roles.grant("demo", "ada", Role.ADMIN)
    await roles.grant("*", "ops", Role.MEMBER)
    ada = await strict.get("/console/status", headers={"X-DEVOPS-UID": "ada"})
    ops = await strict.get("/console/status", headers={"X-DEVOPS-UID": "ops"})
    for uid, shown in (("ada", False), ("ops", True)):  # the link, for those it lets in
        for path in (PROJECT, "/console"):
            page = await strict.get(path, headers={"X-DEVOPS-UID": uid})
            assert ('href="/console/status"' in page.text) is shown, (uid, path)
    assert ada.status_code == 403 and "needs the member role in project &#39;*&#39;" in ada.text
    assert ops.status_code == 200 and "<title>Status" in ops.text


async def test_open_access_lets_a_browser_without_identity_act(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    callback_id, _ = await Registry(redis).create(
        "demo", "http://127.0.0.1:9000/hook", Event.BUILD_END, Region.DEVNET
    )
    await Registry(redis).set_enabled(callback_id, False, "by hand")
    page = await api.get(PROJECT)
    assert page.status_code == 200 and "anonymous" in page.text and "open access" in page.text
    enable = f"{PROJECT}/callbacks/{callback_id}/enable"
    assert (await api.post(enable, data={"csrf_token": token_of(page.text)})).status_code == 303
    assert (await Registry(redis).get(callback_id)).enabled


async def test_the_gateway_token_guards_the_console_and_the_docs(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, gateway_token="gw")
    async with app_client(settings, redis) as client:
        for path in (
            "/console",
            "/console/static/console.css",
            "/docs",
            "/docs-static/swagger-ui.css",
        ):
            assert (await client.get(path)).status_code == 401, path
            through = await client.get(path, headers={"X-DEVOPS-GATEWAY-TOKEN": "gw"})
            assert through.status_code == 200, path


async def test_no_other_site_may_frame_the_docs_or_any_answer(api: httpx.AsyncClient) -> None:
    """Swagger UI (/docs) and ReDoc (/redoc) could be framed under another site's page, and
    no answer but the console's pages said `nosniff` (review). The docs keep their own
    scripts and styles (the policy says nothing of them); the console keeps its stricter
    policy, sent once."""
    paths = ["/docs", "/redoc", "/openapi.json", "/docs-static/swagger-ui-bundle.js"]
    paths += ["/docs-static/swagger-ui.css", "/healthz", "/apigw/v4/projects/demo/callbacks"]
    paths += ["/no/such/route", "/console"]
    for path in paths:
        answer = await api.get(path)  # the callbacks' list without X-DEVOPS-UID: its 401
        assert answer.headers["x-frame-options"] == "DENY", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        policies = answer.headers.get_list("content-security-policy")
        assert len(policies) == 1 and "frame-ancestors 'none'" in policies[0], path
    assert "default-src 'none'" in (await api.get("/console")).headers["content-security-policy"]
    types = {"js": "text/javascript", "css": "text/css", "png": "image/png"}  # as nosniff asks
    for page in ("/docs", "/redoc"):
        assets = re.findall(r'(?:src|href)="(/docs-static/[^"]+)"', (await api.get(page)).text)
        assert len(assets) >= 2, page
        for asset in assets:
            loaded = await api.get(asset)
            assert loaded.status_code == 200, asset
            assert loaded.headers["content-type"].startswith(types[asset.rpartition(".")[2]])


async def test_a_500_carries_the_answer_headers_too(settings: Settings, redis: Redis) -> None:
    """A bug's 500 leaves through Starlette's outermost middleware, past the one that adds
    the answer headers: it carried none of them (review), and now carries each, once."""
    app = create_app(settings, redis)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            answer = await client.get("/broken")
    assert answer.status_code == 500 and "RuntimeError" in answer.json()["message"]
    assert answer.headers.get_list("x-frame-options") == ["DENY"]
    assert answer.headers.get_list("x-content-type-options") == ["nosniff"]
    assert answer.headers.get_list("content-security-policy") == ["frame-ancestors 'none'"]
    assert answer.headers["x-request-id"]


async def test_history_form_bad_input_and_unknown_records_are_pages(
    api: httpx.AsyncClient,
) -> None:
    bad = await api.get(
        f"{PROJECT}/history",
        params={"url": "http://x/h", "event": "BUILD_END", "startTime": "soon"},
    )
    assert bad.status_code == 400 and "startTime must look like" in bad.text
    assert 'value="soon"' in bad.text  # the form keeps what was typed
    unknown = await api.get(f"{PROJECT}/history/424242")
    assert unknown.status_code == 404 and "history record 424242 not found" in unknown.text
    assert unknown.headers["content-type"].startswith("text/html")
    paging = await api.get(f"{PROJECT}?page=zero")
    assert paging.status_code == 400 and "bad parameter 'page'" in unescape(paging.text)


async def test_an_id_of_any_length_is_a_404_not_a_500(api: httpx.AsyncClient) -> None:
    """Past 4,300 digits Python refuses to read a number: these answered 500 (second
    review)."""
    long = "9" * 5000
    for method, path in (
        ("GET", f"{PROJECT}/history/{long}"),
        ("POST", f"{PROJECT}/history/{long}/redeliver"),
        ("POST", f"{PROJECT}/callbacks/{long}/enable"),
        ("POST", f"{PROJECT}/callbacks/{long}/disable"),
        ("POST", f"{PROJECT}/callbacks/{long}/secret"),
    ):
        response = await api.request(method, path)
        assert response.status_code == 404, (method, path[:60], response.text[:200])


async def test_redeliver_all_failed_of_a_window(
    api: httpx.AsyncClient, settings: Settings, redis: Redis, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    url = await failed_delivery(settings, redis, receiver, run_worker)
    history = await api.get(f"{PROJECT}/history", params={"url": url, "event": "BUILD_END"})
    assert "1 attempt of" in history.text
    done = await api.post(
        f"{PROJECT}/history/redeliver-failed",
        data={"csrf_token": token_of(history.text), "url": url, "event": "BUILD_END"},
    )
    assert done.status_code == 303
    shown = await api.get(done.headers["location"])
    assert "1 failed deliveries of this window were queued again." in shown.text
    receiver.script("/hook", answer(200))
    await run_worker()
    assert len(receiver.requests()) == 2


async def test_redeliver_failed_says_what_it_left_out(
    api: httpx.AsyncClient, settings: Settings, redis: Redis, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    """A window whose failures were all left out (their callback disabled) said "No
    delivery of this window had finally failed", while the dead letters listed them."""
    url = await failed_delivery(settings, redis, receiver, run_worker)
    await Registry(redis).set_enabled(1, False, "paused")
    history = await api.get(f"{PROJECT}/history", params={"url": url, "event": "BUILD_END"})
    done = await api.post(
        f"{PROJECT}/history/redeliver-failed",
        data={"csrf_token": token_of(history.text), "url": url, "event": "BUILD_END"},
    )
    shown = unescape((await api.get(done.headers["location"])).text)
    assert "0 failed deliveries of this window were queued again" in shown
    assert "left out: 0 whose request body was not kept whole (cut, or lost), 1 whose " in shown
    forged = await api.get(
        f"{PROJECT}/history", params={"notice": "window", "cut": "<b>x", "gone": "١٢"}
    )
    assert "left out: Some whose request body" in forged.text  # ASCII digits, else "Some"
    assert "Some whose callback is disabled" in forged.text


async def test_status_page_charts_the_last_hour_and_day(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    stats = AttemptStats()
    for outcome, ms in [("success", 40)] * 3 + [("retry", 5000), ("failed", 40)]:
        stats.count(outcome, ms)
    await stats.flush(redis, keys)
    page = await api.get("/console/status")
    assert page.status_code == 200 and "<title>Status · callback-dispatcher console" in page.text
    markup = Markup(page.text)
    assert "script" not in markup.tags and markup.tags.count("svg") == 4
    names = re.findall(r'<title id="[\w-]+-name">([^<]+)</title>', page.text)
    assert names == [
        "Attempts per minute in the last hour",
        "Attempt duration p50 and p99 per minute in the last hour",
        "Attempts per 10 minutes in the last day",
        "Attempt duration p50 and p99 per 10 minutes in the last day",
    ]
    # each span: one stacked bar per outcome in the latest bucket, one dot per percentile
    assert re.findall(r'class="bar (\w+)"', page.text) == ["success", "retry", "failed"] * 2
    assert re.findall(r'class="dot (\w+)"', page.text) == ["p99", "p50"] * 2
    # 5 attempts: 4 of 40 ms (bucket 30-50 ms), 1 of 5 s (3-5 s), interpolated in a bucket
    assert page.text.count("success 3, retry 1, failed 1; p50 42 ms, p99 4.9 s") == 2 * 5
    assert page.text.count("duration p50 42 ms, p99 4.9 s") == 2
    assert "No live worker" in page.text
    assert "(project " not in page.text  # nothing due: no oldest job named


async def test_the_status_page_names_the_project_of_the_oldest_due_job(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    await redis.zadd(keys.QUEUE, {"flood:evt_old": now_ms() - 700_000, "quiet:evt": now_ms()})
    page = await api.get("/console/status")
    assert page.status_code == 200 and "(project flood: flood:evt_old)" in page.text


async def test_an_unreachable_redis_is_a_503_page(settings: Settings) -> None:
    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    async with app_client(settings, nowhere) as client:
        page = await client.get(PROJECT)
        assert page.status_code == 503 and "Redis" in page.text
        assert page.headers["content-type"].startswith("text/html")
    await nowhere.aclose()


async def add_attempt(
    history: HistoryStore, url: str, at: int, *, event: str = "BUILD_END", status: str = "SUCCESS"
) -> int:
    """A record of one attempt, as a worker writes it, in the project demo."""
    code = 200 if status == "SUCCESS" else 503
    return await history.add({"projectId": "demo", "callBackUrl": url, "events": event,
                              "status": status, "startTime": at, "endTime": at,
                              "createdTime": at, "responseCode": code})  # fmt: skip


async def test_recent_deliveries_of_a_callback_and_the_failures_of_the_last_hour(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    hook, other = "https://ci.example.com/hook", "https://ci.example.com/other"
    registry = Registry(redis)
    await registry.create("demo", hook, Event.BUILD_END, Region.OSS)
    await registry.create("demo", hook, Event.BUILD_START, Region.OSS)
    await registry.create("demo", other, Event.BUILD_END, Region.OSS)
    now = now_ms()
    history = open_history(settings, redis, keys)
    shapes = [  # (minutes ago, url, event, status)
        (90, hook, "BUILD_END", "FAILED"),  # failed, but more than an hour ago
        (30, hook, "BUILD_START", "SUCCESS"),
        (20, hook, "BUILD_END", "FAILED"),
        (10, other, "BUILD_END", "FAILED"),
        (5, hook, "BUILD_START", "SUCCESS"),
    ]
    ids = [
        await add_attempt(history, url, now - ago * 60_000, event=event, status=status)
        for ago, url, event, status in shapes
    ]

    def shown(page: httpx.Response) -> list[int]:
        return [int(i) for i in re.findall(r'/history/(\d+)">#', page.text)]

    callbacks = await api.get(PROJECT)
    recent_link = f"{PROJECT}/deliveries?url=https%3A%2F%2Fci.example.com%2Fhook"
    assert callbacks.text.count(f'href="{recent_link}"') == 2  # one per callback of the URL
    failures_link = f'href="{PROJECT}/deliveries?status=FAILED&amp;within=1h">Failures, last hour'
    assert failures_link in callbacks.text  # one click from every project page

    recent = await api.get(f"{PROJECT}/deliveries", params={"url": hook})
    assert recent.status_code == 200 and "<title>Recent deliveries · demo" in recent.text
    assert shown(recent) == [ids[4], ids[2], ids[1], ids[0]]  # every event, newest first
    assert {"BUILD_END", "BUILD_START"} <= set(Markup(recent.text).text)
    failed = await api.get(f"{PROJECT}/deliveries", params={"url": hook, "status": "failed"})
    assert shown(failed) == [ids[2], ids[0]]

    last_hour = await api.get(f"{PROJECT}/deliveries?status=FAILED&within=1h")
    assert "<title>Failures of the last hour · demo" in last_hour.text
    assert 'aria-current="page">Failures, last hour' in last_hour.text
    assert shown(last_hour) == [ids[3], ids[2]]  # both URLs; not the one 90 minutes ago

    everything = await api.get(f"{PROJECT}/deliveries")
    assert shown(everything) == ids[::-1]
    bad = await api.get(f"{PROJECT}/deliveries", params={"status": "LOST"})
    assert bad.status_code == 400 and "status must be SUCCESS or FAILED" in bad.text
    bad_cursor = await api.get(f"{PROJECT}/deliveries", params={"before": "yesterday"})
    assert bad_cursor.status_code == 400 and "before must be" in bad_cursor.text


async def test_recent_deliveries_page_through_older_attempts(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    url = "https://ci.example.com/hook"
    now = now_ms()
    history = open_history(settings, redis, keys)
    ids = [await add_attempt(history, url, now - i) for i in range(60)]
    seen: list[int] = []
    address = f"{PROJECT}/deliveries?url=https%3A%2F%2Fci.example.com%2Fhook"
    for _ in range(3):
        page = await api.get(address)
        seen += [int(i) for i in re.findall(r'/history/(\d+)">#', page.text)]
        older = re.search(r'<a rel="next" href="([^"]+)">Older', page.text)
        if older is None:
            break
        address = unescape(older.group(1))
    assert seen == ids and "← Newest" in page.text  # 50, then 10


@pytest.mark.parametrize(
    ("trusted", "forwarded", "secure"),
    [
        (None, False, False),  # plain HTTP: no Secure
        (None, True, True),  # a TLS proxy on 127.0.0.1 (uvicorn's default trust): Secure
        ("10.9.9.9", True, False),  # the same headers from a peer not trusted: ignored
    ],
)
async def test_behind_a_tls_proxy_the_csrf_cookie_is_secure(
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    trusted: str | None,
    forwarded: bool,
    secure: bool,
) -> None:
    """`dispatcher api` behind a proxy that ends TLS: the CSRF cookie is `Secure` when the
    proxy says the browser came over HTTPS (`X-Forwarded-Proto`) and is trusted to say so
    (`FORWARDED_ALLOW_IPS`, uvicorn's: 127.0.0.1 by default; the proxy's address when it
    runs elsewhere). The README tells operators so; the test holds uvicorn to it."""
    if trusted is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", trusted)
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    async with serving_api(settings) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:
            page = await web.get(PROJECT, headers=headers if forwarded else {})
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie.lower()
    assert ("secure" in [part.strip().lower() for part in cookie.split(";")]) is secure, cookie
