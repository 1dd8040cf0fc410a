"""Secrets at rest, SSRF and regions, endpoint health, circuit breaker, poison jobs."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis as redis_py
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher.api import create_app
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.health import CircuitBreaker
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.tokens import TokenCipher
from dispatcher.worker import create_worker
from dispatcher.worker.circuit import ENDED
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    all_records,
    answer,
    app_client,
    make_settings,
    until,
)

keys = Keys()  # today's key names (one shard)
DEFERRED = "dispatcher_deliveries_deferred_total"

CALLBACKS = "/apigw/v4/projects/demo/callbacks"


# ---- secret tokens ------------------------------------------------------------------------


async def test_tokens_are_encrypted_at_rest_and_rotate(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    old_key, new_key = TokenCipher.new_key(), TokenCipher.new_key()
    settings = make_settings(redis_server.url, token_keys=old_key)
    registry = Registry(redis, settings.token_cipher())
    callback_id, _ = await registry.create(
        "demo", receiver.url(), Event.BUILD_END, Region.DEVNET, "plain-secret"
    )
    stored = await redis.hget(keys.callback(callback_id), "secretToken")  # type: ignore[misc]  # sync|async
    assert stored is not None and stored.startswith(b"fernet:")
    assert b"plain-secret" not in stored

    rotated = make_settings(redis_server.url, token_keys=f"{new_key},{old_key}")
    assert await Registry(redis, rotated.token_cipher()).rotate_tokens() == (1, 0, 0, ())
    only_new = make_settings(redis_server.url, token_keys=new_key)
    await Producer(only_new, redis).emit("demo", "BUILD_END", {})
    await run_worker(only_new)
    [seen] = receiver.requests()
    assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "plain-secret"


@pytest.mark.parametrize("meanwhile", ["rotated", "rotated with overlap", "deleted"])
async def test_a_key_rotation_never_undoes_what_changed_while_it_ran(
    redis_server: EmbeddedRedis, redis: Redis, meanwhile: str
) -> None:
    """A key rotation reads a callback's secrets, re-encrypts them and writes them back:
    a secret rotation or a delete that lands in between wins. The rotation wrote what it
    had read over it: the project's admin rotated away a leaked token and got it back
    (answered 200), and a deleted callback's encrypted secret came back, listed nowhere
    (review)."""
    old_key, new_key = TokenCipher.new_key(), TokenCipher.new_key()
    old = make_settings(redis_server.url, token_keys=old_key).token_cipher()
    registry = Registry(redis, old)
    callback_id, _ = await registry.create(
        "demo", "https://e.com/h", Event.BUILD_END, Region.DEVNET, "LEAKED-old"
    )
    key = keys.callback(callback_id)
    cipher = make_settings(redis_server.url, token_keys=f"{new_key},{old_key}").token_cipher()
    assert old is not None and cipher is not None
    rotate, admin = cipher.rotate, redis_py.Redis.from_url(redis_server.url)

    acted: list[str] = []

    def rotate_while_the_admin_acts(stored: str) -> str:
        """The admin's change lands between the rotation's (first) read and its write."""
        if acted:
            return rotate(stored)
        acted.append(stored)
        if meanwhile == "rotated":
            admin.hset(key, "secretToken", old.encrypt("FRESH-new"))
        elif meanwhile == "rotated with overlap":  # as RotateToken: the token goes on signing
            current = admin.hget(key, "secretToken")
            assert cipher is not None and current is not None
            admin.hset(key, mapping={"secretToken": cipher.encrypt("FRESH-new"),
                                     "previousToken": current,
                                     "previousTokenUntil": now_ms() + 86_400_000})  # fmt: skip
        else:
            admin.delete(key)
        return rotate(stored)

    cipher.rotate = rotate_while_the_admin_acts  # type: ignore[method-assign]
    try:
        await Registry(redis, cipher).rotate_tokens()
    finally:
        admin.close()
    if meanwhile == "deleted":
        assert not await redis.exists(key)
        return
    # only the new key now: everything was re-encrypted with it, whichever field it is in
    # (a token moved to previousToken meanwhile stayed under the old key: undecryptable once
    # it was dropped, every delivery a final failure for the overlap's hours; review)
    only_new = make_settings(redis_server.url, token_keys=new_key).token_cipher()
    target = await Registry(redis, only_new).target(callback_id)
    assert target is not None and target.problem is None
    assert target.secret_token == "FRESH-new"
    if meanwhile == "rotated with overlap":
        assert target.previous_token == "LEAKED-old"


async def test_a_secret_that_looks_encrypted_is_refused_and_never_stops_a_rotation(
    redis_server: EmbeddedRedis, redis: Redis, api: httpx.AsyncClient
) -> None:
    """`fernet:…` as a project's token or auth header value is a 400: while no key is set
    secrets are stored as given, and such a one stopped `dispatcher tokens rotate` with a
    traceback, every callback after it left in clear, at every run (review). One stored
    before is left as it is and logged; the rotation goes on to the others."""
    base = {"event": "BUILD_END", "region": "DEVNET", "url": "https://e.com/h"}
    for extra in (
        {"secretToken": "fernet:poison"},
        {"authHeaderName": "X-Key", "authHeaderValue": "fernet:poison"},
    ):
        refused = await api.post(CALLBACKS, params={**base, **extra}, headers=UID)
        assert refused.status_code == 400, refused.text
        assert "must not start with 'fernet:'" in refused.json()["message"]
    plain = Registry(redis)  # no key: stored as given, as an older version stored this one
    poisoned, _ = await plain.create(
        "demo", "https://e.com/a", Event.BUILD_END, Region.DEVNET, "plain-one"
    )
    await redis.hset(keys.callback(poisoned), "secretToken", "fernet:poison")  # type: ignore[misc]
    after, _ = await plain.create(
        "demo", "https://e.com/b", Event.BUILD_END, Region.DEVNET, "plain-two"
    )
    cipher = make_settings(redis_server.url, token_keys=TokenCipher.new_key()).token_cipher()
    with capture_logs() as logs:
        assert await Registry(redis, cipher).rotate_tokens() == (1, 0, 0, (str(poisoned),))
    assert [e["callback"] for e in logs if e["event"] == "tokens.rotate_unreadable"] == [
        keys.callback(poisoned)
    ]
    stored = await redis.hget(keys.callback(after), "secretToken")  # type: ignore[misc]
    assert stored is not None and stored.startswith(b"fernet:") and b"plain-two" not in stored


def test_a_malformed_token_key_fails_at_start() -> None:
    """Saying which key of the list is wrong (it did not: review), never what it holds."""
    with pytest.raises(ValueError, match="Fernet keys: key 1 of 1 is not one") as caught:
        Settings(token_keys="not-a-key")
    assert "not-a-key" not in str(caught.value)
    good = TokenCipher.new_key()
    with pytest.raises(ValueError, match=r"key 2 of 2 is empty \(a comma too many\?\)"):
        Settings(token_keys=f"{good},")


async def test_secret_tokens_never_appear_in_responses_logs_or_history(
    settings: Settings,
    api: httpx.AsyncClient,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.script("/hook", answer(500), answer(200))
    params = {"event": "BUILD_END", "region": "DEVNET", "url": url, "secretToken": "TOPSECRET"}
    created = await api.post(CALLBACKS, params=params, headers=UID)
    await api.post("/apigw/v4/projects/demo/events", json={"event": "BUILD_END"}, headers=UID)
    with capture_logs() as logs:
        await run_worker()
    listed = await api.get(CALLBACKS, headers=UID)
    history = await api.get(
        "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history",
        params={"url": url, "event": "BUILD_END"},
        headers=UID,
    )
    assert len(history.json()["data"]["records"]) == 2
    for text in (created.text, listed.text, history.text, repr(logs)):
        assert "TOPSECRET" not in text


# ---- SSRF and regions ---------------------------------------------------------------------


@pytest.fixture
async def closed_api(redis_server: EmbeddedRedis, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """Production address policy: no internal targets in any region."""
    settings = make_settings(redis_server.url, allow_internal_regions=[])
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            yield client


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://[::1]:8080/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://localhost:8080/hook",
        "http://224.0.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
    ],
)
async def test_registration_refuses_internal_and_metadata_targets(
    closed_api: httpx.AsyncClient, url: str
) -> None:
    response = await closed_api.post(
        CALLBACKS, params={"event": "BUILD_END", "region": "DEVNET", "url": url}, headers=UID
    )
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400
    assert any(word in response.json()["message"] for word in ("internal", "metadata", "valid"))


async def test_an_operator_may_allow_internal_targets_per_region(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, allow_internal_regions=["IDC"])
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            params = {"event": "BUILD_END", "url": "http://10.0.0.5/hook"}
            idc = await client.post(CALLBACKS, params={**params, "region": "IDC"}, headers=UID)
            oss = await client.post(CALLBACKS, params={**params, "region": "OSS"}, headers=UID)
    assert idc.json()["data"] is True
    assert oss.status_code == 400


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "127.0.0.\U0001fbf1", "\uff11\uff12\uff17.0.0.1"],
    ids=["literal", "name", "segmented digits", "full-width digits"],
)
async def test_delivery_time_check_refuses_internal_addresses(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker, host: str
) -> None:
    """A callback stored before the policy changed (or a name that now resolves inside) is
    refused at connect time, on the address actually resolved, and not retried. A host in
    digits of another script is checked as the address aiohttp connects to (it was checked
    as spelled, a name, and the request reached 127.0.0.1: review)."""
    settings = make_settings(redis_server.url, allow_internal_regions=[])
    url = receiver.url().replace("127.0.0.1", host)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert receiver.seen == []
    [record] = await all_records(redis, settings, url)
    assert record.final and record.status.value == "FAILED"
    assert "refused" in (record.error_msg or "") and "internal" in (record.error_msg or "")


# ---- endpoint health ----------------------------------------------------------------------


async def test_consecutive_failures_disable_the_callback_and_enable_clears_it(
    redis_server: EmbeddedRedis, redis: Redis, api: httpx.AsyncClient, receiver: Receiver,
    run_worker: RunWorker,
) -> None:  # fmt: skip
    settings = make_settings(redis_server.url, disable_after_failures=3, disable_after_seconds=0)
    url = receiver.script("/hook", answer(400, "bad"))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for _ in range(2):
        await producer.emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert (await Registry(redis).get(callback_id)).enabled
    with capture_logs() as logs:
        await producer.emit("demo", "BUILD_END", {})
        await run_worker(settings)
    callback = await Registry(redis).get(callback_id)
    assert not callback.enabled
    assert "3 consecutive failed deliveries" in (callback.disabled_reason or "")
    assert "HTTP 400" in (callback.disabled_reason or "")
    assert any(e["event"] == "callback.disabled" for e in logs)
    shown = (await api.get(f"{CALLBACKS}/{callback_id}", headers=UID)).json()["data"]
    assert shown["enabled"] is False and "consecutive" in shown["disabledReason"]

    await producer.emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert len(receiver.requests()) == 3  # disabled: the fourth event was not sent

    assert (await api.put(f"{CALLBACKS}/{callback_id}/enable", headers=UID)).json()["data"]
    assert not await redis.exists(keys.health(callback_id))  # the count starts again


async def test_a_success_resets_the_failure_count(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    settings = make_settings(redis_server.url, disable_after_failures=2, disable_after_seconds=0)
    url = receiver.script("/hook", answer(400), answer(200), answer(400))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for _ in range(3):
        await producer.emit("demo", "BUILD_END", {})
        await run_worker(settings)
    assert (await Registry(redis).get(callback_id)).enabled
    failures = await redis.hget(keys.health(callback_id), "failures")  # type: ignore[misc]  # sync|async
    assert failures == b"1"


async def test_the_time_threshold_holds_back_disabling(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    settings = make_settings(redis_server.url, disable_after_failures=1)  # and 12 h
    url = receiver.script("/hook", answer(400))
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    for _ in range(3):
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert (await Registry(redis).get(callback_id)).enabled


def test_circuit_breaker_opens_cools_down_and_half_opens() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    assert [breaker.record(("p", "h"), ok=False, now=0) for _ in range(3)] == [False, False, True]
    assert breaker.wait(("p", "h"), now=1) == pytest.approx(9)
    assert breaker.wait(("p", "other"), now=1) == 0
    assert breaker.wait(("p", "h"), now=11) == 0  # half-open: one probe
    assert breaker.wait(("p", "h"), now=11.5) > 0  # the others wait for its answer
    assert breaker.record(("p", "h"), ok=False, now=11) is True  # the probe failed: open again
    assert breaker.wait(("p", "h"), now=12) == pytest.approx(9)
    breaker.wait(("p", "h"), now=30)
    breaker.record(("p", "h"), ok=True)
    assert breaker.wait(("p", "h"), now=30) == 0


def test_a_breaker_keeps_a_bounded_number_of_circuits_per_project() -> None:
    """A circuit per emitting project and host, failing for good, was kept for ever: a
    project keeps `most`, the one used least recently going first (an open breaker that
    deliveries wait on is used), and never pushes out another project's (reviews)."""
    breaker = CircuitBreaker(threshold=2, cooldown=10, most=3)
    for host in ("a", "b", "c"):
        breaker.record(("evil", host), ok=False, now=0)
        breaker.record(("evil", host), ok=False, now=0)
    breaker.record(("demo", "a"), ok=False, now=0)
    breaker.record(("demo", "a"), ok=False, now=0)
    assert breaker.wait(("evil", "a"), now=1) > 0  # waited on: used most recently
    for host in ("d", "e"):  # evil's new circuits push out its own least used: b, c
        breaker.record(("evil", host), ok=False, now=0)
    assert breaker.wait(("evil", "b"), now=1) == 0 and breaker.wait(("evil", "c"), now=1) == 0
    assert breaker.wait(("evil", "a"), now=1) > 0
    assert breaker.wait(("demo", "a"), now=1) > 0  # another project's: untouched
    # all of them together: the one used least recently of all goes (sixth, seventh reviews)
    total = CircuitBreaker(threshold=1, cooldown=10, most=10, total=4)
    for circuit in (("evil", "a"), ("evil", "b"), ("evil", "c"), ("demo", "a"), ("new", "a")):
        total.record(circuit, ok=False, now=0)
    assert total.wait(("evil", "a"), now=1) == 0  # evil's least used
    assert all(total.wait(c, now=1) > 0 for c in (("demo", "a"), ("new", "a"), ("evil", "c")))


