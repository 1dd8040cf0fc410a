"""The job lifecycle piece by piece, on a real Redis: batch claims and leases, the writer
that waits Redis out, timed-out runs, producers that ride out a restart."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ClusterDownError, ResponseError
from structlog.testing import capture_logs

from dispatcher.clock import now_ms
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.ending import Ending
from dispatcher.errors import Unavailable
from dispatcher.history.postgres import PostgresHistory
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.jobs import EventJob
from dispatcher.keys import Keys
from dispatcher.lua import load_all, run_pipeline
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.stopping import cancel_all
from dispatcher.worker import create_worker, idling
from dispatcher.worker import writer as writer_module
from dispatcher.worker.claims import Claims
from dispatcher.worker.duties import every
from dispatcher.worker.writer import Writer
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    answer,
    app_client,
    command,
    make_settings,
    until,
)

keys = Keys()  # today's key names (one shard)


async def scripts_run(redis: Redis) -> int:
    """EVALSHA calls so far (the commands a script runs count under their own names)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def enqueue(redis: Redis, settings: Settings, count: int, defer_s: float = 0) -> None:
    queue = Queue(redis, Keys(settings.queue_name))
    for i in range(count):
        await queue.enqueue(EventJob(f"evt_{defer_s}_{i}", "demo", "BUILD_END"), defer_s=defer_s)


async def test_a_batch_of_due_jobs_is_claimed_in_one_round_trip(
    settings: Settings, redis: Redis
) -> None:
    await enqueue(redis, settings, 30)
    await enqueue(redis, settings, 5, defer_s=60)  # not due
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)
    await claims.claim(1)  # the script is loaded; one job claimed
    before = await scripts_run(redis)
    claimed = await claims.claim(100)
    assert await scripts_run(redis) - before == 1  # one script, one round trip
    assert len(claimed) == 29 and all(c.claims == 1 and c.data for c in claimed)
    assert all(orjson.loads(c.data or b"")["f"] == "fan_out" for c in claimed)
    lease = await redis.get(keys.ARQ_IN_PROGRESS_PREFIX + claimed[0].job_id)
    assert lease == b"worker-a"
    assert 9000 < await redis.pttl(keys.ARQ_IN_PROGRESS_PREFIX + claimed[0].job_id) <= 10_000
    other = Claims(redis, Keys(settings.queue_name), "worker-b", lease_s=10)
    assert await other.claim(100) == []  # leased or not due
    assert await redis.zcard(settings.queue_name) == 35  # a claimed job stays queued


async def test_a_running_job_is_out_of_the_due_range_until_its_lease_lapses(
    settings: Settings, redis: Redis
) -> None:
    """A claimed job stays queued, scored by its lease's end (renewed with it), so the
    next claim reads only jobs it may take, not the fleet's running ones; a lapsed lease
    makes it due again."""
    await enqueue(redis, settings, 3)
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=0.3)
    [first] = await claims.claim(1)
    due = await redis.zcount(settings.queue_name, "-inf", now_ms())
    assert due == 2  # the running one is out of the due range
    assert await redis.zscore(settings.queue_name, first.job_id) > now_ms() + 200
    rest = await claims.claim(10)
    assert sorted(c.job_id for c in rest) == ["demo:evt_0_1", "demo:evt_0_2"]
    assert await claims.claim(10) == []
    await asyncio.sleep(0.2)
    ids = [first.job_id] + [c.job_id for c in rest]
    assert await claims.renew(ids) == (set(), set())  # all ours: scores move with the leases
    await asyncio.sleep(0.2)  # past the first lease's end, within the renewed one's
    assert await claims.claim(10) == []
    other = Claims(redis, Keys(settings.queue_name), "worker-b", lease_s=10)
    await asyncio.sleep(0.35)  # no renewal: worker-a's leases lapse
    again = await other.claim(10)
    assert sorted(c.job_id for c in again) == ["demo:evt_0_0", "demo:evt_0_1", "demo:evt_0_2"]
    assert all(c.claims == 2 for c in again)


