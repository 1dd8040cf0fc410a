"""The HTTP emit routes: a batch (JSON array or NDJSON) reaches the workers, bad entries
fail alone, the limits answer in the envelope, event ids are idempotent."""

from __future__ import annotations

import asyncio
import json
import re
import tracemalloc
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from dispatcher.api.events import read_events
from dispatcher.api.pacing import EmitPace
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidInput, PayloadTooLarge
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    all_records,
    answer,
    app_client,
    make_settings,
    serving_api,
)
from tests.service.test_history import URL, add_all, record

if TYPE_CHECKING:
    from dispatcher.history.record import AttemptRecord

EVENTS = "/apigw/v4/projects/demo/events"
BATCH = f"{EVENTS}/batch"
NDJSON = {**UID, "Content-Type": "application/x-ndjson"}


async def queued_ids(redis: Redis, settings: Settings) -> list[str]:
    """The event ids of project demo's queued events (job ids are `demo:{event id}`)."""
    queued = [i.decode() for i in await redis.zrange(settings.queue_name, 0, -1)]
    assert all(i.startswith("demo:") for i in queued), queued
    return sorted(i.removeprefix("demo:") for i in queued)


async def register(api: httpx.AsyncClient, url: str) -> None:
    params = {"event": "BUILD_END,BUILD_START", "region": "DEVNET", "url": url}
    response = await api.post("/apigw/v4/projects/demo/callbacks/batch", params=params, headers=UID)
    assert response.json()["data"]["successEvents"] == ["BUILD_END", "BUILD_START"]


async def test_a_batch_of_1000_reaches_the_workers_once_each(
    api: httpx.AsyncClient, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(api, receiver.url())
    events = [{"event": "BUILD_END", "data": {"n": n}} for n in range(1000)]
    await redis.config_resetstat()
    response = await api.post(BATCH, json=events, headers=UID)
    commands = await redis.info("commandstats")
    assert commands["cmdstat_evalsha"]["calls"] == 1  # the whole batch: one command
    body = response.json()
    assert response.status_code == 200 and body["status"] == 0 and body["message"] is None
    assert (body["data"]["accepted"], body["data"]["failed"]) == (1000, 0)
    ids = [result["eventId"] for result in body["data"]["results"]]
    assert len(set(ids)) == 1000 and all(r["error"] is None for r in body["data"]["results"])
    await run_worker()
    seen = receiver.requests()
    assert len(seen) == 1000
    sent = {orjson.loads(s.body)["data"]["n"]: s.headers["X-DEVOPS-DELIVERY-ID"] for s in seen}
    assert sorted(sent) == list(range(1000))  # every event once, none twice
    assert [sent[n].partition(".")[0] for n in range(1000)] == [f"demo:{i}" for i in ids]


async def test_bad_entries_fail_alone_and_are_named(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    events: list[Any] = [
        {"event": "BUILD_END", "data": {"n": 0}},
        {"event": "NOPE", "data": {}},
        {"event": "BUILD_START"},
        {"event": "BUILD_END", "data": [1, 2]},
        {"event": "BUILD_END", "data": {"n": 4}, "eventId": "build-4"},
    ]
    response = await api.post(BATCH, json=events, headers=UID)
    body = response.json()
    assert (
        response.status_code == 200 and body["message"] == "2 of 5 events refused; see data.results"
    )
    data = body["data"]
    assert (data["accepted"], data["failed"]) == (3, 2)
    errors = [result["error"] for result in data["results"]]
    assert errors[1].startswith("events[1]: unknown event 'NOPE'")
    assert errors[3] == "events[3]: data must be a JSON object"
    assert [errors[0], errors[2], errors[4]] == [None, None, None]
    assert data["results"][4]["eventId"] == "build-4"
    good = [data["results"][i]["eventId"] for i in (0, 2, 4)]
    assert await queued_ids(redis, settings) == sorted(good)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ([1, 2], 'an event must be an object {"event", "data", "eventId"}'),
        ({"data": {}}, "'event' is required: an event name"),
        ({"event": 7}, "'event' is required: an event name"),
        ({"event": "BUILD_END", "eventId": 7}, "eventId must be a string"),
        ({"event": "BUILD_END", "eventId": "no spaces"}, "eventId must be 1-128 letters"),
        ({"event": "BUILD_END", "eventId": "x" * 129}, "eventId must be 1-128 letters"),
        ({"event": "BUILD_END", "data": {"big": 2**70}}, "data cannot be queued"),
    ],
)
async def test_every_kind_of_bad_entry_is_refused_alone(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, entry: Any, error: str
) -> None:
    response = await api.post(BATCH, json=[{"event": "BUILD_END"}, entry], headers=UID)
    first, second = response.json()["data"]["results"]
    assert second["eventId"] is None and second["error"].startswith(f"events[1]: {error}")
    assert await queued_ids(redis, settings) == [first["eventId"]]


