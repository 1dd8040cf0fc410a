"""Delivery end to end: real Redis, real burst workers, real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from dispatcher.batch import QueueCommands
from dispatcher.clock import now_ms
from dispatcher.delivery import encode_body
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.registry.scripts import SetEnabled
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import Engine
from dispatcher.worker.steps import FirstRetry
from dispatcher.worker.writer import Writer
from tests.helpers import Receiver, RunWorker, answer, hang, make_settings

keys = Keys()  # today's key names (one shard)


async def register(
    redis: Redis,
    url: str,
    event: Event = Event.BUILD_END,
    token: str | None = "s3cret",
    project: str = "demo",
) -> int:
    callback_id, _ = await Registry(redis).create(project, url, event, Region.DEVNET, token)
    return callback_id


async def emit(settings: Settings, redis: Redis, event: str = "BUILD_END", **data: object) -> str:
    return await Producer(settings, redis).emit("demo", event, data or {"buildId": "b-1"})


async def records(
    redis: Redis, settings: Settings, url: str, event: str = "BUILD_END"
) -> list[HistoryRecord]:
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        "demo", url, event, start_ms=now - 60_000, end_ms=now + 60_000, page_size=100
    )
    return list(reversed(page.records))  # oldest first


async def test_event_reaches_every_matching_callback_and_no_other(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(redis, receiver.url("/a"))
    await register(redis, receiver.url("/b"))
    await register(redis, receiver.url("/other-event"), event=Event.BUILD_START)
    await register(redis, receiver.url("/other-project"), project="elsewhere")
    await emit(settings, redis)
    await run_worker()
    assert sorted(s.path for s in receiver.seen) == ["/a", "/b"]
    body = orjson.loads(receiver.requests("/a")[0].body)
    assert body == {"event": "BUILD_END", "projectId": "demo", "data": {"buildId": "b-1"}}


async def test_token_and_signature_verify_with_standardwebhooks(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(redis, receiver.url(), token="s3cret")
    event_id = await emit(settings, redis)
    await run_worker()
    [seen] = receiver.requests()
    assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == "s3cret"
    assert {"X-DEVOPS-WEBHOOK-TOKEN", "webhook-id"} <= set(seen.headers.keys())  # as spelled
    assert seen.headers["X-DEVOPS-EVENT"] == "BUILD_END"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"].startswith("callback-dispatcher/")
    assert seen.headers["webhook-id"] == seen.headers["X-DEVOPS-DELIVERY-ID"]
    assert seen.headers["webhook-id"].startswith(f"demo:{event_id}.")
    verifier = Webhook("whsec_" + base64.b64encode(b"s3cret").decode())
    verified = verifier.verify(seen.body, dict(seen.headers))
    assert verified == {"event": "BUILD_END", "projectId": "demo", "data": {"buildId": "b-1"}}
    forged = Webhook("whsec_" + base64.b64encode(b"other").decode())
    with pytest.raises(Exception, match="signature"):
        forged.verify(seen.body, dict(seen.headers))


async def test_no_token_no_token_header_and_no_signature(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(redis, receiver.url(), token=None)
    await emit(settings, redis)
    await run_worker()
    [seen] = receiver.requests()
    assert "X-DEVOPS-WEBHOOK-TOKEN" not in seen.headers
    assert "webhook-signature" not in seen.headers


async def test_500_twice_then_200_gives_three_attempts_and_records(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(500, "boom"), answer(503), answer(200, "fine"))
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()
    seen = receiver.requests()
    assert len(seen) == 3
    assert len({s.headers["webhook-id"] for s in seen}) == 1  # stable across retries
    assert len({s.body for s in seen}) == 1
    recs = await records(redis, settings, url)
    assert [(r.attempt, r.status.value, r.response_code) for r in recs] == [
        (1, "FAILED", 500),
        (2, "FAILED", 503),
        (3, "SUCCESS", 200),
    ]
    assert recs[0].response_body == "boom" and recs[2].response_body == "fine"
    assert [r.final for r in recs] == [False, False, True]
    assert recs[0].request_body == seen[0].body.decode()
    token_header = {h.name: h.value for h in recs[0].request_headers}["X-DEVOPS-WEBHOOK-TOKEN"]
    assert token_header == "******"


async def test_404_is_not_retried(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(404, "no such hook"))
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()
    assert len(receiver.requests()) == 1
    [rec] = await records(redis, settings, url)
    assert (rec.status.value, rec.response_code, rec.final) == ("FAILED", 404, True)
    assert rec.error_msg == "HTTP 404"
    dead = await RedisHistory(redis, settings, keys).dead()
    assert [d.id for d in dead] == [rec.id]


async def test_redirect_is_a_failure_not_followed(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(302, headers={"Location": receiver.url("/elsewhere")}))
    await register(redis, url)
    dead_before = REGISTRY.get_sample_value("dispatcher_dead_letters_total") or 0
    await emit(settings, redis)
    await run_worker()
    assert receiver.requests("/elsewhere") == []
    [rec] = await records(redis, settings, url)
    assert rec.response_code == 302 and "redirects are not followed" in (rec.error_msg or "")
    assert REGISTRY.get_sample_value("dispatcher_dead_letters_total") == dead_before + 1


async def test_hanging_receiver_is_cut_at_the_timeout_and_retried(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    settings = make_settings(redis_server.url, total_timeout=0.3, connect_timeout=0.3)
    url = receiver.script("/hook", hang(5), answer(200))
    await register(redis, url)
    await emit(settings, redis)
    started = time.monotonic()
    await run_worker(settings)
    assert time.monotonic() - started < 4
    recs = await records(redis, settings, url)
    assert [r.status.value for r in recs] == ["FAILED", "SUCCESS"]
    assert "timed out" in (recs[0].error_msg or "")
    assert recs[0].response_code is None
    assert 250 <= (recs[0].duration_ms or 0) < 2000


async def test_a_receiver_dripping_its_answer_is_cut_at_the_total_timeout(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Its status comes at once, then one byte every 50 ms for 10 s: no single read waits
    long, so only the attempt's one overall timer (`delivery.send`'s) can end it."""

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        try:
            for _ in range(200):
                await response.write(b"x")
                await asyncio.sleep(0.05)
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    settings = make_settings(redis_server.url, total_timeout=0.3, connect_timeout=0.3)
    url = receiver.script("/hook", drip)
    await register(redis, url)
    await emit(settings, redis)
    await run_worker(settings)
    [rec] = await records(redis, settings, url)
    assert rec.response_code == 200 and "timed out after 0.3s" in (rec.error_msg or "")
    assert 250 <= (rec.duration_ms or 0) < 2000