async def test_an_open_breaker_is_probed_by_each_callback_and_spends_no_attempt_unsent(
    redis_server: EmbeddedRedis, redis: Redis, run_worker: RunWorker
) -> None:
    """Two callbacks of a project on one dead host, its breaker open after two failures:
    each callback probes the circuit on its own, one attempt a cool-down at most (0.2 s
    between its requests); an attempt due meanwhile is put off (no record), each time for
    longer. No attempt is spent without a request on the way: each delivery's records are
    its attempts in order, each sent ("could not connect"), but for its last, which may be
    one unsent final record once it has been put off past what was left of its schedule.
    The branch before spent each attempt due while the circuit was open unsent, one after
    the other (review: a healthy callback on the host of a failing one lost its
    deliveries so: `tests/faults/test_circuit_backlog.py`)."""
    settings = make_settings(
        redis_server.url, circuit_threshold=2, circuit_cooldown=0.2,
        retry_schedule=(0.05,) * 6,
    )  # fmt: skip
    url = "http://127.0.0.1:9/down"
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Registry(redis).create("demo", url + "2", Event.BUILD_END, Region.DEVNET)
    before = REGISTRY.get_sample_value(DEFERRED, {"reason": "circuit"}) or 0.0
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    deferred = (REGISTRY.get_sample_value(DEFERRED, {"reason": "circuit"}) or 0.0) - before
    for mine in [await all_records(redis, settings, u) for u in (url, url + "2")]:
        assert [r.attempt for r in mine] == list(range(1, len(mine) + 1))
        assert [r.final for r in mine] == [False] * (len(mine) - 1) + [True]
        sent = [r for r in mine if r.error_msg != ENDED]
        assert sent and all("could not connect" in (r.error_msg or "") for r in sent)
        assert mine[:-1] == sent[: len(mine) - 1]  # only the last may be unsent
        starts = [r.start_time for r in sent]
        assert all(b - a >= 190 for a, b in itertools.pairwise(starts[1:]))  # (once open)
    assert deferred >= 1


