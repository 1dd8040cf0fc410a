"""Tracing on real servers: a W3C trace context sent to the emit routes (over HTTP, to a
real `dispatcher api` server) or held by a Python producer reaches a real receiver in the
same trace, through retries and redeliveries; spans, collected in-process with the SDK's
in-memory exporter, carry the attributes the README names and no secret; a malformed
context is ignored."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from typing import Any

import httpx
import orjson
import pytest
import redis as redis_py
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher import tracing
from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history import open_history
from dispatcher.jobs import EventJob, decode
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    answer,
    make_settings,
    serving_api,
    ship_all,
)

keys = Keys()  # today's key names (one shard)

PROJECT = "/apigw/v4/projects/demo"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HISTORY = f"{PROJECT}/callbacks/history"


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


@pytest.fixture
async def http_api(settings: Settings, redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """`dispatcher api`'s server (uvicorn, h11) on a free port of 127.0.0.1, and a client."""
    async with serving_api(settings) as port:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers=UID) as client:
            yield client


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded by the dispatcher for the test, in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.recording(provider):
        yield exporter
    provider.shutdown()


async def register(api: httpx.AsyncClient, url: str, **params: str) -> None:
    query = {"event": "BUILD_END", "region": "DEVNET", "url": url, **params}
    response = await api.post(f"{PROJECT}/callbacks", params=query, headers=UID)
    assert response.json()["data"] is True, response.text


