"""Where deliveries may go, on real sockets: proxy regions (a real forward proxy on
127.0.0.1 that resolves names itself) and the pinning of direct regions (a test-only hook
on the event loop's `getaddrinfo`, the one function every lookup of the process goes
through, whose answer changes between calls)."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher import lookups
from dispatcher.embedded import EmbeddedRedis
from dispatcher.lookups import PER_OWNER
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.worker import create_worker
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    all_records,
    app_client,
    free_port,
    hang,
    make_settings,
    proxying,
    until,
)

CALLBACKS = "/apigw/v4/projects/demo/callbacks"
AddrInfo = list[tuple[Any, ...]]
FAILURES = {
    socket.EAI_NONAME: "Name or service not known",
    socket.EAI_AGAIN: "Temporary failure in name resolution",
}


def rebinding(
    monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str | int]
) -> list[str | int]:
    """Make `name` resolve to `answers[0]`, then `answers[1]`, ... (the last repeating) in
    this event loop, an int being a lookup failure (`socket.EAI_*`); returns the answers
    given, one per lookup."""
    loop = asyncio.get_running_loop()
    real: Callable[..., Awaitable[AddrInfo]] = loop.getaddrinfo
    given: list[str | int] = []

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> AddrInfo:
        if host != name:
            return await real(host, port, *args, **kwargs)
        address = answers[min(len(given), len(answers) - 1)]
        given.append(address)
        if isinstance(address, int):
            raise socket.gaierror(address, FAILURES[address])
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, port or 0, 0, 0) if ":" in address else (address, port or 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return given


# ---- proxy regions ------------------------------------------------------------------------


async def test_a_proxy_region_refuses_what_the_worker_cannot_check(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """OSS goes through a proxy that resolves `internal.corp` (and `127.0.0.1.`) to the
    receiver on 127.0.0.1; OSS may not reach internal targets. Each is a final FAILED record
    saying why, and the proxy is never asked; IDC (internal allowed) goes through the same
    proxy, so the proxy would have carried them."""
    port = int(receiver.base.rsplit(":", 1)[1])
    rebinding(monkeypatch, "internal.corp", [socket.EAI_NONAME])  # as on a worker's host
    async with proxying({"internal.corp": "127.0.0.1"}) as proxy:
        settings = make_settings(
            redis_server.url,
            region_proxies={"OSS": proxy.url, "IDC": proxy.url},
            allow_internal_regions=["IDC"],
        )
        refused = {
            f"http://internal.corp:{port}/hook": "does not resolve from the worker",
            f"http://127.0.0.1.:{port}/hook": "internal address",
            f"http://localhost.:{port}/hook": "loopback name",
            f"http://[::ffff:127.0.0.1]:{port}/hook": "internal address",
        }
        registry = Registry(redis)
        for url in refused:
            await registry.create("demo", url, Event.BUILD_END, Region.OSS)
        await registry.create("demo", receiver.url("/idc"), Event.BUILD_END, Region.IDC)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert [seen.path for seen in receiver.seen] == ["/idc"]
    assert proxy.asked == ["127.0.0.1"]
    for url, why in refused.items():
        [record] = await all_records(redis, settings, url)
        assert record.final and record.status.value == "FAILED", url
        assert (record.error_msg or "").startswith("refused: "), (url, record.error_msg)
        assert why in (record.error_msg or ""), (url, record.error_msg)


async def test_a_proxy_regions_own_lookup_counts_within_the_attempts_total_timeout(
    redis_server: EmbeddedRedis, redis: Redis, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Through a proxy the worker looks the host up itself (to check its addresses) before
    the request: a resolver that hangs counts within the attempt's total timeout, and the
    attempt ends as retried, saying so. The lookup ran outside it: as long as the resolver
    took (a 25 s lookup, a 25 s attempt; its chunk ran into the job timeout), its
    `maxInFlight` slot lapsing meanwhile (review)."""
    loop = asyncio.get_running_loop()

    async def hanging(host: Any, port: Any, *args: Any, **kwargs: Any) -> AddrInfo:
        await asyncio.sleep(5)  # past the total timeout, then no answer
        raise socket.gaierror(socket.EAI_AGAIN, FAILURES[socket.EAI_AGAIN])

    monkeypatch.setattr(loop, "getaddrinfo", hanging)
    async with proxying() as proxy:
        settings = make_settings(
            redis_server.url,
            region_proxies={"OSS": proxy.url},
            total_timeout=1.0,
            connect_timeout=1.0,
            retry_schedule=(),
        )
        url = "http://slow-resolver.example:8080/hook"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.OSS)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert proxy.asked == []
    [record] = await all_records(redis, settings, url)
    assert record.final and record.error_msg == (
        "could not resolve host slow-resolver.example: timed out after 1s"
    )


