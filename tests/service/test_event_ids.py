"""Event ids are the producers' own, so they are per project: job, delivery and progress
ids (and `webhook-id`) are scoped by the emitting project, and a queue written by the
version before keeps working."""

from __future__ import annotations

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.errors import InvalidInput
from dispatcher.events import EventIdReused, event_job
from dispatcher.jobs import DeliveryJob, EventJob, decode, encode
from dispatcher.keys import Keys
from dispatcher.lane_ids import lane_id
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, RunWorker, all_records, answer

keys = Keys()  # today's key names (one shard)
EVENTS = "/apigw/v4/projects/projA/events"
NDJSON = {**UID, "Content-Type": "application/x-ndjson"}


async def register(redis: Redis, project: str, url: str) -> int:
    callback_id, _ = await Registry(redis).create(project, url, Event.BUILD_END, Region.DEVNET, "t")
    return callback_id


async def test_two_projects_may_use_the_same_event_id(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """projB emits `build-1001` first; projA's `build-1001` is still queued and delivered,
    and a platform-wide receiver gets both, under two delivery ids."""
    await register(redis, "projA", receiver.url("/a"))
    await register(redis, "projB", receiver.url("/b"))
    platform = await register(redis, PLATFORM_PROJECT, receiver.url("/all"))
    producer = Producer(settings, redis)
    await producer.emit("projB", "BUILD_END", {"n": "B"}, event_id="build-1001")
    await producer.emit("projA", "BUILD_END", {"n": "A"}, event_id="build-1001")
    await producer.emit_many([("projC", "BUILD_END", {"n": "C"}, "build-1001")])
    await run_worker()
    assert len(receiver.requests("/a")) == len(receiver.requests("/b")) == 1
    by_project = {s.headers["X-DEVOPS-PROJECT-ID"]: s for s in receiver.requests("/all")}
    assert sorted(by_project) == ["projA", "projB", "projC"]
    for project, seen in by_project.items():
        assert seen.headers["webhook-id"] == f"{project}:build-1001.{platform}"
        assert orjson.loads(seen.body)["data"]["n"] == project[-1]


async def test_the_scoped_delivery_id_holds_across_retries_and_redeliveries(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(500), answer(200))
    callback_id = await register(redis, "projA", url)
    await Producer(settings, redis).emit("projA", "BUILD_END", {}, event_id="build-7")
    await run_worker()
    _, retry = await all_records(redis, settings, url, project="projA")
    async with Services.open(settings, redis) as services:
        await services.redeliver(retry.id, "projA")
    await run_worker()
    expected = f"projA:build-7.{callback_id}"
    assert [s.headers["webhook-id"] for s in receiver.requests()] == [expected] * 3
    records = await all_records(redis, settings, url, project="projA")
    assert {r.delivery_id for r in records} == {expected}
    assert {r.event_id for r in records} == {"build-7"}


def legacy_fan_out(event_id: str, project: str) -> bytes:
    """A fan-out job as the version before scoped ids wrote it (its bytes, to the letter)."""
    payload = {"id": event_id, "projectId": project, "event": "BUILD_END",
               "data": {"n": event_id}, "emittedAt": now_ms() - 10_000}  # fmt: skip
    return orjson.dumps({"t": None, "f": "fan_out", "a": [payload], "k": {}, "et": now_ms()})


async def test_jobs_queued_by_the_previous_version_run_and_deliver_once(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Old-format jobs written straight into Redis: a fan-out never run; a fan-out whose
    first run (on the old version) recorded one callback and died (its claim counted, its
    progress mark under the unscoped delivery id); a retry of an unscoped delivery. Each
    delivery is sent once, under the ids it started with."""
    a = await register(redis, "projA", receiver.url("/a"))
    b = await register(redis, "projA", receiver.url("/b"))
    queue = settings.queue_name
    now = now_ms()
    for event_id in ("old-1", "old-2"):
        await redis.set(keys.arq_job(event_id), legacy_fan_out(event_id, "projA"))
        await redis.zadd(queue, {event_id: now})
    await redis.set(keys.ARQ_RETRY_PREFIX + "old-2", 1)  # old-2 ran once, and died after /a
    await redis.set(keys.delivery(f"old-2.{a}"), "done", ex=86_400)  # as that version set it
    retry = {"deliveryId": f"old-3.{b}", "progressId": f"old-3.{b}", "eventId": "old-3",
             "projectId": "projA", "event": "BUILD_END", "body": '{"event":"BUILD_END"}',
             "callbackId": b, "redeliveryOf": None}  # fmt: skip
    wire: dict[str, object] = {"t": None, "f": "deliver", "a": [retry], "k": {}, "et": now}
    await redis.set(keys.arq_job(f"old-3.{b}"), orjson.dumps(wire))
    await redis.set(keys.delivery(f"old-3.{b}"), "1", ex=86_400)
    await redis.zadd(queue, {f"old-3.{b}": now})
    await run_worker()
    assert sorted(s.headers["webhook-id"] for s in receiver.requests("/a")) == [f"old-1.{a}"]
    assert sorted(s.headers["webhook-id"] for s in receiver.requests("/b")) == [
        f"old-1.{b}", f"old-2.{b}", f"old-3.{b}"
    ]  # fmt: skip
    assert await redis.zcard(queue) == 0
    assert await redis.keys("arq:job:*") == []


async def emitted_earlier(redis: Redis, job_id: str, ms: int) -> None:
    """The queued event job `job_id`, as if emitted `ms` earlier."""
    wire = orjson.loads(await redis.get(keys.arq_job(job_id)) or b"")
    wire["a"][0]["emittedAt"] -= ms
    await redis.set(keys.arq_job(job_id), orjson.dumps(wire))


async def test_a_mark_the_version_before_left_counts_when_written_since_the_emission(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A re-run reads a mark under the delivery id alone (the version before's) as this
    emission's only when it was written since the event was emitted (its TTL tells when):
    one written before is the "done" of an emission before, when the event id is emitted
    again, and must not end this emission's delivery with no attempt (review finding)."""
    stale = await register(redis, "projA", receiver.url("/stale"))
    fresh = await register(redis, "projA", receiver.url("/fresh"))
    await Producer(settings, redis).emit("projA", "BUILD_END", {}, event_id="again-1")
    await emitted_earlier(redis, "projA:again-1", 10_000)
    day_ms = 86_400_000
    await redis.set(keys.delivery(f"projA:again-1.{stale}"), "done", px=day_ms - 60_000)
    await redis.set(keys.delivery(f"projA:again-1.{fresh}"), "done", px=day_ms)
    await redis.set(keys.ARQ_RETRY_PREFIX + "projA:again-1", 1)  # its first run died
    await run_worker()
    assert len(receiver.requests("/stale")) == 1  # written before the emission: none
    assert receiver.requests("/fresh") == []  # this emission's, left by that version
    assert await redis.zcard(settings.queue_name) == 0


@pytest.mark.parametrize("stale", [False, True])
async def test_an_ordered_head_the_version_before_entered_goes_on_under_its_delivery_id(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, stale: bool
) -> None:
    """The version before entered an ordered delivery in its lane under its delivery id
    alone, as the lane's head to attempt at once, and died before its attempt's write.
    The re-run on this version finds it there and goes on with it under that id: it is
    sent once and leaves the lane empty (entered again under its new id, it sorted behind
    the old entry, which no job held: the lane stopped for good; review finding). A mark
    an emission before left under that id (`stale`) does not stop it (second review)."""
    url = receiver.url("/ordered")
    callback_id, _ = await Registry(redis).create(
        "projA", url, Event.BUILD_END, Region.DEVNET, "t", options=Options(order_by="buildId")
    )
    await Producer(settings, redis).emit("projA", "BUILD_END", {"buildId": "b"}, event_id="head-1")
    number = await redis.zscore(keys.lanes_pending("projA"), "projA:head-1")
    assert number is not None  # numbered: its project is ordered
    lane = keys.lane(lane_id("projA", url, "buildId", "projA", "b"))
    delivery_id = f"projA:head-1.{callback_id}"
    await redis.zadd(lane, {delivery_id: number})  # that version's entry, as its head
    if stale:  # the event id's emission before, a minute before this one
        await emitted_earlier(redis, "projA:head-1", 1_000)
        await redis.set(keys.delivery(delivery_id), "done", px=86_400_000 - 60_000)
    await redis.set(keys.ARQ_RETRY_PREFIX + "projA:head-1", 1)  # its first run died
    await run_worker()
    assert [s.headers["webhook-id"] for s in receiver.requests("/ordered")] == [delivery_id]
    assert not await redis.exists(lane)
    assert await redis.zcard(settings.queue_name) == 0


async def test_an_event_id_reused_for_another_event_is_refused_while_it_is_queued(
    api: httpx.AsyncClient, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A producer whose event ids are its build ids: BUILD_END under `b-42` while its
    BUILD_START is queued was answered `queued` and dropped, with no trace (review). It is a
    409 naming eventId; the same event again (a retry, its data's keys in any order) is the
    one queued; once that event has ended, the id names a new emission."""
    for event in (Event.BUILD_START, Event.BUILD_END):
        await Registry(redis).create("projA", receiver.url(), event, Region.DEVNET, "t")
    start = {"event": "BUILD_START", "eventId": "b-42", "data": {"buildId": "b-42", "n": 1}}
    end = {"event": "BUILD_END", "eventId": "b-42", "data": {"buildId": "b-42", "n": 1}}
    assert (await api.post(EVENTS, json=start, headers=UID)).status_code == 200
    for other in (end, {**start, "data": {"buildId": "b-42", "n": 2}}):
        refused = await api.post(EVENTS, json=other, headers=UID)
        assert refused.status_code == 409
        body = refused.json()
        assert body["status"] == 409 and body["data"] is None
        assert body["message"].startswith("eventId 'b-42' names another event of projA")
    retry = {**start, "data": {"n": 1, "buildId": "b-42"}}
    again = await api.post(EVENTS, json=retry, headers=UID)
    assert again.json()["data"] == {"eventId": "b-42", "queued": True}
    await run_worker()
    assert [s.headers["X-DEVOPS-EVENT"] for s in receiver.requests()] == ["BUILD_START"]
    assert (await api.post(EVENTS, json=end, headers=UID)).status_code == 200  # ended: free
    await run_worker()
    assert [s.headers["X-DEVOPS-EVENT"] for s in receiver.requests()][1:] == ["BUILD_END"]


async def test_a_batch_refuses_alone_an_entry_whose_event_id_names_another_event(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    """On both batch bodies: an entry under a queued event's id (or under the id of an entry
    before it) with another event or data fails alone, in the failure list."""
    queued = {"event": "BUILD_START", "eventId": "b-7", "data": {"n": 1}}
    assert (await api.post(EVENTS, json=queued, headers=UID)).status_code == 200
    batch = [
        queued,  # the same event: taken as the one queued
        {"event": "BUILD_END", "eventId": "b-7", "data": {"n": 1}},
        {"event": "BUILD_END", "eventId": "b-8"},
        {"event": "BUILD_START", "eventId": "b-8"},
    ]
    array = (await api.post(f"{EVENTS}/batch", json=batch, headers=UID)).json()
    lines = b"\n".join(orjson.dumps(entry) for entry in batch)
    streamed = (await api.post(f"{EVENTS}/batch", content=lines, headers=NDJSON)).json()
    for body, names in ((array, ("events[1]", "events[3]")), (streamed, ("line 2", "line 4"))):
        data = body["data"]
        assert (data["accepted"], data["failed"]) == (2, 2)
        assert body["message"] == "2 of 4 events refused; see data.results"
        assert [r["eventId"] for r in data["results"]] == ["b-7", None, "b-8", None]
        for place, where, reused in zip((1, 3), names, ("b-7", "b-8"), strict=True):
            error = data["results"][place]["error"]
            assert error.startswith(f"{where}: eventId '{reused}' names another event of projA")
    queue = [i.decode() for i in await redis.zrange(settings.queue_name, 0, -1)]
    assert sorted(queue) == ["projA:b-7", "projA:b-8"]


async def test_python_producers_refuse_an_event_id_reused_for_another_event(
    settings: Settings, redis: Redis
) -> None:
    """`emit` and `emit_many` raise `EventIdReused` (a 409) naming the ids, after queueing
    the others; `emit_each` returns it in the refused entry's place."""
    producer = Producer(settings, redis)
    await producer.emit("projA", "BUILD_START", {"n": 1}, event_id="b-1")
    with pytest.raises(EventIdReused, match=r"^eventId 'b-1' names another event") as raised:
        await producer.emit("projA", "BUILD_END", {"n": 1}, event_id="b-1")
    assert raised.value.http_status == 409 and raised.value.event_ids == ["b-1"]
    assert await producer.emit("projA", "BUILD_START", {"n": 1}, event_id="b-1") == "b-1"
    with pytest.raises(EventIdReused, match=r"the other 2 events are queued$") as raised:
        await producer.emit_many(
            [
                ("projA", "BUILD_END", {}, "b-1"),
                ("projA", "BUILD_END", {}, "b-2"),
                ("projA", "BUILD_START", {"n": 1}, "b-1"),
            ]
        )
    assert raised.value.event_ids == ["b-1"]
    entries = [{"event": "BUILD_END", "eventId": "b-2"}, {"event": "BUILD_END", "eventId": "b-1"}]
    first, second = await producer.emit_each("projA", entries)
    assert first == "b-2" and isinstance(second, EventIdReused)
    queue = [i.decode() for i in await redis.zrange(settings.queue_name, 0, -1)]
    assert sorted(queue) == ["projA:b-1", "projA:b-2"]


async def test_emit_many_says_what_it_queued_when_it_refuses_an_event_id(
    settings: Settings, redis: Redis
) -> None:
    """`emit_many` raises `EventIdReused` once it has queued the others: the exception
    holds each event's outcome in the list's order, the id of each one queued (a fresh
    id included, which nothing else gives back) and None where refused (`refused`: their
    places). Before, it named only the refused ids: a caller could not tell the generated
    ids of what was queued, and a retry of the list queued those events again under new
    ids, duplicates no receiver could tell apart (review)."""
    producer = Producer(settings, redis)
    with pytest.raises(EventIdReused) as raised:
        await producer.emit_many(
            [
                ("projA", "BUILD_END", {}, None),
                ("projA", "BUILD_END", {"a": 1}, "X"),
                ("projA", "BUILD_END", {"a": 2}, "X"),
            ]
        )
    fresh, reused, refused = raised.value.outcomes
    assert fresh is not None and fresh.startswith("evt_")
    assert (reused, refused, raised.value.refused) == ("X", None, [2])
    assert raised.value.event_ids == ["X"]
    queue = [i.decode() for i in await redis.zrange(settings.queue_name, 0, -1)]
    assert sorted(queue) == sorted([f"projA:{fresh}", "projA:X"])


async def test_an_event_queued_by_the_version_before_is_taken_as_the_same(
    settings: Settings, redis: Redis
) -> None:
    """A job queued before events had a digest cannot be compared: an emit of its id is
    answered as before (the event queued, not queued again), whatever it holds."""
    payload = {"id": "old-9", "projectId": "projA", "event": "BUILD_START", "data": {"n": 1},
               "emittedAt": now_ms(), "ids": "project"}  # fmt: skip
    old = orjson.dumps({"t": None, "f": "fan_out", "a": [payload], "k": {}, "et": now_ms()})
    await redis.set(keys.arq_job("projA:old-9"), old)
    await redis.zadd(settings.queue_name, {"projA:old-9": now_ms()})
    producer = Producer(settings, redis)
    assert await producer.emit("projA", "BUILD_END", {"n": 2}, event_id="old-9") == "old-9"
    assert await redis.get(keys.arq_job("projA:old-9")) == old


def test_an_events_digest_leads_its_job_through_every_chunk() -> None:
    """The queue's script reads the digest at the head of the job's bytes (a range of them,
    whatever the data's size), so it must lead them as emitted and once handed over to the
    next chunk by a worker; data of the same keys in another order has the same digest. An
    event given a fresh id has none (no other event has its id): it costs nothing more."""
    job = event_job("projA", "BUILD_END", {"a": 1, "b": [2]}, "b-1")
    head = encode(job)[:80]
    assert head.startswith(b'{"t":null,"f":"fan_out","a":[{"digest":"' + job.digest.encode())
    read = EventJob.from_wire(decode(encode(job)).payload)
    assert encode(read.continued(7, rerun=True))[:80] == head
    assert event_job("projA", "BUILD_END", {"b": [2], "a": 1}, "b-1").digest == job.digest
    assert event_job("projA", "BUILD_START", {"a": 1, "b": [2]}, "b-1").digest != job.digest
    fresh = event_job("projA", "BUILD_END", {"a": 1})  # its id names no other event
    assert fresh.digest == "" and encode(fresh).startswith(b'{"t":null,"f":"fan_out","a":[{"id":')


async def test_an_event_id_cannot_name_a_redeliverys_job(
    settings: Settings, redis: Redis, api: httpx.AsyncClient
) -> None:
    """Event id `X.7:redeliver:after-5812` made projA's fan-out job id that of the window
    redelivery of delivery `projA:X.7` (platform callback 7) after its attempt 5812, which
    was then counted `alreadyQueued` and never sent (review). An event id holding
    `:redeliver:` is refused on every path; jobs queued before stay readable."""
    producer = Producer(settings, redis)
    for taken in ("X.7:redeliver:after-5812", "X.7:redeliver:9f2c0e1a7b3d", "a:redeliver:b"):
        with pytest.raises(InvalidInput, match="redeliver") as refused:
            await producer.emit("projA", "BUILD_START", {}, event_id=taken)
        assert refused.value.param == "eventId"
        with pytest.raises(InvalidInput, match="redeliver"):
            await producer.emit_many([("projA", "BUILD_START", {}, taken)])
        entry = {"event": "BUILD_START", "eventId": taken}
        single = await api.post(EVENTS, json=entry, headers=UID)
        assert single.status_code == 400 and "eventId" in single.json()["message"]
        batch = (await api.post(f"{EVENTS}/batch", json=[entry], headers=UID)).json()
        assert batch["data"]["results"][0]["error"].startswith("events[0]: eventId must not")
    assert await redis.zcard(settings.queue_name) == 0
    original = DeliveryJob("projA:X.7", "projA:X.7", "X", PLATFORM_PROJECT, "BUILD_END", b"{}", 7)
    assert await producer.requeue([original.redelivery(5812, after=5812)], once=True) == 1
    for alike in ("X.7:redeliver", "redeliver:after-5812", "X.7:REDELIVER:after-1"):
        assert await producer.emit("projA", "BUILD_START", {}, event_id=alike) == alike
    wire = decode(encode(EventJob("X.7:redeliver:after-1", "projA", "BUILD_END"))).payload
    assert EventJob.from_wire(wire).job_id == "projA:X.7:redeliver:after-1"  # still read
