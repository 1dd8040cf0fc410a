"""DNS rebinding against an API served on a loopback address (`dispatcher run`'s, with open
access): a page whose name its owner points at 127.0.0.1 is the console's own origin to the
browser. Its requests carry its own name in Host, which the API refuses there; on a real
uvicorn server, as the socket's address is what decides."""

from __future__ import annotations

import re

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.datastructures import Headers

from dispatcher.api.middleware import host_refusal
from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from tests.helpers import UID, make_settings, serving_api

EVIL = "rebind.attacker.example"
CALLBACKS = "/apigw/v4/projects/demo/callbacks"
PARAMS = {"url": "http://127.0.0.1:9/x", "event": "BUILD_END", "region": "DEVNET"}


async def test_a_rebound_name_is_refused_on_a_loopback_address(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """Under open access the rebound page read the console and disabled a callback through
    its own form, and registered a callback as anyone (review): each is now a 400 in the
    envelope, and nothing changes."""
    settings = make_settings(redis_server.url)
    callback, _ = await Registry(redis).create(
        "demo", "http://127.0.0.1:9/hook", Event.BUILD_END, Region.DEVNET
    )
    async with serving_api(settings) as port:
        foreign = {"Host": f"{EVIL}:{port}", "Sec-Fetch-Site": "same-origin"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:
            page = await web.get("/console/projects/demo")  # Host 127.0.0.1:port, as typed
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert page.status_code == 200 and token is not None
            answers = [
                await web.get("/console/projects/demo", headers=foreign),
                await web.post(
                    f"/console/projects/demo/callbacks/{callback}/disable",
                    data={"csrf_token": token.group(1), "reason": "rebound"},
                    headers=foreign,
                ),
                await web.post(CALLBACKS, params=PARAMS, headers={**foreign, **UID}),
                await web.get("/docs", headers={"Host": EVIL}),  # no port: refused alike
            ]
    for answer in answers:
        body = answer.json()
        assert (answer.status_code, body["status"], body["data"]) == (400, 400, None)
        assert "DISPATCHER_ALLOWED_HOSTS" in body["message"] and EVIL in body["message"]
    assert (await Registry(redis).get(callback)).enabled
    assert (await Registry(redis).list("demo")).count == 1


async def test_loopback_names_and_allowed_hosts_are_answered(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`localhost`, 127.0.0.0/8, [::1] and the unspecified addresses (what `dispatcher run
    --host 0.0.0.0` prints; no page's Host is one) with any port, and the names of
    DISPATCHER_ALLOWED_HOSTS: a TLS proxy on the same host forwarding its public Host (and
    `X-Forwarded-Proto`, trusted from 127.0.0.1: the CSRF cookie is `Secure`)."""
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    settings = make_settings(redis_server.url, allowed_hosts=["Dispatcher.Example.com."])
    hosts = ["localhost", "LOCALHOST:80", "127.0.0.1", "127.3.2.1:8443", "[::1]:8080", "[::1]"]
    hosts += ["0.0.0.0:8080", "[::]"]  # `dispatcher run --host 0.0.0.0`'s own URL (review)
    hosts += ["dispatcher.example.com", "dispatcher.example.com:443", "DISPATCHER.example.COM"]
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    async with serving_api(settings) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:
            for host in hosts:
                answer = await web.get("/console", headers={"Host": host, **proxied})
                assert answer.status_code == 200, host
            secure = await web.get(
                "/console/projects/demo", headers={"Host": "dispatcher.example.com", **proxied}
            )
            assert "secure" in secure.headers["set-cookie"].lower()
            for host in (EVIL, "example.com", "0.1.0.0", "127.0.0.1.nip.io", "[::2]", "[::1"):
                answer = await web.get("/console", headers={"Host": host})
                assert answer.status_code == 400, host


@pytest.mark.parametrize(
    ("server", "refused"),
    [
        (("127.0.0.1", 8080), True),
        (("::1", 8080), True),
        (("::ffff:127.0.0.1", 8080), True),  # an IPv6 socket's IPv4 peer
        (("10.0.0.7", 8080), False),  # in a container, behind the gateway: left to it
        (("dispatcher", 80), False),  # httpx's ASGITransport, as in most tests
        (("/run/dispatcher.sock", None), False),  # a Unix socket: no browser reaches it
        (None, False),
    ],
)
def test_only_a_loopback_socket_checks_the_host(
    server: tuple[str, int | None] | None, refused: bool
) -> None:
    scope = {"type": "http", "server": server, "headers": [(b"host", EVIL.encode())]}
    refusal = host_refusal(scope, Headers(scope=scope), frozenset())
    assert (refusal is not None) is refused
    everyone = host_refusal(scope, Headers(scope=scope), frozenset({"*"}))
    assert everyone is None


@pytest.mark.parametrize(
    "host", ["https://dispatcher.example.com", "dispatcher.example.com:443", "a/b", "", "::1"]
)
def test_an_allowed_host_that_could_never_match_stops_the_start(
    redis_server: EmbeddedRedis, host: str
) -> None:
    with pytest.raises(ValidationError, match="not a host name or address alone"):
        make_settings(redis_server.url, allowed_hosts=[host])