async def test_a_proxy_regions_lookup_and_request_share_one_total_timeout(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A slow lookup (0.7 s) leaves the request what remains of the total (1 s): a receiver
    taking 0.7 s more is past it, the attempt timed out, as a receiver taking 1.4 s is."""
    loop, real = asyncio.get_running_loop(), asyncio.get_running_loop().getaddrinfo

    async def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> AddrInfo:
        if host != "slow.corp":
            return await real(host, port, *args, **kwargs)
        await asyncio.sleep(0.7)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(loop, "getaddrinfo", slow)
    port = int(receiver.base.rsplit(":", 1)[1])
    receiver.script("/hook", hang(0.7))
    async with proxying({"slow.corp": "127.0.0.1"}) as proxy:
        settings = make_settings(
            redis_server.url,
            region_proxies={"OSS": proxy.url},
            allow_internal_regions=["OSS"],
            total_timeout=1.0,
            connect_timeout=1.0,
            retry_schedule=(),
        )
        url = f"http://slow.corp:{port}/hook"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.OSS)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    [record] = await all_records(redis, settings, url)
    assert record.final and (record.error_msg or "").startswith("timed out after")


async def test_a_proxy_declared_enforcing_gets_the_names_the_worker_cannot_resolve(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`DISPATCHER_PROXY_ENFORCED_REGIONS`: the operator says the proxy applies the policy,
    so a name only the proxy knows is sent to it; literal addresses are still the worker's
    to refuse."""
    port = int(receiver.base.rsplit(":", 1)[1])
    rebinding(monkeypatch, "internal.corp", [socket.EAI_NONAME])
    async with proxying({"internal.corp": "127.0.0.1"}) as proxy:
        settings = make_settings(
            redis_server.url,
            region_proxies={"OSS": proxy.url},
            proxy_enforced_regions=["OSS"],
            allow_internal_regions=[],
        )
        registry = Registry(redis)
        await registry.create(
            "demo", f"http://internal.corp:{port}/hook", Event.BUILD_END, Region.OSS
        )
        literal = f"http://127.0.0.1.:{port}/literal"
        await registry.create("demo", literal, Event.BUILD_END, Region.OSS)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert [seen.path for seen in receiver.seen] == ["/hook"]
    assert proxy.asked == ["internal.corp"]
    [record] = await all_records(redis, settings, literal)
    assert record.final and "internal address" in (record.error_msg or "")


async def test_a_proxy_url_with_credentials_authorizes_each_request_and_shows_nowhere(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The credentials in a proxy's URL go to the proxy, as Basic Proxy-Authorization: on
    the request itself to an http:// URL, on the CONNECT that opens the tunnel to an
    https:// one (this proxy refuses tunnels). That it stays out of the tunnel is
    `tests/unit/test_hostile_units.py`'s to show (this proxy never forwards it)."""
    plain, tunnelled = receiver.url("/hook"), receiver.url("/tls").replace("http:", "https:")
    async with proxying() as proxy:
        with_login = proxy.url.replace("http://", "http://ops:s%40cret@")
        settings = make_settings(redis_server.url, region_proxies={"IDC": with_login})
        for url in (plain, tunnelled):
            await Registry(redis).create("demo", url, Event.BUILD_END, Region.IDC)
        await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
        await run_worker(settings)
    assert [seen.path for seen in receiver.seen] == ["/hook"]
    [record] = await all_records(redis, settings, plain)
    assert record.status.value == "SUCCESS"
    refused = await all_records(redis, settings, tunnelled)
    assert len(refused) == settings.max_attempts and refused[-1].final
    basic = "Basic " + base64.b64encode(b"ops:s@cret").decode()
    assert proxy.authorized == [basic] * (1 + len(refused))


async def test_a_temporary_lookup_failure_through_a_proxy_is_retried(
    redis_server: EmbeddedRedis, redis: Redis, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    given = rebinding(monkeypatch, "flaky.example", [socket.EAI_AGAIN])
    async with proxying() as proxy:
        settings = make_settings(redis_server.url, region_proxies={"OSS": proxy.url})
        url = "http://flaky.example/hook"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.OSS)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    records = await all_records(redis, settings, url)
    assert len(records) == settings.max_attempts == len(given)
    assert [r.final for r in records] == [False] * (len(records) - 1) + [True]
    assert all("could not resolve host flaky.example: Temporary" in (r.error_msg or "")
               for r in records)  # fmt: skip
    assert proxy.asked == []


def test_an_enforced_region_needs_a_proxy() -> None:
    with pytest.raises(ValueError, match="IDC"):
        make_settings("redis://127.0.0.1:1/0", proxy_enforced_regions=["IDC"])


async def test_trailing_dot_spellings_of_internal_hosts_are_refused_at_registration(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, allow_internal_regions=[])
    async with app_client(settings, redis) as client:
        for url in ("http://127.0.0.1.:9901/x", "http://127.1.:9901/x", "http://localhost.:9901/",
                    "http://api.localhost/", "http://[::1]:9901/"):  # fmt: skip
            response = await client.post(
                CALLBACKS, params={"event": "BUILD_END", "url": url, "region": "OSS"},
                headers=UID,
            )  # fmt: skip
            assert response.status_code == 400, (url, response.text)
            assert "internal" in response.json()["message"], (url, response.text)


# ---- direct regions: the address checked is the address connected to ---------------------


async def test_a_name_rebound_after_registration_is_refused_at_connect(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`rebind.test` answers a public address to the registration check, then 127.0.0.1:
    the delivery is refused on the address its connection would have used."""
    settings = make_settings(redis_server.url, allow_internal_regions=[])
    given = rebinding(monkeypatch, "rebind.test", ["93.184.215.14", "127.0.0.1"])
    url = receiver.url().replace("127.0.0.1", "rebind.test")
    async with app_client(settings, redis) as client:
        created = await client.post(
            CALLBACKS, params={"event": "BUILD_END", "url": url, "region": "DEVNET"}, headers=UID
        )
    assert created.json()["data"] is True, created.text
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert receiver.seen == []
    assert given == ["93.184.215.14", "127.0.0.1"]
    [record] = await all_records(redis, settings, url)
    assert record.final and "refused" in (record.error_msg or "")
    assert "host 'rebind.test' resolves to an internal address" in (record.error_msg or "")


async def test_a_name_refused_for_its_address_never_shows_the_address(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`vault.corp.internal -> 10.20.30.40 is an internal address` told any project admin
    what the platform's DNS answers for its internal names, at registration (400) and in a
    refused attempt's record. Both say what kind of address the name resolves to; the
    operator's log line alone has the address."""
    settings = make_settings(redis_server.url, allow_internal_regions=[])
    rebinding(monkeypatch, "vault.corp.internal", ["10.20.30.40"])
    rebinding(monkeypatch, "rebind.test", ["93.184.215.14", "10.20.30.41"])
    url = receiver.url().replace("127.0.0.1", "rebind.test")
    with capture_logs() as logs:
        async with app_client(settings, redis) as client:
            refused, created = [
                await client.post(
                    CALLBACKS,
                    params={"event": "BUILD_END", "url": u, "region": "DEVNET"},
                    headers=UID,
                )
                for u in ("http://vault.corp.internal/", url)
            ]
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert refused.status_code == 400 and refused.json()["data"] is None
    assert "host 'vault.corp.internal' resolves to an internal address" in refused.text
    assert created.json()["data"] is True, created.text
    [record] = await all_records(redis, settings, url)
    assert record.final and record.error_msg is not None
    assert record.error_msg.startswith("refused: host 'rebind.test' resolves to an internal")
    assert "10.20.30.40" not in refused.text and "10.20.30.41" not in record.model_dump_json()
    lines = [line for line in logs if line["event"] == "egress.refused"]
    logged = [(line["host"], line["address"], line["project"]) for line in lines]
    assert logged == [("vault.corp.internal", "10.20.30.40", "demo"),
                      ("rebind.test", "10.20.30.41", "demo")]  # fmt: skip
    assert {line["log_level"] for line in lines} == {"warning"}


@asynccontextmanager
async def listening(host: str, port: int, receiver: Receiver) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def test_a_direct_region_connects_to_the_very_address_its_resolver_checked(
    redis_server: EmbeddedRedis, redis: Redis, run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`pinned.test` answers ::1 to the first lookup and 127.0.0.1 to every later one; a
    receiver listens on each, on the same port. The delivery reaches ::1: aiohttp asked the
    checking resolver once and connected to its answer (a second lookup, by happy eyeballs
    or anything else, would have reached 127.0.0.1). The clients keep no DNS cache of
    aiohttp's: each lookup, and each answer kept, is its owner's (`dispatcher.lookups`),
    and its addresses are checked on every connection."""
    settings = make_settings(redis_server.url)  # both addresses allowed: only pinning decides
    first, later = Receiver(), Receiver()
    port = free_port()
    async with listening("::1", port, first), listening("127.0.0.1", port, later):
        given = rebinding(monkeypatch, "pinned.test", ["::1", "127.0.0.1"])
        url = f"http://pinned.test:{port}/hook"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert len(first.requests()) == 1
    assert later.seen == []
    assert given == ["::1"]


# ---- name lookups ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["its own names", "a name shared"])
async def test_a_projects_hung_name_lookups_hold_its_own_places_not_anothers(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch, shared: bool,
) -> None:  # fmt: skip
    """The process's lookups share a pool of 6 threads, as the system resolver's do here.
    `evil`'s 12 callbacks name hosts whose nameserver never answers: each lookup holds a
    thread 3 s, and its attempt gives up after 1 s (the thread stays). `demo`'s callback,
    emitted once evil's lookups hang, is delivered at its first attempt: evil holds at most
    `PER_OWNER` threads. Before, its lookups took all 6 and demo's queued behind them past
    its timeout (review). `shared`: evil's next event looks up demo's host too, and waits
    for a place; demo's lookup of it is its own (aiohttp's DNS cache shared the first
    caller's lookup, and demo waited on evil's places: second review)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(6)
    hung: list[str] = []

    def blocking(host: str, port: Any) -> AddrInfo:
        if host.endswith(".slow.test"):
            hung.append(host)
            time.sleep(3)
            raise socket.gaierror(socket.EAI_AGAIN, FAILURES[socket.EAI_AGAIN])
        return socket.getaddrinfo("127.0.0.1" if host == "fast.test" else host, port)

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> AddrInfo:
        return await loop.run_in_executor(pool, blocking, str(host), port)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    settings = make_settings(
        redis_server.url, total_timeout=1.0, connect_timeout=1.0, retry_schedule=(), dev_mode=True
    )
    port = int(receiver.base.rsplit(":", 1)[1])
    registry = Registry(redis)
    for n in range(12):
        url = f"http://h{n}.slow.test:{port}/evil"
        await registry.create("evil", url, Event.BUILD_END, Region.DEVNET)
    demo = f"http://fast.test:{port}/demo"
    await registry.create("demo", demo, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    worker = create_worker(settings, poll_delay=0.01, handle_signals=False)
    working = asyncio.create_task(worker.main())

    def evils(users: int) -> Callable[[], Awaitable[bool]]:  # evil's lookups, run or waiting
        async def check() -> bool:
            gate = lookups._GATES.get(loop, {}).get("evil")
            return gate is not None and gate.users >= users

        return check

    try:
        await producer.emit("evil", "BUILD_END", {})
        await until(evils(12), 10, "evil's lookups to hang or wait")
        if shared:  # its lookups that waited gave up with their attempts: 4 hang on

            async def gave_up() -> bool:
                return lookups._GATES[loop]["evil"].users == PER_OWNER

            await until(gave_up, 10, "evil's waiting lookups to give up")
            await registry.create("evil", f"http://fast.test:{port}/evil", Event.BUILD_END,
                                  Region.DEVNET)  # fmt: skip
            await producer.emit("evil", "BUILD_END", {})
            await until(evils(PER_OWNER + 9), 10, "its lookups, demo's host's too, to wait")
        await producer.emit("demo", "BUILD_END", {})
        await receiver.wait_for(1, "/demo", within=10)
    finally:
        worker.stop()
        await working
        await worker.close()
        pool.shutdown(wait=False, cancel_futures=True)
    assert [seen.path for seen in receiver.seen] == ["/demo"]
    [record] = await all_records(redis, settings, demo)
    assert record.status.value == "SUCCESS" and record.attempt == 1
    assert len(hung) == PER_OWNER  # the others waited for a place, and gave up