async def chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    """A body sent without its length, `count` times `chunk`."""
    for _ in range(count):
        yield chunk


async def test_ndjson_a_broken_line_fails_that_line_only(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    lines = [
        b'{"event": "BUILD_START", "data": {"n": 1}}',
        b'{"event": "BUILD_END", "data": {"n": 2}',  # cut short
        b"",  # blank lines are skipped
        b'{"event": "BUILD_END", "data": {"n": 4}}\r',
    ]

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length, cut mid-line
        body = b"\n".join(lines) + b"\n"
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    headers = {**UID, "Content-Type": "Application/X-NDJSON; charset=utf-8"}
    response = await api.post(BATCH, content=streamed(), headers=headers)
    data = response.json()["data"]
    assert (data["accepted"], data["failed"]) == (2, 1)
    first, broken, last = data["results"]
    assert broken == {
        "eventId": None,
        "error": "line 2: not JSON: EOF while parsing an object at column 39",
    }
    assert await queued_ids(redis, settings) == sorted([first["eventId"], last["eventId"]])


@pytest.mark.parametrize(
    ("content", "headers", "message"),
    [
        (b"not json", UID, "body is not JSON"),
        (b'{"event": "BUILD_END"}', UID, "body must be a JSON array of events"),
        (b"[]", UID, "body holds no event"),
        (b"\n \n", NDJSON, "body holds no event"),
    ],
)
async def test_unreadable_batches_are_400s(
    api: httpx.AsyncClient, content: bytes, headers: dict[str, str], message: str
) -> None:
    response = await api.post(
        BATCH, content=content, headers={"Content-Type": "application/json", **headers}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == 400 and body["data"] is None and message in body["message"]


async def test_oversized_batches_are_413s_and_queue_nothing(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    too_many = [{"event": "BUILD_END"}] * 1001
    response = await api.post(BATCH, json=too_many, headers=UID)
    assert response.status_code == 413
    assert response.json() == {
        "data": None,
        "message": "batch of more than 1000 events; at most 1000 per request (send several)",
        "status": 413,
    }
    lines = b"\n".join([b'{"event": "BUILD_END"}'] * 1001)
    assert (await api.post(BATCH, content=lines, headers=NDJSON)).status_code == 413
    assert await queued_ids(redis, settings) == []


EIGHT_MIB = 8 * 1024 * 1024
TOO_MANY = "batch of more than 1000 events; at most 1000 per request (send several)"


@pytest.mark.parametrize(
    ("content", "ndjson", "status", "message"),
    [
        (b"{}\n" * (EIGHT_MIB // 3 - 1), True, 413, TOO_MANY),
        (b"[" + b"{}," * (EIGHT_MIB // 3 - 2) + b"{}]", False, 413, TOO_MANY),
        (b"[" + b"[]," * (EIGHT_MIB // 3 - 2) + b"[]]", False, 413, TOO_MANY),
        (b" \t\n" * (EIGHT_MIB // 3 - 1), True, 400, "body holds no event"),
    ],
    ids=["ndjson-lines", "array-of-objects", "array-of-arrays", "blank-lines"],
)
async def test_a_batch_is_counted_before_its_entries_are_read(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    content: bytes,
    ndjson: bool,
    status: int,
    message: str,
) -> None:
    """8 MiB of `{}` lines took ~470 ms of the event loop and +429 MiB to be refused: every
    entry was read before they were counted (review; an array of `{}` cost ~110 ms and
    +210 MiB). Counted first, each is refused having read at most one entry past the limit:
    its peak of memory is a few copies of the body, not an object per entry."""
    headers = NDJSON if ndjson else {**UID, "Content-Type": "application/json"}
    tracemalloc.start()
    try:
        response = await api.post(BATCH, content=content, headers=headers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * EIGHT_MIB, f"peak {peak / 2**20:.0f} MiB"
    assert response.status_code == status
    assert response.json() == {"data": None, "message": message, "status": status}
    assert await queued_ids(redis, settings) == []


def test_a_body_of_many_values_is_counted_then_read_as_any_other() -> None:
    """Past 100 values and keys per event it may carry, a JSON array's entries are counted
    one by one first, then, within the limit, it is read whole: the same entries and
    refusals as any body; NDJSON lines keep their numbers past blank ones."""
    entry = {"event": "BUILD_END", "data": {"n": list(range(150)), "big": 2**70, "s": ",[{"}}
    body = json.dumps([entry, entry], indent=1).encode()
    bad = {
        "cut short": body[:-1],
        "extra data": body + b" x",
        "no comma": body.replace(b"},\n {", b"}\n {", 1),
        "NaN": body.replace(b"149", b"NaN"),
        "a trailing comma": body[:-1] + b",]",
        "too deep": b"[" * 5000 + b"]" * 5000,
    }
    for limit in (2, 1000):  # counted first (over 200 values), not
        assert read_events(body, ndjson=False, limit=limit) == [
            ("events[0]", entry), ("events[1]", entry)
        ]  # fmt: skip
        for name, content in bad.items():
            with pytest.raises(InvalidInput, match=r"^body is not JSON: ") as refused:
                read_events(content, ndjson=False, limit=limit)
            assert refused.value.param == "body", name
        with pytest.raises(InvalidInput, match=r"^body must be a JSON array"):
            read_events(json.dumps({"events": [entry] * 2}).encode(), ndjson=False, limit=limit)
    with pytest.raises(PayloadTooLarge, match=r"^batch of more than 2 events"):
        read_events(json.dumps([entry] * 3).encode(), ndjson=False, limit=2)
    lines = b'\n \r\n{"event": "BUILD_END"}\r\n\t\n{"event": "BUILD_START"}'
    assert read_events(lines, ndjson=True, limit=2) == [
        ("line 3", {"event": "BUILD_END"}), ("line 5", {"event": "BUILD_START"})
    ]  # fmt: skip


@pytest.mark.parametrize(
    "data",
    ['{"s": "\\ud800"}', '{"\\udc00": 1}', '{"a": ' * 250 + "1" + "}" * 250],
    ids=["a lone surrogate", "one in a key", "250 levels deep"],
)
def test_a_batch_within_the_limit_is_read_alike_however_many_values_it_holds(
    data: str,
) -> None:
    """An entry the parser refuses (a lone surrogate escape, nesting past its 200 levels)
    refuses the body whatever else it holds. Before, once the body held more values than
    100 per event it may carry, it was read by the standard library's scanner, which takes
    them: the same entry was queued, or refused alone later, depending on the padding of
    another entry (review). That scanner now only counts the entries of such a body."""
    pad = json.dumps(list(range(400)))  # 400 values: past 100 per event of 3
    for padding in ("[]", pad):
        body = f'[{{"event": "BUILD_END", "data": {data}}}, {{"event": "BUILD_END", "data": '
        body += f'{{"p": {padding}}}}}]'
        with pytest.raises(InvalidInput, match=r"^body is not JSON: ") as refused:
            read_events(body.encode(), ndjson=False, limit=3)
        assert refused.value.param == "body"


async def test_the_batch_route_has_a_body_limit_of_its_own(
    settings: Settings, redis: Redis
) -> None:
    """Its bodies may exceed the other routes' limit, up to its own."""
    small = settings.model_copy(
        update={
            "api_max_body_bytes": 2048,
            "emit_batch_max_bytes": 8192,
            "emit_batch_max_events": 3,
        }
    )
    padded = [{"event": "BUILD_END", "data": {"pad": "x" * 1000}}] * 3  # about 3.2 kB
    async with app_client(small, redis) as api:
        accepted = await api.post(BATCH, json=padded, headers=UID)
        single = await api.post(EVENTS, json=padded[0] | {"more": "y" * 2048}, headers=UID)
        huge = await api.post(BATCH, json=[padded[0] | {"more": "y" * 8192}], headers=UID)
        streamed = await api.post(BATCH, content=chunks(b"x" * 3000, 3), headers=NDJSON)
        document = (await api.get("/openapi.json")).json()
    assert accepted.json()["data"]["accepted"] == 3
    assert single.status_code == 413
    assert single.json()["message"] == "request body larger than 2048 bytes"
    assert huge.status_code == streamed.status_code == 413
    assert huge.json()["message"] == streamed.json()["message"]
    assert huge.json()["message"] == "request body larger than 8192 bytes"
    documented = document["paths"]["/{apigwType}/v4/projects/{projectId}/events/batch"]
    schema = documented["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["maxItems"] == 3


async def test_an_event_whose_data_is_over_the_limit_is_refused_alone(
    settings: Settings, redis: Redis
) -> None:
    """One event's data is at most `DISPATCHER_API_MAX_BODY_BYTES` as JSON on every route:
    a batch took 8 MB events, each copied in full into every retry to every callback
    (review). The others of the batch are queued; `emit()` refuses it too."""
    small = settings.model_copy(update={"api_max_body_bytes": 2048})
    fits = {"event": "BUILD_END", "data": {"pad": "x" * 1500}}
    over = {"event": "BUILD_END", "data": {"pad": "x" * 2100}}
    async with app_client(small, redis) as api:
        answer = (await api.post(BATCH, json=[fits, over, fits], headers=UID)).json()
    assert answer["data"]["accepted"] == 2
    [refused] = [r["error"] for r in answer["data"]["results"] if r["error"]]
    assert refused.startswith("events[1]: data is 2,") and "at most 2,048" in refused
    assert len(await queued_ids(redis, settings)) == 2
    with pytest.raises(InvalidInput, match="at most 2,048"):
        await Producer(small, redis).emit("demo", "BUILD_END", {"pad": "x" * 2100})


async def test_event_ids_are_idempotent_across_batches_and_routes(
    api: httpx.AsyncClient, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(api, receiver.url())
    once = {"event": "BUILD_END", "data": {"n": 1}, "eventId": "build-1"}
    first = await api.post(BATCH, json=[once, once], headers=UID)
    assert [r["eventId"] for r in first.json()["data"]["results"]] == ["build-1", "build-1"]
    again = await api.post(BATCH, content=orjson.dumps(once), headers=NDJSON)
    assert again.json()["data"]["results"] == [{"eventId": "build-1", "error": None}]
    single = await api.post(EVENTS, json=once, headers=UID)
    assert single.json()["data"] == {"eventId": "build-1", "queued": True}
    await run_worker()
    assert len(receiver.requests()) == 1


async def test_a_batch_above_1000_goes_as_one_command_per_1000(
    settings: Settings, redis: Redis
) -> None:
    """Still one round trip, but Redis may serve others between the commands."""
    events = [{"event": "BUILD_END", "data": {"n": n}} for n in range(2500)]
    async with app_client(
        settings.model_copy(update={"emit_batch_max_events": 2500}), redis
    ) as api:
        await redis.config_resetstat()
        response = await api.post(BATCH, json=events, headers=UID)
    assert response.json()["data"]["accepted"] == 2500
    assert (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] == 3
    assert await redis.zcard(settings.queue_name) == 2500


async def raw_post(port: int, path: str, head: list[str], body: bytes) -> tuple[int, Any]:
    """One HTTP/1.1 POST written by hand (the headers as a JDK client sends them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *head, "", ""]
        writer.write("\r\n".join(request).encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), orjson.loads(await reader.readexactly(length))
    finally:
        writer.close()


async def test_an_h2c_upgrade_offer_is_ignored_as_the_jdk_client_sends_it(
    settings: Settings, redis: Redis
) -> None:
    """Every stock JDK HttpClient offers `h2c` on a plain-http request; `dispatcher api`
    must answer it over HTTP/1.1 with the body read (uvicorn on httptools dropped it)."""
    offer = [
        "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
        "HTTP2-Settings: AAEAAEAAAAIAAAAAAAMAAAAAAAQBAAAAAAUAAEAAAAYABgAA", "X-DEVOPS-UID: ci",
    ]  # fmt: skip
    array = orjson.dumps([{"event": "BUILD_END", "data": {"n": 1}}])
    lines = b'{"event": "BUILD_START"}\n'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(lines), lines)

    async with serving_api(settings) as port:
        answers = [
            await raw_post(port, BATCH, [*offer, "Content-Type: application/json",
                                         f"Content-Length: {len(array)}"], array),
            await raw_post(port, BATCH, [*offer, "Content-Type: application/x-ndjson",
                                         "Transfer-Encoding: chunked"], chunked),
        ]  # fmt: skip
    assert [status for status, _ in answers] == [200, 200], answers
    assert [body["data"]["accepted"] for _, body in answers] == [1, 1]
    assert await redis.zcard(settings.queue_name) == 2


def paced(url: str, **overrides: Any) -> Settings:
    """Settings whose emit routes take bodies of 16 KiB (batches 32 KiB, of 32 events) and
    give each project 1 KiB a second of its share, in bursts of `emit_project_burst`."""
    return make_settings(url, api_max_body_bytes=16 * 1024, emit_batch_max_bytes=32 * 1024,
                         emit_batch_max_events=32, emit_project_rate=1024,
                         **overrides)  # fmt: skip


async def test_a_project_emitting_past_its_rate_is_refused_alone(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """One project's HTTP emits may queue `DISPATCHER_EMIT_PROJECT_RATE` bytes a second
    (in bursts): past it, each request is a 429 with Retry-After and nothing of it queued,
    on both routes, while another project emits as usual. Nothing bounded them: a project
    sending 1 MiB events faster than its receivers took them filled the Redis every project
    shares in seconds, and the others' emits got 503s (review)."""
    settings = paced(redis_server.url, emit_project_burst=32 * 1024)
    event = {"event": "BUILD_END", "data": {"blob": "x" * 8000}}
    async with app_client(settings, redis) as api:
        answers = []
        for _ in range(10):  # 32 KiB of burst: four such events, a fifth past it
            answers.append(await api.post(EVENTS, json=event, headers=UID))
            if answers[-1].status_code != 200:
                break
        refused = answers[-1]
        assert refused.status_code == 429, [a.status_code for a in answers]
        assert int(refused.headers["Retry-After"]) >= 1
        body = refused.json()
        assert body["status"] == 429 and body["data"] is None
        assert "DISPATCHER_EMIT_PROJECT_RATE" in body["message"]
        assert len(await queued_ids(redis, settings)) == len(answers) - 1
        assert (await api.post(BATCH, json=[event], headers=UID)).status_code == 429
        other = "/apigw/v4/projects/other/events"
        assert (await api.post(other, json=event, headers=UID)).status_code == 200
        assert (await api.post(f"{other}/batch", json=[event], headers=UID)).status_code == 200
    queued = [j for j in await redis.zrange(settings.queue_name, 0, -1) if j.startswith(b"demo:")]
    assert len(queued) == len(answers) - 1  # demo's: no more


def test_a_projects_emit_bucket_refills_at_its_rate_and_forgets_the_least_recent() -> None:
    """The bucket: a burst, then the rate; a refusal spends nothing and says how long to
    wait; the projects seen least recently are forgotten past `most` (a full bucket again);
    what a request refused after it spent is given back; a debt holds a burst at most."""
    pace = EmitPace(rate=1000, burst=4000, most=2)
    assert pace.take("a", 3000, now=0) == 0
    assert pace.take("a", 2000, now=0) == pytest.approx(1.0)  # 1000 left, 1000 short
    assert pace.take("a", 2000, now=1) == 0  # refilled 1000 in a second
    assert pace.take("a", 100, now=1) == pytest.approx(0.1)
    assert pace.take("b", 4000, now=1) == 0
    assert pace.take("c", 4000, now=1) == 0  # three projects: a, seen least recently, goes
    assert pace.take("a", 4000, now=1) == 0
    pace.give_back("a", 1500)  # a request refused after it spent: its bytes back
    assert pace.take("a", 1500, now=1) == 0
    assert pace.take("a", 1, now=1) > 0
    # a window's walk owes what it read, a burst's worth at most (review)
    assert pace.owe("a", 40 * 4000, now=1) == pytest.approx(4.0)
    assert pace.take("a", 1000, now=5) == pytest.approx(1.0)  # 4 s to pay it back, then 1


async def test_a_batch_of_tiny_events_costs_its_events_not_only_its_bytes(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """A batch costs 1 KiB an event at least, as single emits do: 1,000 tiny events in 32
    KB of body made 1,000 jobs (~0.5 MB of Redis) for a 32 KB charge, 16 times what was
    counted (review). A batch refused here queues nothing and spends nothing."""
    settings = paced(redis_server.url, emit_project_burst=64 * 1024)
    lines = b"\n".join([b'{"event": "BUILD_END", "data": {}}'] * 30)  # ~1 KB of body
    async with app_client(settings, redis) as api:
        codes = [(await api.post(BATCH, content=lines, headers=NDJSON)).status_code for _ in "abc"]
    assert codes == [200, 200, 429]  # 30 KiB each, 64 KiB in all
    assert len(await queued_ids(redis, settings)) == 60


async def test_a_redelivery_costs_what_it_may_queue(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A single redelivery queues a new job each time (its body up to
    `DISPATCHER_MAX_REQUEST_BODY`): one recorded request sent again in a loop filled Redis
    at 36 MiB/s, nothing charged (review). Each costs that much of its project's share, on
    the API's route and the console's; one refused after all (an unknown record, a
    malformed form) is given back, on both (it paid: review)."""
    settings = paced(
        redis_server.url,
        emit_project_burst=64 * 1024,
        max_request_body=30 * 1024,
        retry_schedule=(),
    )
    receiver.script("/hook", answer(400))
    await Registry(redis).create("demo", receiver.url("/hook"), Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
    await run_worker(settings)
    [record] = await all_records(redis, settings, receiver.url("/hook"))
    retry = f"/apigw/v4/projects/demo/callbacks/history/{record.id}/retry"
    unknown = f"/apigw/v4/projects/demo/callbacks/history/{record.id + 1000}/retry"
    async with app_client(settings, redis) as api:
        assert [(await api.post(unknown, headers=UID)).status_code for _ in "abc"] == [404] * 3
        form = (await api.get("/console/projects/demo", headers=UID)).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None
        for _ in "abc":  # the console's: its route turns the error into a page first
            missing = await api.post(
                f"/console/projects/demo/history/{record.id + 1000}/redeliver",
                data={"csrf_token": token[1]},
                headers=UID,
            )
            assert missing.status_code == 404
            malformed = await api.post(
                f"/console/projects/demo/history/{record.id}/redeliver",
                data={"csrf_token": token[1], "back": "nowhere"},
                headers=UID,
            )
            assert malformed.status_code == 400
        codes = [(await api.post(retry, headers=UID)).status_code for _ in "abc"]
        console = await api.post(
            f"/console/projects/demo/history/{record.id}/redeliver",
            data={"csrf_token": token[1]},
            headers=UID,
        )
    assert codes == [200, 200, 429]
    assert console.status_code == 429 and "DISPATCHER_EMIT_PROJECT_RATE" in console.text
    assert int(console.headers["Retry-After"]) >= 1  # as the API's (it had none: review)
    assert await redis.zcard(settings.queue_name) == 2


async def test_a_redelivery_an_outage_refuses_after_its_push_keeps_its_cost(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A redelivery whose push no replica confirmed (503: it may be queued) keeps what it
    paid: a first version gave it back, and six calls queued six jobs past a burst of two
    (review)."""
    settings = paced(redis_server.url, emit_project_burst=64 * 1024,
                     max_request_body=30 * 1024, retry_schedule=())  # fmt: skip
    await Registry(redis).create("demo", receiver.url("/hook"), Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {"n": 1})
    await run_worker(settings)
    [record] = await all_records(redis, settings, receiver.url("/hook"))
    retry = f"/apigw/v4/projects/demo/callbacks/history/{record.id}/retry"
    unconfirmed = settings.model_copy(update={"redis_min_replicas": 1, "emit_wait": 0.3})
    async with app_client(unconfirmed, redis) as api:  # this Redis has no replica
        codes = [(await api.post(retry, headers=UID)).status_code for _ in range(6)]
    assert codes == [503, 503, 429, 429, 429, 429], codes
    assert await redis.zcard(settings.queue_name) == 2


async def test_a_window_redelivery_costs_each_job_it_queues(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A window's redelivery costs each job it queues (its body's bytes, 1 KiB at least) of
    its project's share, as a single one does: past it, the call stops and answers 429 in
    the envelope, with Retry-After, saying how many it queued, on the API's route and the
    console's. It had no pace: with 1 byte a second, each call queued every failure of
    the window (60 jobs) while single redeliveries were refused (review)."""
    settings = paced(redis_server.url, emit_project_burst=32 * 1024, retry_schedule=())
    url = receiver.url("/hook")
    receiver.script("/hook", answer(400))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    pad = "x" * 6000
    await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"n": n, "pad": pad}) for n in range(12)]
    )
    await run_worker(settings)
    records = await all_records(redis, settings, url)
    assert len(records) == 12
    most = 32 * 1024 // min(len(r.request_body) for r in records)  # what the burst pays for
    window = "/apigw/v4/projects/demo/callbacks/history/retry"
    params = {"url": url, "event": "BUILD_END"}
    async with app_client(settings, redis) as api:
        refused = await api.post(window, params=params, headers=UID)
        again = await api.post(window, params=params, headers=UID)
        form = (await api.get("/console/projects/demo", headers=UID)).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None
        console = await api.post(
            "/console/projects/demo/history/redeliver-failed",
            data={"csrf_token": token[1], **params},
            headers=UID,
        )
    queued = await redis.zcard(settings.queue_name)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    body = refused.json()
    assert body["status"] == 429 and body["data"] is None, body
    assert "DISPATCHER_EMIT_PROJECT_RATE" in body["message"]
    assert 1 <= queued <= most, (queued, most)
    assert f"{queued} redeliveries of the window were queued" in body["message"], body
    assert again.status_code == 429 and "0 redeliveries" in again.json()["message"]
    assert console.status_code == 429 and "DISPATCHER_EMIT_PROJECT_RATE" in console.text
    assert int(console.headers["Retry-After"]) >= 1
    assert await redis.zcard(settings.queue_name) == queued  # no more


async def test_a_window_redeliverys_walk_costs_what_it_left_out(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """A window's redelivery owes 1 KiB for each record it read and left out (here: 60
    failures of a disabled callback), when the call ends: that call answers (nothing is
    refused mid-walk, which would walk the same records each time), and the project's next
    window or single redelivery waits the debt out (429). The walk was free: a window of
    1,500 failures of 40 KB made Redis send 116 MiB a call, call after call (review)."""
    settings = paced(redis_server.url, emit_project_burst=32 * 1024)
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", URL, Event.BUILD_END, Region.DEVNET)
    now = now_ms()
    failures = [{**record(now - 1000 + n, n=n), "status": "FAILED", "final": True,
                 "callbackId": callback_id} for n in range(60)]  # fmt: skip
    [first, *_] = await add_all(redis, settings, cast("list[AttemptRecord]", failures))
    await registry.set_enabled(callback_id, False, "paused")
    window = "/apigw/v4/projects/demo/callbacks/history/retry"
    params = {"url": URL, "event": "BUILD_END"}
    async with app_client(settings, redis) as api:
        walked = await api.post(window, params=params, headers=UID)
        again = await api.post(window, params=params, headers=UID)
        await registry.set_enabled(callback_id, True)
        single = await api.post(f"/apigw/v4/projects/demo/callbacks/history/{first}/retry",
                                headers=UID)  # fmt: skip
    assert walked.status_code == 200 and walked.json()["data"]["callbackGone"] == 60
    assert again.status_code == 429 and int(again.headers["Retry-After"]) >= 28  # 60 - 32 KiB
    assert single.status_code == 429
    assert await redis.zcard(settings.queue_name) == 0


async def test_a_window_redelivery_refused_mid_walk_says_to_wait_out_its_debt_too(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """30 deliveries redelivered with success since (left out, 1 KiB each owed), then 60
    that still failed, 1 KiB a job, against a burst of 32 KiB at 1 KiB a second: the call
    queues what the burst pays for, and its 429's Retry-After counts the 30 KiB its walk
    owes as well. It said 1 s, and a client that waited that long was refused again for
    30 more (review)."""
    settings = paced(redis_server.url, emit_project_burst=32 * 1024)
    callback_id, _ = await Registry(redis).create("demo", URL, Event.BUILD_END, Region.DEVNET)
    now, rows = now_ms(), []
    for n in range(60):  # the oldest: failed for good
        rows.append({**record(now - 100_000 + n, n=n), "status": "FAILED", "final": True,
                     "callbackId": callback_id})  # fmt: skip
    for n in range(60, 90):  # the newest: failed, then redelivered with success
        rows.append({**record(now - 50_000 + n, n=n), "status": "FAILED", "final": True,
                     "callbackId": callback_id})  # fmt: skip
        rows.append({**record(now - 10_000 + n, n=n), "final": True, "callbackId": callback_id})
    await add_all(redis, settings, cast("list[AttemptRecord]", rows))
    async with app_client(settings, redis) as api:
        refused = await api.post(
            "/apigw/v4/projects/demo/callbacks/history/retry",
            params={"url": URL, "event": "BUILD_END"},
            headers=UID,
        )
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 30, refused.headers
    assert 1 <= await redis.zcard(settings.queue_name) <= 32