async def test_a_claim_passes_over_the_jobs_its_worker_still_runs(
    settings: Settings, redis: Redis
) -> None:
    """A run that gave up its job's lease (its next chunk, its next attempt due now) has
    yet to end: its worker names it, and its claim leaves the job to the next claim after
    (or to another worker) without trying its lease; were it claimed again here, the old
    run's end could end the new run's lease (the same token)."""
    await enqueue(redis, settings, 3)
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)
    [first] = await claims.claim(1)
    await run(redis, lambda pipe: claims.again(pipe, first.job_id, 0, next_attempt=True))
    await asyncio.sleep(0.01)  # due
    claimed = await claims.claim(10, mine=[first.job_id])
    assert sorted(c.job_id for c in claimed) == ["demo:evt_0_1", "demo:evt_0_2"]
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + first.job_id)  # not tried
    [again] = await claims.claim(10)
    assert again.job_id == first.job_id


async def test_a_claim_finds_due_jobs_behind_more_running_ones_than_it_looks_at(
    settings: Settings, redis: Redis
) -> None:
    """A fleet may run more jobs than a claim looks at (its budget): the due jobs behind
    them are still found, the running ones are not in its way."""
    await enqueue(redis, settings, 130)
    busy = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)
    assert len(await busy.claim(120)) == 120  # more than a page (100) and the budget
    other = Claims(redis, Keys(settings.queue_name), "worker-b", lease_s=10)
    assert len(await other.claim(10, budget=10)) == 10