async def records(api: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    page = await api.get(HISTORY, params={"url": url, "event": "BUILD_END"}, headers=UID)
    found: list[dict[str, Any]] = page.json()["data"]["records"]
    return found


async def test_a_traceparent_sent_to_the_emit_routes_reaches_the_receiver(
    http_api: httpx.AsyncClient, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(http_api, receiver.url())
    single = await http_api.post(
        f"{PROJECT}/events",
        json={"event": "BUILD_END", "data": {"n": 0}},
        headers={"traceparent": PARENT, "tracestate": "ci=build-7,other=x"},
    )
    batch = await http_api.post(
        f"{PROJECT}/events/batch",
        json=[{"event": "BUILD_END", "data": {"n": n}} for n in (1, 2, 3)],
        headers={"traceparent": OTHER},
    )
    assert single.status_code == batch.status_code == 200, (single.text, batch.text)
    await run_worker()
    sent = {orjson.loads(s.body)["data"]["n"]: s.headers for s in receiver.requests()}
    assert sorted(sent) == [0, 1, 2, 3]
    # no exporter here: the context goes out as it came, the receiver's spans under the emitter's
    assert sent[0]["traceparent"] == PARENT and sent[0]["tracestate"] == "ci=build-7,other=x"
    assert [sent[n]["traceparent"] for n in (1, 2, 3)] == [OTHER] * 3
    assert "tracestate" not in sent[1]
    [recorded] = [  # the success (on a slow machine a timed-out attempt may come before it)
        r
        for r in await records(http_api, receiver.url())
        if r["traceparent"] == PARENT and r["status"] == "SUCCESS"
    ]
    assert recorded["tracestate"] == "ci=build-7,other=x"
    page = await http_api.get(f"/console/projects/demo/history/{recorded['id']}")
    assert f"<dt>Trace id</dt><dd><code>{TRACE_ID}</code>" in page.text


@pytest.fixture
def settings(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> Settings:
    """The Redis history store, or the one a test's `settings` parameter names."""
    if getattr(request, "param", "redis") == "postgres":
        return make_settings(redis_server.url, history_url=request.getfixturevalue("pg_url"))
    return make_settings(redis_server.url)


@pytest.mark.parametrize("settings", ["redis", "postgres"], indirect=True)
async def test_a_retry_and_a_redelivery_keep_the_trace(
    http_api: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    url = receiver.script("/hook", answer(503), answer(404), answer(200))
    await register(http_api, url)
    emitted = await http_api.post(
        f"{PROJECT}/events", json={"event": "BUILD_END"}, headers={"traceparent": PARENT}
    )
    assert emitted.status_code == 200
    await run_worker()  # 503, then its retry: 404, final
    await ship_all(settings, redis)
    final = (await records(http_api, url))[0]
    assert (final["responseCode"], final["traceparent"]) == (404, PARENT)
    again = await http_api.post(f"{HISTORY}/{final['id']}/retry")
    assert again.json()["status"] == 0
    await run_worker()
    await ship_all(settings, redis)
    assert [s.headers["traceparent"] for s in receiver.requests()] == [PARENT] * 3
    assert [r["traceparent"] for r in await records(http_api, url)] == [PARENT] * 3


async def test_a_python_producer_inside_a_span_propagates_it(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await Registry(redis).create("demo", receiver.url(), Event.BUILD_END, Region.DEVNET, "")
    app = TracerProvider()  # the application's own tracing, not the dispatcher's
    producer = Producer(settings, redis)
    with app.get_tracer("build-system").start_as_current_span("build 7") as build:
        await producer.emit("demo", "BUILD_END", {"n": 0})
        await producer.emit_many([("demo", "BUILD_END", {"n": 1})])
        await producer.emit_each("demo", [{"event": "BUILD_END", "data": {"n": 2}}])
    await producer.emit("demo", "BUILD_END", {"n": 3})  # outside any span: nothing carried
    await run_worker()
    sent = {orjson.loads(s.body)["data"]["n"]: s.headers for s in receiver.requests()}
    context = build.get_span_context()
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert [sent[n]["traceparent"] for n in (0, 1, 2)] == [expected] * 3
    assert "traceparent" not in sent[3]


async def test_a_batch_of_several_projects_names_none_on_its_emit_span(
    settings: Settings, redis: Redis, spans: InMemorySpanExporter
) -> None:
    """An `emit_many` of two projects' events: its span names no project (it named the
    first one's: review); a batch of one project's names it."""
    producer = Producer(settings, redis)
    await producer.emit_many(
        [("a", "BUILD_END", {}), ("b", "BUILD_END", {}), ("b", "BUILD_END", {})]
    )
    await producer.emit_many([("b", "BUILD_END", {})] * 2)
    mixed, alone = [span.attributes or {} for span in spans.get_finished_spans()]
    assert "dispatcher.project_id" not in mixed and mixed["messaging.batch.message_count"] == 3
    assert alone["dispatcher.project_id"] == "b"


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        found.setdefault(span.name, []).append(span)
    return found


async def test_spans_of_an_emit_its_fan_out_and_its_attempts(
    http_api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
    spans: InMemorySpanExporter,
) -> None:
    url = receiver.script("/hook", answer(500), answer(200)) + "?token=query-secret&v=2"
    await register(http_api, url, secretToken="token-secret", authHeaderName="X-Auth",
                   authHeaderValue="auth-secret")  # fmt: skip
    emitted = await http_api.post(
        f"{PROJECT}/events", json={"event": "BUILD_END"}, headers={"traceparent": PARENT}
    )
    event_id = emitted.json()["data"]["eventId"]
    await run_worker()
    found = by_name(spans.get_finished_spans())
    [emit], [fan_out], attempts = found["emit"], found["fan_out"], found["POST"]
    assert {span.context.trace_id for span in (emit, fan_out, *attempts)} == {int(TRACE_ID, 16)}
    assert emit.kind is SpanKind.PRODUCER and emit.parent is not None
    assert emit.parent.span_id == int(PARENT.split("-")[2], 16)
    assert fan_out.kind is SpanKind.CONSUMER and parent_id(fan_out) == emit.context.span_id
    assert [a.attributes["dispatcher.attempt"] for a in attempts if a.attributes] == [1, 2]
    for attempt, seen in zip(attempts, receiver.requests(), strict=True):
        assert attempt.kind is SpanKind.CLIENT and parent_id(attempt) == fan_out.context.span_id
        # the request names the attempt's span as the receiver's parent
        assert seen.headers["traceparent"] == f"00-{TRACE_ID}-{attempt.context.span_id:016x}-01"
        attributes = dict(attempt.attributes or {})
        assert attributes["http.request.method"] == "POST"
        assert attributes["url.full"] == receiver.url("/hook?token=REDACTED&v=REDACTED")
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["dispatcher.delivery_id"] == seen.headers["X-DEVOPS-DELIVERY-ID"]
        assert attributes["dispatcher.event_id"] == event_id
        assert attributes["dispatcher.project_id"] == "demo"
    first, second = (dict(a.attributes or {}) for a in attempts)
    assert (first["http.response.status_code"], second["http.response.status_code"]) == (500, 200)
    assert (first["dispatcher.outcome"], first["error.type"]) == ("retry", "500")
    assert (second["dispatcher.outcome"], "error.type" in second) == ("success", False)
    finished = spans.get_finished_spans()
    text = repr([(s.attributes, s.status.description, s.events) for s in finished])
    signature = receiver.requests()[0].headers["webhook-signature"]
    for secret in ("query-secret", "token-secret", "auth-secret", signature):
        assert secret not in text


async def test_an_event_without_a_context_gets_a_trace_when_spans_are_recorded(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    spans: InMemorySpanExporter,
) -> None:
    url = receiver.script("/hook", answer(503), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "")
    await Producer(settings, redis).emit("demo", "BUILD_END")
    await run_worker()
    found = by_name(spans.get_finished_spans())
    [emit], [fan_out] = found["emit"], found["fan_out"]
    assert emit.parent is None and parent_id(fan_out) == emit.context.span_id  # a new trace
    one, two = (s.headers["traceparent"] for s in receiver.requests())
    assert trace_id(one) == trace_id(two) == f"{fan_out.context.trace_id:032x}"


@pytest.mark.parametrize("exported", [False, True])
async def test_a_platform_receiver_gets_a_trace_of_its_own(
    http_api: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    exported: bool,
) -> None:
    """The operator's receiver is never put in a project's trace: the project's
    `tracestate` and sampled flag stay with the project's own callbacks, and so does its
    context in the history records (the operator's records held the project's
    `traceparent` and `tracestate`: review)."""
    own_url, ops_url = receiver.url("/own"), receiver.url("/ops")
    await register(http_api, own_url)
    await Registry(redis).create(PLATFORM_PROJECT, ops_url, "BUILD_END", Region.DEVNET, "")
    unsampled = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.recording(provider) if exported else nullcontext():
        emitted = await http_api.post(
            f"{PROJECT}/events", json={"event": "BUILD_END"},
            headers={"traceparent": unsampled, "tracestate": "evil=anything"},
        )  # fmt: skip
        assert emitted.status_code == 200
        await run_worker()
    provider.shutdown()
    own, ops = (receiver.requests(path)[0].headers for path in ("/own", "/ops"))
    assert trace_id(own["traceparent"]) == TRACE_ID and own["tracestate"] == "evil=anything"
    assert "tracestate" not in ops
    store = open_history(settings, redis, Keys(settings.queue_name))
    window = {"start_ms": 0, "end_ms": now_ms() + 60_000}
    try:
        [mine] = (await store.query("demo", own_url, "BUILD_END", **window)).records
        [theirs] = (await store.query(PLATFORM_PROJECT, ops_url, "BUILD_END", **window)).records
    finally:
        await store.close()
    assert trace_id(mine.traceparent or "") == TRACE_ID and mine.tracestate == "evil=anything"
    assert (theirs.traceparent, theirs.tracestate) == (None, None)
    if not exported:  # nothing recorded: the platform's request carries no context at all
        assert (own["traceparent"], "traceparent" in ops) == (unsampled, False)
        return
    assert own["traceparent"].endswith("-00")  # the project's choice: its span not recorded
    [posted] = [s for s in exporter.get_finished_spans() if s.name == "POST"]
    context = posted.context
    assert posted.parent is None and context.trace_flags.sampled  # a new trace, on its own
    ids = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert ops["traceparent"] == ids
    [link] = posted.links  # to the project's trace, for the operator's eyes only
    assert f"{link.context.trace_id:032x}" == TRACE_ID


MALFORMED = [
    "00-xyz",
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # an all-zero trace id
    f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # a forbidden version
    PARENT + "-extra",
    "x" * 10_000,
]


async def test_a_malformed_traceparent_is_ignored(
    http_api: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    await register(http_api, receiver.url())
    for n, value in enumerate(MALFORMED):
        answered = await http_api.post(
            f"{PROJECT}/events", json={"event": "BUILD_END", "data": {"n": n}},
            headers=[(b"traceparent", value.encode()), (b"tracestate", b"a=\xe9")],
        )  # fmt: skip
        assert answered.status_code == 200, answered.text
    # a job queued by another client, its context not one we would write
    job = EventJob("evt_other", "demo", "BUILD_END", {"n": 99})
    wire = {**job.to_wire(), "traceparent": "00-abc\r\nX-Evil: 1", "tracestate": ["x"]}
    await redis.set("arq:job:evt_other", orjson.dumps({"t": None, "f": "fan_out", "a": [wire],
                                                       "k": {}, "et": 0}))  # fmt: skip
    await redis.zadd(Queue(redis, Keys(settings.queue_name)).queue_name, {"evt_other": 0})
    # a good traceparent with a tracestate that is not one: the traceparent alone goes on
    kept = await http_api.post(
        f"{PROJECT}/events", json={"event": "BUILD_END", "data": {"n": -1}},
        headers={"traceparent": OTHER, "tracestate": "no list member,=,a=" + "x" * 600},
    )  # fmt: skip
    assert kept.status_code == 200
    await run_worker()
    seen = {orjson.loads(s.body)["data"]["n"]: s.headers for s in receiver.requests()}
    assert len(seen) == len(MALFORMED) + 2
    good = seen.pop(-1)
    assert good["traceparent"] == OTHER and "tracestate" not in good
    assert not [h for h in seen.values() if "traceparent" in h or "X-Evil" in h]


async def test_repeated_long_and_malformed_trace_headers_are_read_as_w3c_says(
    http_api: httpx.AsyncClient,
    receiver: Receiver,
    run_worker: RunWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two traceparents are no context; two tracestates are one list (the first alone was
    read); a tracestate over 512 characters loses its members over 128 characters first,
    then from its end (it was dropped whole); and a malformed member is ignored without
    OpenTelemetry's warning quoting it (up to 8 KB of an emitter's text in the logs). All
    from the review."""
    await register(http_api, receiver.url())
    short = [f"m{i}=" + "x" * 20 for i in range(20)]  # 483 characters with "a=1,"
    long_state = ",".join(["a=1", "big=" + "v" * 200, *short])
    sent = {
        0: [(b"traceparent", PARENT.encode()), (b"traceparent", OTHER.encode())],
        1: [(b"traceparent", PARENT.encode()), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")],
        2: [(b"traceparent", PARENT.encode()), (b"tracestate", long_state.encode())],
        3: [(b"traceparent", OTHER.encode()), (b"tracestate", b"EVIL<" + b"A" * 8000)],
    }
    with caplog.at_level(logging.DEBUG, logger="opentelemetry"):
        for n, headers in sent.items():
            answered = await http_api.post(
                f"{PROJECT}/events", json={"event": "BUILD_END", "data": {"n": n}},
                headers=headers,
            )  # fmt: skip
            assert answered.status_code == 200, answered.text
    assert not [r for r in caplog.records if "EVIL" in r.getMessage()]
    await run_worker()
    seen = {orjson.loads(s.body)["data"]["n"]: s.headers for s in receiver.requests()}
    assert "traceparent" not in seen[0]
    assert (seen[1]["traceparent"], seen[1]["tracestate"]) == (PARENT, "a=1,b=2")
    assert seen[2]["tracestate"] == ",".join(["a=1", *short])
    assert seen[3]["traceparent"] == OTHER and "tracestate" not in seen[3]


async def test_a_custom_auth_header_cannot_be_a_trace_header(http_api: httpx.AsyncClient) -> None:
    for name in ("traceparent", "TraceState"):
        refused = await http_api.post(
            f"{PROJECT}/callbacks",
            params={"event": "BUILD_END", "region": "DEVNET", "url": "https://example.com/h",
                    "authHeaderName": name, "authHeaderValue": PARENT},
        )  # fmt: skip
        assert refused.status_code == 400 and "reserved" in refused.json()["message"]


def test_dispatcher_emit_carries_the_trace_of_its_environment(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI step that runs `dispatcher emit` hands it its trace in TRACEPARENT/TRACESTATE."""
    client = redis_py.Redis.from_url(redis_server.url)
    client.flushdb()
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    result = CliRunner().invoke(
        app, ["emit", "--project", "p", "--event", "BUILD_END"],
        env={"TRACEPARENT": PARENT, "TRACESTATE": "ci=7"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [key] = list(client.scan_iter(keys.ARQ_JOB_PREFIX + "*"))
    raw = client.get(key)
    assert isinstance(raw, bytes)
    payload = decode(raw).payload
    client.close()
    assert (payload["traceparent"], payload["tracestate"]) == (PARENT, "ci=7")