async def test_retry_after_is_honoured(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(429, headers={"Retry-After": "1"}), answer(200))
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()
    first, second = receiver.requests()
    assert second.at - first.at >= 0.95  # the schedule alone would wait 0.05 s


async def test_connection_refused_is_retried_until_the_schedule_ends(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    url = "http://127.0.0.1:9/closed"  # discard port: nothing listens
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()
    recs = await records(redis, settings, url)
    assert len(recs) == settings.max_attempts == 4
    assert all(r.response_code is None and r.error_msg for r in recs)
    assert [r.final for r in recs] == [False, False, False, True]


async def test_disabled_callback_receives_nothing(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    callback_id = await register(redis, receiver.url())
    await Registry(redis).set_enabled(callback_id, False, "paused")
    await emit(settings, redis)
    await run_worker()
    assert receiver.seen == []


async def test_callback_disabled_between_retries_gets_no_more_attempts(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The delivery ends as a recorded drop, not in silence."""
    url = receiver.script("/hook", answer(500))
    callback_id = await register(redis, url)
    slow = make_settings(settings.redis_url or "", retry_schedule=(0.5, 0.5))
    event_id = await emit(slow, redis)
    await run_worker(slow, max_burst_jobs=1)  # the fan-out only: attempt 1
    await Registry(redis).set_enabled(callback_id, False, "paused")
    await run_worker(slow)
    assert len(receiver.requests()) == 1
    drops = await redis.lrange(keys.DROPPED, 0, -1)  # type: ignore[misc]  # sync|async
    [drop] = [orjson.loads(e) for e in drops]
    assert drop["deliveryId"] == f"demo:{event_id}.{callback_id}"
    assert drop["reason"] == "callback deleted or disabled"
    assert await redis.zcard(settings.queue_name) == 0


async def test_duplicate_fan_out_delivers_once(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A fan-out of several deliveries marks each one's progress (its job ends in a write
    of its own); one of a single delivery ends its job in its record's script, so nothing
    can run it again and it needs no mark."""
    for path in ("/a", "/b"):
        await register(redis, receiver.url(path))
    event = EventJob(id="evt_dup", project_id="demo", event="BUILD_END", emitted_at=now_ms())
    queue = Queue(redis, Keys(settings.queue_name))
    assert await queue.enqueue(event)
    assert not await queue.enqueue(event)  # still queued: refused
    await run_worker()
    # a re-run of the same fan-out (as after a worker crash) skips what was delivered
    services = Services(settings, redis)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    try:
        assert await engine.fan_out(event, rerun=True) is None  # one chunk, the last
    finally:
        await engine.close()
    assert len(receiver.seen) == 2
    assert len(await redis.keys(keys.DELIVERY_PREFIX + "*evt_dup*")) == 2  # marked

    single = EventJob(id="evt_one", project_id="demo", event="BUILD_START")
    await register(redis, receiver.url("/c"), Event.BUILD_START)
    assert await queue.enqueue(single)
    await run_worker()
    assert len(receiver.requests("/c")) == 1
    assert await redis.zcard(settings.queue_name) == 0
    assert not await redis.exists(keys.arq_job(single.job_id))
    assert await redis.keys(keys.DELIVERY_PREFIX + "*evt_one*") == []  # no mark


async def writes_of(
    services: Services, event_id: str
) -> list[tuple[QueueCommands, AttemptRecord, object]]:
    """Fan out `event_id` (project demo, BUILD_END) once, in this process, as an emission
    of its own: what each write of a record gave the writer (its commands, its record,
    its lead)."""
    writes: list[tuple[QueueCommands, AttemptRecord, object]] = []

    class Spy(Writer):
        def submit(self, *args: Any, **kwargs: Any) -> asyncio.Future[list[Any]]:
            queue, records, lead = (*args, (), None)[:3]  # the engine passes them in order
            writes.extend((queue, record, lead) for record in records)
            return super().submit(*args, **kwargs)

    engine = Engine(services, Spy(services.redis, services.history.assign_ids))
    try:
        emitted = EventJob(id=event_id, project_id="demo", event="BUILD_END", emitted_at=now_ms())
        await engine.fan_out(emitted)
    finally:
        await engine.close()
    return writes


async def test_only_a_delivery_that_ends_leads_its_write_with_its_record(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """A delivery that ends with its attempt gives the writer its record as a lead (run
    with the batch's other records, first: what follows can be done again). One retried
    keeps its record in its own commands, right before its retry's job: a failover that
    keeps only a pipeline's start cannot leave it marked as attempted with no retry. One
    answered `410 Gone` has its record before its callback's disable: that failover cannot
    leave the callback disabled, so out of the chunk's re-run, with no record."""
    ok, busy = receiver.url("/ok"), receiver.script("/busy", answer(503))
    gone = receiver.script("/gone", answer(410))
    for url in (ok, busy, gone):
        await register(redis, url)
    writes = await writes_of(Services(settings, redis), "evt_lead")
    submitted = {record["callBackUrl"]: (queue, lead) for queue, record, lead in writes}
    assert submitted[ok][1] is not None and submitted[busy][1] is None
    pipe = redis.pipeline(transaction=False)
    submitted[busy][0](pipe)
    queued = [args for args, _ in pipe.command_stack]
    assert queued[0][0] == "EVALSHA" and len(queued) > 1  # the record, then the retry's job
    record_sha = queued[0][1]
    pipe = redis.pipeline(transaction=False)
    submitted[gone][0](pipe)
    queued = [args for args, _ in pipe.command_stack]
    assert submitted[gone][1] is None and len(queued) >= 2
    assert queued[0][1] == record_sha  # the record first, then the disable
    assert SetEnabled._lua.sha in [args[1] for args in queued[1:]]
    assert await redis.zcard(settings.queue_name) == 1  # the retry is queued
    assert [r.status.value for r in await records(redis, settings, busy)] == ["FAILED"]


async def test_a_retry_queued_again_by_a_late_copy_of_its_write_sends_nothing(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The writer sends a batch again when its answer was lost. Sent again after the
    delivery it retried has ended (its worker paused past its lease, say), the write of a
    first attempt that failed does not queue its retry's job once more (review finding: it
    did, and attempt 2 was sent again). A new run's first attempt, an event id emitted
    again once its event ended, still queues its retry."""
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=503 if calls == 1 else 200)

    callback_id = await register(redis, receiver.script("/flaky", flaky))
    writes = await writes_of(Services(settings, redis), "evt_late")
    first = [queue for queue, record, _ in writes if record["attempt"] == 1]
    await run_worker()  # the retry: its attempt 2 succeeds, its job ends
    assert calls == 2 and await redis.zcard(settings.queue_name) == 0
    await run_pipeline(redis, first[0])  # the late copy: its record and mark, no job
    assert await redis.zcard(settings.queue_name) == 0
    await run_worker()
    assert calls == 2
    calls = 0  # the same event id, emitted again: a new run, its retry queued
    writes = await writes_of(Services(settings, redis), "evt_late")
    assert calls == 1 and await redis.zcard(settings.queue_name) == 1
    await run_worker()
    assert calls == 2 and len(writes) == 1
    marks = sorted(await redis.keys(keys.delivery(f"demo:evt_late.{callback_id}@*")))
    # one per emission, each its first attempt's (a job that ends in its record's script
    # leaves no mark: nothing can run it again)
    assert [await redis.get(mark) for mark in marks] == [b"1", b"1"]


async def test_a_deferred_first_attempts_write_sent_again_late_queues_nothing(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A first attempt put off (its host's share full, its breaker open) queues its
    delivery's job through the same step as a retry (`Engine._defer`), marked "0". That
    write, sent again after the job ran and ended, queues it no more: the delivery is sent
    once. A mark already there stays: a later attempt's count, and the "done" of a worker
    that ended the delivery while paused past its lease (the job then ends it with no
    attempt: review finding)."""
    callback_id = await register(redis, receiver.url("/put-off"))
    services = Services(settings, redis)
    event = EventJob(id="evt_defer", project_id="demo", event="BUILD_END", emitted_at=now_ms())
    job = DeliveryJob.first(event, callback_id, encode_body(event.event, "demo", event.data))
    step = FirstRetry(services.queue, job)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    progress = keys.delivery(job.progress_id)
    try:
        await engine._defer(job, step, 0.01, "test")
        assert await redis.get(progress) == b"0"
        await run_worker()
        assert len(receiver.requests("/put-off")) == 1
        await engine._defer(job, step, 0.01, "test")  # the same write: its step, its token
        assert await redis.zcard(settings.queue_name) == 0
        await redis.set(progress, "2")
        await engine._defer(job, FirstRetry(services.queue, job), 0.01, "test")
        assert await redis.get(progress) == b"2"  # a later attempt's count stays
        await redis.set(progress, "done")  # ended by a worker paused past its lease
        await engine._defer(job, FirstRetry(services.queue, job), 0.01, "test")
        await run_worker()
        assert await redis.get(progress) == b"done"
        assert len(receiver.requests("/put-off")) == 1 and not await redis.zcard(
            settings.queue_name
        )
    finally:
        await engine.close()


async def test_huge_response_body_is_truncated_in_history(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(2000):  # 128 MiB unless the client hangs up first
                await response.write(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    url = receiver.script("/hook", huge)
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()
    [rec] = await records(redis, settings, url)
    assert rec.status.value == "SUCCESS"
    assert rec.response_body is not None
    assert rec.response_body.startswith("x" * 1000)
    assert len(rec.response_body) < settings.max_response_body + 100
    assert "truncated" in rec.response_body


async def test_410_gone_disables_the_callback(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    callback_id = await register(redis, receiver.script("/hook", answer(410)))
    await emit(settings, redis)
    await run_worker()
    callback = await Registry(redis).get(callback_id)
    assert not callback.enabled and "410" in (callback.disabled_reason or "")


async def test_one_canonical_log_line_per_attempt(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(500), answer(200)) + "?token=query-s3cret&v=2"
    await register(redis, url)
    event_id = await emit(settings, redis)
    with capture_logs() as logs:
        await run_worker()
    attempts = [entry for entry in logs if entry["event"] == "delivery.attempt"]
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in attempts] == [
        (1, "retry", 500),
        (2, "success", 200),
    ]
    for entry in attempts:
        assert entry["event_id"] == event_id
        # a token in the query string is logged no more than it is traced
        assert entry["callback_url"] == receiver.url("/hook?token=REDACTED&v=REDACTED")
        assert entry["delivery_id"].startswith(f"demo:{event_id}.")
        assert isinstance(entry["duration_ms"], int)
        assert "s3cret" not in repr(entry)


async def test_emit_many_queues_in_one_go(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    await register(redis, receiver.url())
    ids = await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"n": i}) for i in range(20)]
    )
    assert len(set(ids)) == 20
    await run_worker()
    assert sorted(orjson.loads(s.body)["data"]["n"] for s in receiver.requests()) == list(range(20))


async def test_attempts_are_counted_for_status(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    url = receiver.script("/hook", answer(500), answer(200))
    await register(redis, url)
    await emit(settings, redis)
    await run_worker()  # a stopping worker flushes what it counted
    status = await Services(settings, redis).status()
    assert status.last_hour == {"retry": 1, "success": 1}
    assert status.queue_due == 0 and status.workers == []