@pytest.mark.parametrize("platform", [False, True], ids=["its own callback", "platform-wide"])
async def test_a_breaker_a_project_opens_holds_its_own_deliveries_only(
    settings: Settings, redis: Redis, receiver: Receiver, platform: bool
) -> None:
    """`evil` makes a host of `demo`'s receiver answer 500 twice, which opens a breaker:
    through a path of its own callback, or through its events to a platform-wide callback
    that fails on them (the host's breaker, then the platform callback's owner's, before:
    demo's delivery there waited out the cool-down, a minute here; reviews). demo's is sent
    at once; evil's next waits."""
    settings = settings.model_copy(
        update={"circuit_threshold": 2, "circuit_cooldown": 60.0, "retry_schedule": ()}
    )

    async def fails_for_evil(request: web.Request) -> web.StreamResponse:
        evils = orjson.loads(await request.read())["projectId"] == "evil"
        return web.Response(status=500 if evils else 200)

    evil = receiver.script("/evil", fails_for_evil)
    registry, producer = Registry(redis), Producer(settings, redis)
    if platform:  # one callback, both projects' events: "/evil" counts them all
        await registry.create(PLATFORM_PROJECT, evil, Event.BUILD_END, Region.DEVNET)
    else:
        await registry.create("evil", evil, Event.BUILD_END, Region.DEVNET)
        await registry.create("demo", receiver.url("/demo"), Event.BUILD_END, Region.DEVNET)
    demo = "/evil" if platform else "/demo"
    worker = create_worker(settings, poll_delay=0.01, handle_signals=False)
    main = asyncio.create_task(worker.main())
    try:
        for _ in range(2):
            await producer.emit("evil", "BUILD_END", {})

        async def seen(path: str, count: int) -> bool:
            return len(receiver.requests(path)) >= count

        await until(lambda: seen("/evil", 2), 10, "evil's two failures")
        await producer.emit("evil", "BUILD_END", {})
        await producer.emit("demo", "BUILD_END", {})
        await until(lambda: seen(demo, 3 if platform else 1), 10, "demo's, not held by evil")
        projects = [orjson.loads(r.body)["projectId"] for r in receiver.requests("/evil")]
        assert projects.count("evil") == 2  # its third waits for its breaker
    finally:
        worker.stop()
        await main
        await worker.close()