async def test_a_project_at_its_share_is_claimed_for_as_its_jobs_end_not_a_poll_later(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver
) -> None:
    """A project alone may hold half a worker's slots; its other due jobs wait in the
    queue. The claim loop comes back for them as soon as its jobs end, not a poll interval
    later: here the interval is a minute, and 30 deliveries take a few batches."""
    settings = make_settings(redis_server.url, worker_max_jobs=8)
    url = receiver.script("/hook", answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    producer = Producer(settings, redis)
    await producer.emit_many([("demo", "BUILD_END", {"n": i}) for i in range(30)])
    worker = create_worker(settings, poll_delay=60, handle_signals=False)
    main = asyncio.create_task(worker.main())
    try:
        await receiver.wait_for(30, within=20)
    finally:
        worker.stop()
        await main
        await worker.close()


async def claims_sent(redis: Redis) -> int:
    """The scripts Redis has run (a worker's claim is one), as of before this INFO."""
    return int((await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def test_an_idle_worker_asks_for_jobs_a_few_times_a_second(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle worker claimed every poll interval, ~45 claim scripts a second at its 20 ms
    (135 commands): a thousand idle workers kept one Redis busy for nothing. After a quiet
    spell (`QUIET_S`, a second here) it asks every 0.2 s (`idling.py`), and an event emitted
    then is still sent."""
    monkeypatch.setattr(idling, "QUIET_S", 1.0)  # (10 s in production)
    settings = make_settings(redis_server.url)
    url = receiver.script("/hook", answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    worker = create_worker(settings, poll_delay=0.02, handle_signals=False)
    main = asyncio.create_task(worker.main())
    try:
        await asyncio.sleep(1.5)  # past its quiet spell
        before = await claims_sent(redis)
        await asyncio.sleep(2)
        claims = await claims_sent(redis) - before
        await Producer(settings, redis).emit("demo", "BUILD_END", {}, event_id="after-quiet")
        await receiver.wait_for(1, within=10)
    finally:
        worker.stop()
        await main
        await worker.close()
    assert claims <= 20, f"{claims} scripts in 2 s of an idle worker (~10 expected, 90 before)"


async def test_a_lapsed_lease_passes_the_job_on_and_only_its_holder_ends_it(
    settings: Settings, redis: Redis
) -> None:
    await enqueue(redis, settings, 1)
    first = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=0.2)
    second = Claims(redis, Keys(settings.queue_name), "worker-b", lease_s=10)
    [job] = await first.claim(10)
    assert await first.renew([job.job_id]) == (set(), set())
    await asyncio.sleep(0.3)  # worker-a stopped renewing (killed, paused)
    [again] = await second.claim(10)
    assert (again.job_id, again.claims) == (job.job_id, 2)
    assert await first.renew([job.job_id]) == ({job.job_id}, set())  # worker-b's now
    assert await run(redis, lambda pipe: first.finish(pipe, job.job_id)) == [0]
    assert await redis.zcard(settings.queue_name) == 1  # left to worker-b
    assert await run(redis, lambda pipe: second.finish(pipe, job.job_id)) == [1]
    assert await redis.zcard(settings.queue_name) == 0
    assert not await redis.exists(keys.arq_job(job.job_id))
    assert await first.renew([job.job_id]) == (set(), {job.job_id})  # ended: no lease


async def test_a_failed_run_goes_back_but_never_earlier_than_its_next_attempt(
    settings: Settings, redis: Redis
) -> None:
    await enqueue(redis, settings, 1)
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)
    [job] = await claims.claim(10)
    # the attempt's own write set the next attempt in 30 s ...
    await run(redis, lambda pipe: claims.again(pipe, job.job_id, 30, next_attempt=True))
    # ... then the run failed late (a timeout): back in 1 s, unless due later already
    await run(redis, lambda pipe: claims.again(pipe, job.job_id, 1, next_attempt=False))
    due = await redis.zscore(settings.queue_name, job.job_id)
    assert due is not None and due > now_ms() + 25_000
    assert not await redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + job.job_id)
    assert not await redis.exists(keys.ARQ_RETRY_PREFIX + job.job_id)  # a new attempt


async def test_a_failed_run_is_due_at_once_though_its_lease_scored_it_later(
    settings: Settings, redis: Redis
) -> None:
    """A running job's score is its lease's end; its failed run's return (or a shutdown's
    release) makes it due when asked, and each claim is counted: a failed run, a lapsed
    lease (2, 3: a job that keeps failing gives up past MAX_CLAIMS); a next attempt starts
    again at 1."""
    await enqueue(redis, settings, 1)
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=0.2)
    retry_key = keys.ARQ_RETRY_PREFIX + "demo:evt_0_0"
    [job] = await claims.claim(10)
    assert job.claims == 1
    await run(redis, lambda pipe: claims.again(pipe, job.job_id, 0, next_attempt=False))
    [job] = await claims.claim(10)
    assert job.claims == 2
    await asyncio.sleep(0.3)  # its lease lapses
    [job] = await claims.claim(10)
    assert job.claims == 3 and await redis.get(retry_key) == b"3"
    await run(redis, lambda pipe: claims.again(pipe, job.job_id, 0, next_attempt=True))
    [job] = await claims.claim(10)
    assert job.claims == 1 and await redis.get(retry_key) == b"1"  # counted anew


async def run(redis: Redis, queue: Callable[[Pipeline], None]) -> list[Any]:
    return await run_pipeline(redis, queue)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A private server this test may stop and start on its port."""
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


def record(n: int) -> AttemptRecord:
    now = now_ms()
    return {"projectId": "demo", "callBackUrl": "http://127.0.0.1:1/h", "events": "BUILD_END",
            "status": "SUCCESS", "startTime": now, "endTime": now,
            "createdTime": now + n}  # fmt: skip


@pytest.mark.parametrize("store", [RedisHistory, PostgresHistory])
async def test_a_record_ends_its_job_in_its_own_script_unless_another_worker_holds_it(
    settings: Settings, redis: Redis, store: type[RedisHistory | PostgresHistory]
) -> None:
    """The record and its job's end are one command (a script): the job leaves the queue
    with no progress mark; a job another worker holds now is left to it, and the mark says
    the delivery is done (that worker ends the job without another attempt)."""
    await enqueue(redis, settings, 2)
    claims = Claims(redis, Keys(settings.queue_name), "worker-a", lease_s=10)
    mine, held = (job.job_id for job in await claims.claim(10))
    await redis.set(keys.ARQ_IN_PROGRESS_PREFIX + held, "worker-b")
    history = store(redis, settings, keys)
    records = [record(1), record(2)]
    await history.assign_ids(records)

    def write(pipe: Pipeline) -> None:
        for one, job_id in zip(records, (mine, held), strict=True):
            ending = Ending(keys.delivery(job_id), "done", 60, claims.job_end(job_id))
            history.record(pipe, one, ending=ending)

    assert len(await run(redis, write)) == 2  # one command a record, its job's end inside
    assert await redis.zrange(settings.queue_name, 0, -1) == [held.encode()]
    assert not await redis.exists(keys.arq_job(mine), keys.ARQ_IN_PROGRESS_PREFIX + mine)
    assert not await redis.exists(keys.delivery(mine))
    assert await redis.get(keys.delivery(held)) == b"done"
    assert await redis.get(keys.ARQ_IN_PROGRESS_PREFIX + held) == b"worker-b"


@pytest.mark.parametrize("store", [RedisHistory, PostgresHistory])
async def test_a_retrys_mark_never_reopens_a_delivery_that_ended(
    settings: Settings, redis: Redis, store: type[RedisHistory | PostgresHistory]
) -> None:
    """A worker paused past its lease ends the delivery ("done": another worker holds the
    job now); that worker's attempt fails and would mark "2", and its job's next attempt
    would send again what is on record as a success: "done" stays (review finding), a
    first attempt's "1" too (marks are one emission's: an event id emitted again once its
    event ended has its own)."""
    history, progress = store(redis, settings, keys), keys.delivery("demo:evt_m.1@7")

    async def marked(mark: str) -> bytes | None:
        one = record(1)
        await history.assign_ids([one])
        ending = Ending(progress, mark, 60)
        await run(redis, lambda pipe: history.record(pipe, one, ending=ending))
        now: bytes | None = await redis.get(progress)
        return now

    assert await marked("1") == b"1"
    assert await marked("2") == b"2"
    assert await marked("done") == b"done"
    assert await marked("2") == b"done"
    assert await marked("1") == b"done"


async def test_writes_wait_out_a_redis_restart_and_land_once(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(own_redis.url, redis_timeout=0.5)
    redis = connect(settings)
    history = RedisHistory(redis, settings, keys)
    writer = Writer(redis, history.assign_ids)
    try:
        records = [record(n) for n in range(20)]
        await writer.commit(lambda pipe: history.record(pipe, records[0]), records[:1])
        port = own_redis.port
        own_redis.stop()
        waiting = [
            writer.submit(functools.partial(history.record, record=r), [r]) for r in records[1:]
        ]
        await asyncio.sleep(1.5)
        assert writer.pending == 19 and not any(w.done() for w in waiting)
        restarted = EmbeddedRedis(tmp_path / "redis", port=port, appendfsync="always")
        restarted.start()
        try:
            await asyncio.wait_for(asyncio.gather(*waiting), 20)
            assert writer.retries > 0 and writer.pending == 0
            ids = [r["id"] for r in records]
            assert len(set(ids)) == 20
            index = keys.history_index("demo", "BUILD_END", "http://127.0.0.1:1/h")
            assert await redis.zcount(index, "-inf", "(+inf") == 20  # records, not the mark
            for record_id in ids:  # every record is readable by its id
                assert (await history.get(int(str(record_id)))).id == record_id
        finally:
            restarted.stop()
    finally:
        await writer.close()
        await redis.aclose()


async def test_a_record_written_twice_is_stored_once(settings: Settings, redis: Redis) -> None:
    history = RedisHistory(redis, settings, keys)
    one = record(1)
    await history.assign_ids([one])
    for _ in range(2):  # as when a pipeline's answer was lost and it was sent again
        await run(redis, lambda pipe: history.record(pipe, one, dead=True))
    index = keys.history_index("demo", "BUILD_END", "http://127.0.0.1:1/h")
    assert await redis.zcount(index, "-inf", "(+inf") == 1  # the record (and the mark)
    assert await redis.zcard(keys.HISTORY_DEAD) == 1


@pytest.mark.parametrize("store", [RedisHistory, PostgresHistory])
async def test_a_batchs_records_are_one_script_call_and_a_bad_one_fails_alone(
    settings: Settings, redis: Redis, store: type[RedisHistory | PostgresHistory]
) -> None:
    """The writer runs the records of a batch together: one EVALSHA for 60 records (two
    calls: at most `TOGETHER_MAX` a call), each write's own commands after its record. A
    record Redis refuses (its index key holds a string, here) is that write's error; the
    records around it land."""
    history = store(redis, settings, keys)
    writer = Writer(redis, history.assign_ids, window=0.05)
    records = [record(n) for n in range(60)]
    records[7]["callBackUrl"] = "http://127.0.0.1:1/refused"
    records[7]["events"] = "BUILD_START"
    # a record for the URL of record 7 in the PostgreSQL store's stream: refused the same way
    refused = (
        keys.history_index("demo", "BUILD_START", "http://127.0.0.1:1/refused")
        if store is RedisHistory
        else keys.HISTORY_STREAM
    )
    if store is PostgresHistory:  # the stream is the one key its records share: first
        others = records[:7] + records[8:]  # the others land together, then it is refused
        await history.assign_ids(others)
        await load_all(redis)
        await redis.config_resetstat()
        together = [(command("PING"), [r], functools.partial(history.recording, r)) for r in others]
        landed = await asyncio.gather(*(writer.submit(*write) for write in together))
        assert landed == [[1, True]] * 59 and await redis.xlen(refused) == 59
        assert (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] == 2
        await redis.delete(refused)
        records = [records[7]]
    await redis.set(refused, "in the way")
    await history.assign_ids(records)
    await load_all(redis)
    await redis.config_resetstat()
    try:
        writes = [
            writer.submit(
                command("SET", f"after:{n}", n),
                [r],
                functools.partial(history.recording, r),
            )
            for n, r in enumerate(records)
        ]
        answers = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
    finally:
        await writer.close()
    bad = answers.pop(7 if store is RedisHistory else 0)
    assert isinstance(bad, Exception) and "WRONGTYPE" in str(bad)
    assert answers == [[1, True]] * len(answers)  # the record's answer, then the write's
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == (2 if store is RedisHistory else 1)
    assert await redis.exists(*(f"after:{n}" for n in range(len(records)))) == len(records)
    if store is RedisHistory:
        index = keys.history_index("demo", "BUILD_END", "http://127.0.0.1:1/h")
        assert await redis.zcount(index, "-inf", "(+inf") == 59


async def test_a_timed_out_run_is_run_again_never_dropped(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The job timeout cuts a run (here a hanging receiver, slower than the job may take):
    the job goes back to the queue and the same delivery is tried again."""
    settings = make_settings(redis_server.url, job_timeout=0.3, total_timeout=2)

    async def hang_once(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    url = receiver.script("/hook", hang_once, answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    event_id = await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)
    seen = receiver.requests()
    assert len(seen) == 2 and len({s.headers["webhook-id"] for s in seen}) == 1
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        "demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 1000
    )
    assert [(r.event_id, r.status.value) for r in page.records] == [(event_id, "SUCCESS")]


async def test_a_producer_rides_out_a_redis_restart(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(own_redis.url, emit_wait=10, redis_timeout=0.5)
    async with Producer(settings) as producer:
        port = own_redis.port
        own_redis.stop()
        emitting = asyncio.create_task(
            producer.emit("demo", "BUILD_END", {}, event_id="evt_patient")
        )
        await asyncio.sleep(1.0)
        assert not emitting.done()
        restarted = EmbeddedRedis(tmp_path / "redis", port=port, appendfsync="always")
        restarted.start()
        try:
            assert await asyncio.wait_for(emitting, 15) == "evt_patient"
            assert await producer.queue.redis.exists(keys.arq_job("demo:evt_patient"))
        finally:
            restarted.stop()


async def test_a_producer_says_redis_is_unreachable_after_its_wait() -> None:
    settings = make_settings("redis://127.0.0.1:1/0", emit_wait=0.5)
    async with Producer(settings) as producer:
        with pytest.raises(Unavailable, match=r"Redis is unreachable .* same event ids is safe"):
            await producer.emit("demo", "BUILD_END", {}, event_id="evt_x")


# Another client's script that spins for ARGV[1] ms (Redis' clock)
SPIN = """
local t = redis.call('TIME')
local stop = t[1] * 1000 + t[2] / 1000 + tonumber(ARGV[1])
repeat t = redis.call('TIME') until t[1] * 1000 + t[2] / 1000 >= stop
return 1
"""


@pytest.mark.parametrize("wait", [5.0, 0.3])
async def test_an_emit_waits_out_a_busy_redis_and_never_answers_500(
    own_redis: EmbeddedRedis, wait: float
) -> None:
    """Another client's script past `lua-time-limit` (100 ms here) makes Redis answer BUSY
    to every other command until it ends (killed here): emits answered 500, reads too (review).
    Emits made meanwhile wait it out, as they wait out an outage: queued when
    DISPATCHER_EMIT_WAIT outlasts the script, else 503 / `Unavailable` saying that emitting
    again is safe; a read answers 503."""
    settings = make_settings(own_redis.url, emit_wait=wait)
    redis, spinner, probe = connect(settings), Redis.from_url(own_redis.url), connect(settings)

    async def busy() -> bool:
        try:
            await probe.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    try:
        await redis.config_set("lua-time-limit", 100)
        async with app_client(settings, redis) as api:
            # the script spins until killed (20 s at most): the read is answered while Redis
            # is busy however slow the machine (a 2 s script once ended before it was sent)
            spinning = asyncio.create_task(spinner.eval(SPIN, 0, 20_000))
            await until(busy, 5, "Redis answers BUSY")
            emits = [
                asyncio.ensure_future(call)
                for call in (
                    api.post("/apigw/v4/projects/demo/events", json={"event": "BUILD_END",
                             "eventId": "e-1"}, headers=UID),
                    Producer(settings, redis).emit("demo", "BUILD_END", {}, event_id="e-2"),
                    api.get("/apigw/v4/projects/demo/callbacks", headers=UID),
                )
            ]  # fmt: skip
            read = (await asyncio.gather(emits[2], return_exceptions=True))[0]
            if wait < 2:  # the emits give up within their wait, while the script still runs
                await asyncio.wait(emits[:2])
            await probe.script_kill()
            await asyncio.gather(spinning, return_exceptions=True)  # "Script killed by user"
            http, python = await asyncio.gather(*emits[:2], return_exceptions=True)
        queued = await redis.exists(keys.arq_job("demo:e-1"), keys.arq_job("demo:e-2"))
    finally:
        await asyncio.gather(redis.aclose(), spinner.aclose(), probe.aclose())
    assert isinstance(read, httpx.Response) and read.status_code == 503, read
    assert isinstance(http, httpx.Response)
    if wait > 2:
        assert http.status_code == 200, http.text
        assert (python, queued) == ("e-2", 2)
    else:
        assert http.status_code == 503, http.text
        assert http.json()["data"] is None
        assert http.json()["message"].endswith("Emitting again with the same event ids is safe.")
        # the reply it waited out, or its own bound if no reply came within it (on a
        # loaded machine, once): an outage either way, safe to emit again
        assert isinstance(python, Unavailable), python
        assert python.message.endswith("Emitting again with the same event ids is safe.")


async def test_a_write_that_cannot_be_built_fails_alone(settings: Settings, redis: Redis) -> None:
    """A bug in one write's code is that write's error; the writes around it still land
    and the writer goes on (it once stopped, and a burst worker never ended)."""
    writer = Writer(redis, RedisHistory(redis, settings, keys).assign_ids)

    def broken(pipe: Pipeline) -> None:
        raise KeyError("a field the write expected")

    try:
        first = writer.submit(command("SET", "before", 1))
        bad = writer.submit(broken)
        last = writer.submit(command("SET", "after", 1))
        assert list(await asyncio.wait_for(asyncio.gather(first, last), 10)) == [[True], [True]]
        with pytest.raises(KeyError):
            await bad
        assert await redis.exists("before", "after") == 2 and writer.pending == 0
        assert await writer.commit(command("GET", "after")) == [b"1"]
    finally:
        await writer.close()


async def test_a_lone_write_that_cannot_be_built_leaves_its_shard_claiming(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write whose code fails, alone in its batch, is weeded out: nothing is in flight
    then, and the writer is not stalled. Its batch's start stayed as the time a batch had
    been in flight since, so a second later the shard counted as stuck for good, its
    claims held back, and nothing ever wrote to clear it (review)."""
    monkeypatch.setattr(writer_module, "STUCK_S", 0.05)
    writer = Writer(redis, RedisHistory(redis, settings, keys).assign_ids)

    def broken(pipe: Pipeline) -> None:
        raise KeyError("a field the write expected")

    try:
        with pytest.raises(KeyError):
            await asyncio.wait_for(writer.submit(broken), 10)
        await asyncio.sleep(0.2)
        assert (writer.pending, writer.stuck(), writer.stalled) == (0, False, False)
    finally:
        await writer.close()


async def test_the_pending_writes_gauge_adds_up_every_shards_writer(
    settings: Settings, redis: Redis
) -> None:
    """A worker has a writer per shard it serves: the gauge is their sum. Each set it to
    its own count, so the last to write won: a frozen shard's backlog read 0 beside a
    quiet shard's writer (review). Here one writer's Redis refuses (nothing there), the
    other's takes its writes."""
    away = connect(make_settings("redis://127.0.0.1:1/0", redis_timeout=0.2))
    frozen = Writer(away, RedisHistory(away, settings, keys).assign_ids, backoff_cap=0.05)
    quiet = Writer(redis, RedisHistory(redis, settings, keys).assign_ids)
    try:
        held = [frozen.submit(command("SET", f"held-{n}", 1)) for n in range(3)]
        await asyncio.wait_for(quiet.submit(command("SET", "landed", 1)), 10)
        assert (frozen.pending, quiet.pending) == (3, 0)
        assert REGISTRY.get_sample_value("dispatcher_pending_writes") == 3
        for write in held:
            write.cancel()  # cancelling a caller withdraws no write: still counted
        assert REGISTRY.get_sample_value("dispatcher_pending_writes") == 3
    finally:
        await quiet.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(frozen.close(), 2)
        await away.aclose()


@pytest.mark.parametrize(
    ("failure", "traced"),
    [(ClusterDownError("The cluster is down"), False),  # type: ignore[no-untyped-call]
     (ResponseError("BUSY a script"), False),
     (ResponseError("ERR a bug"), True), (ValueError("a bug"), True)],
)  # fmt: skip
async def test_a_background_step_logs_a_not_now_reply_in_a_line_and_a_bug_with_its_trace(
    failure: Exception, traced: bool
) -> None:
    """A worker's background steps (heartbeat, health check, sweeps) go on after any
    failure; a reply that means "not now" (a cluster down whole answers CLUSTERDOWN) is
    an outage, logged in a line: it was logged with a traceback every turn (review)."""
    turns = 0

    async def health_check() -> None:
        nonlocal turns
        turns += 1
        raise failure

    with capture_logs() as logs:
        task = asyncio.create_task(every(0.001, health_check))
        await until(lambda: _turned(turns), 5, "two turns")
        await cancel_all([task])
    said = [entry for entry in logs if entry["event"] == "worker.background_failed"]
    assert said and all(entry.get("exc_info", False) is traced for entry in said), said
    assert all(entry["log_level"] == ("error" if traced else "debug") for entry in said)


async def _turned(turns: int) -> bool:
    return turns >= 2