# ---- poison jobs --------------------------------------------------------------------------


async def test_poison_jobs_are_recorded_and_dropped(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """Jobs that cannot be read, recorded as poison and removed. One whose data is empty
    (another client's) was taken for one whose data was gone: claimed again each lease,
    with no record (review)."""
    await redis.set(keys.ARQ_JOB_PREFIX + "garbage", b"\x80not json at all")
    await redis.set(keys.ARQ_JOB_PREFIX + "demo:empty.5@1", b"")
    await redis.zadd(settings.queue_name, {"garbage": 1, "demo:empty.5@1": 1})
    for job_id, function, payload in [
        ("bad-shape", "fan_out", {"id": "e1", "event": "BUILD_END"}),
        ("bad-deliver", "deliver", {"deliveryId": "x"}),
    ]:
        wire: dict[str, Any] = {"t": None, "f": function, "a": [payload], "k": {}, "et": 0}
        await redis.set(keys.arq_job(job_id), orjson.dumps(wire))
        await redis.zadd(settings.queue_name, {job_id: 1})
    with capture_logs() as logs:
        await run_worker()
    assert await redis.zcard(settings.queue_name) == 0
    stored = await redis.lrange(keys.POISON_JOBS, 0, -1)  # type: ignore[misc]  # sync|async
    poisoned = [orjson.loads(p) for p in stored]
    named = {"garbage", "demo:empty.5@1", "bad-shape", "bad-deliver"}
    assert {p["jobId"] for p in poisoned} == named
    assert any("not JSON" in p["problem"] for p in poisoned)
    problems = [e for e in logs if e["event"] == "job.poison"]
    assert {e["job_id"] for e in problems} == named
    assert not await redis.exists(keys.DROPPED)


async def test_a_job_id_that_is_not_utf8_is_set_aside_and_the_others_run(
    settings: Settings, redis: Redis, run_worker: RunWorker, receiver: Receiver
) -> None:
    """Another client's job whose id is not UTF-8, claimed with good ones: recorded as
    poison (its id escaped) and removed with its keys, the others delivered. Its id's
    decode raised out of the worker's loop, the batch left leased, every worker after it
    dying the same way (review)."""
    await Registry(redis).create("demo", receiver.url("/ok"), Event.BUILD_END, Region.DEVNET, "t")
    producer = Producer(settings, redis)
    for n in range(5):
        await producer.emit("demo", "BUILD_END", {"n": n})
    bad = b"demo:e\xff"
    wire: dict[str, Any] = {"t": None, "f": "fan_out", "a": [{}], "k": {}, "et": 0}
    await redis.set(keys.ARQ_JOB_PREFIX.encode() + bad, orjson.dumps(wire))
    await redis.zadd(settings.queue_name, {bad: 0})
    await run_worker()
    assert len(receiver.requests("/ok")) == 5
    assert await redis.zcard(settings.queue_name) == 0
    assert not await redis.exists(keys.ARQ_JOB_PREFIX.encode() + bad)
    assert [k async for k in redis.scan_iter(match=keys.ARQ_IN_PROGRESS_PREFIX + "*")] == []
    [entry] = [orjson.loads(p) for p in await redis.lrange(keys.POISON_JOBS, 0, -1)]  # type: ignore[misc]
    assert (entry["jobId"], entry["problem"]) == ("demo:e\\xff", "its id is not UTF-8")


# ---- operator route -----------------------------------------------------------------------


async def test_operator_route_manages_roles(redis_server: EmbeddedRedis, redis: Redis) -> None:
    settings = make_settings(redis_server.url, operator_token="op-token", open_access=False)
    app = create_app(settings, redis)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://d") as client:
            op = {"X-DEVOPS-OPERATOR-TOKEN": "op-token"}
            wrong = await client.put("/operator/roles/demo/bob", params={"role": "admin"},
                                     headers={"X-DEVOPS-OPERATOR-TOKEN": "nope"})  # fmt: skip
            assert wrong.status_code == 401
            granted = await client.put(
                "/operator/roles/demo/bob", params={"role": "admin"}, headers=op
            )
            assert granted.json()["data"] is True
            assert (await client.get("/operator/roles/demo", headers=op)).json()["data"] == {
                "bob": "admin"
            }
            created = await client.post(
                CALLBACKS,
                params={"event": "BUILD_END", "region": "DEVNET", "url": "http://127.0.0.1:1/h"},
                headers={"X-DEVOPS-UID": "bob"},
            )
            assert created.json()["data"] is True
            assert (await client.delete("/operator/roles/demo/bob", headers=op)).status_code == 200
            assert (await client.delete("/operator/roles/demo/bob", headers=op)).status_code == 404


async def test_operator_route_is_off_without_a_token(api: httpx.AsyncClient) -> None:
    response = await api.get("/operator/roles/demo", headers={"X-DEVOPS-OPERATOR-TOKEN": "x"})
    assert response.status_code == 403 and "DISPATCHER_OPERATOR_TOKEN" in response.json()["message"]


# ---- cloud metadata, in every region ----------------------------------------------------

METADATA_URLS = [
    "http://169.254.0.23/",
    "http://169.254.169.253/",  # AWS DNS
    "http://[::ffff:169.254.0.23]/",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/latest",
    "http://[::169.254.169.254]/",  # IPv4-compatible
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64
    "http://[2002:a9fe:a9fe::1]/",  # 6to4
    "http://[fe80::1]/",
    "http://168.63.129.16/",  # Azure WireServer
    "http://192.0.0.192/",  # Oracle
    "http://100.100.100.200/",  # Alibaba
    "http://[fd00:ec2::254]/",  # AWS over IPv6
    "http://2852039166/",  # 169.254.169.254 as one decimal number
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL./",
    "http://metadata.goog/",
    "http://metadata.azure.com/",
    "http://metadata.tencentyun.com/",
    "http://metadata.tencentyun.com./",
    "http://instance-data/",
    "http://instance-data.ec2.internal./",
    "http://metadata/",
    "http://metadata\u3002google\u3002internal/",  # ideographic full stops: IDNA dots
]


@pytest.mark.parametrize("url", METADATA_URLS)
async def test_cloud_metadata_is_refused_in_every_region_even_internal_ones_and_dev_mode(
    redis_server: Any, redis: Redis, url: str
) -> None:
    settings = make_settings(
        redis_server.url, allow_internal_regions=["DEVNET", "OSS", "IDC"], dev_mode=True
    )
    async with app_client(settings, redis) as client:
        for region in ("IDC", "OSS", "DEVNET"):
            response = await client.post(
                CALLBACKS, params={"event": "BUILD_END", "region": region, "url": url},
                headers=UID,
            )  # fmt: skip
            assert response.status_code == 400, (region, response.text)
            assert "metadata" in response.json()["message"], response.text


async def test_cloud_metadata_stored_under_older_rules_is_refused_at_delivery(
    redis_server: Any, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Each a final FAILED record after one attempt, in a region that allows internal
    targets, in dev mode; the callback beside them is delivered."""
    settings = make_settings(redis_server.url, dev_mode=True)
    registry = Registry(redis)
    for url in METADATA_URLS:
        await registry.create("demo", url, Event.BUILD_END, Region.IDC)
    await registry.create("demo", receiver.url(), Event.BUILD_END, Region.IDC)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    assert len(receiver.requests()) == 1
    for url in METADATA_URLS:
        [record] = await all_records(redis, settings, url)
        assert record.final and record.status.value == "FAILED", url
        assert "metadata" in (record.error_msg or ""), (url, record.error_msg)
