"""A run ends only the job it claimed (`dispatcher.ending`), on a real Redis with real
claims, a real receiver and real burst workers: a worker paused past its lease, or a write
of its sent again late, ends no job its lease does not hold now. A fan-out job's id is
`{project}:{event id}`, and an event id emitted again once its event ended names a new job,
which no lease holds while it is queued: the late end used to delete it (review)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from dispatcher.clock import now_ms
from dispatcher.ending import END_JOB, END_JOBS, ENDS, Ending, JobEnd
from dispatcher.history.postgres import PostgresHistory
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.history.stream import StreamRecord, streamed
from dispatcher.jobs import EventJob, decode
from dispatcher.keys import Keys
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import Engine
from dispatcher.worker.claims import Claimed, Claims
from dispatcher.worker.fence import Fence, running
from dispatcher.worker.lane_release import Release
from dispatcher.worker.steps import ChunkEnd
from dispatcher.worker.writer import Writer
from tests.helpers import Overlap, Receiver, RunWorker, all_records

keys = Keys()  # today's key names (one shard)
JOB_ID = "demo:e1"  # the fan-out job of event e1, emitted twice
LATE_ENDS = ["finish", "redis record", "postgres record", "lane release"]


async def register(redis: Redis, url: str) -> int:
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "t")
    return callback_id


def attempt_record() -> AttemptRecord:
    now = now_ms()
    return {"projectId": "demo", "callBackUrl": "http://127.0.0.1:1/h", "events": "BUILD_END",
            "status": "SUCCESS", "startTime": now, "endTime": now, "createdTime": now}  # fmt: skip


async def late_end(how: str, redis: Redis, settings: Settings, w: Claims, progress: str) -> Any:
    """Worker w's end of the job it claimed, sent late: the job loop's own end (`Finish`),
    an attempt's record that ends it (either store's script), or a lane's release that ends
    its fan-out (its only first attempt's)."""
    if how == "finish":
        return await run_pipeline(redis, lambda pipe: w.finish(pipe, JOB_ID))
    if how == "lane release":
        stamp = now_ms()
        return await Release.of(
            keys, keys.lane("demo:late"), "demo", progress, token=w.token, lease_ms=10_000,
            now_ms=stamp, recheck_ms=stamp + 1000, progress_ttl=60, end=w.job_end(JOB_ID),
        ).run(redis)  # fmt: skip
    store = RedisHistory if how == "redis record" else PostgresHistory
    history, record = store(redis, settings, keys), attempt_record()
    await history.assign_ids([record])
    ending = Ending(keys.delivery(progress), "done", 60, w.job_end(JOB_ID))
    return await run_pipeline(redis, lambda pipe: history.record(pipe, record, ending=ending))


@pytest.mark.parametrize("how", LATE_ENDS)
async def test_a_late_end_leaves_the_new_job_of_its_event_id_emitted_again(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, how: str
) -> None:
    """Worker w claims event e1 and is paused past its lease; another worker takes the job,
    delivers it and ends it; the producer emits e1 again (a new emission, queued); then w's
    end goes out. The new job is left (no lease holds it: it used to be deleted, an
    accepted event lost with no record, drop or poison entry) and is delivered; w's end
    writes its delivery's mark, as when another worker holds the job."""
    await register(redis, receiver.url())
    producer = Producer(settings, redis)
    assert await producer.emit("demo", "BUILD_END", {"n": 1}, event_id="e1") == "e1"
    w = Claims(redis, keys, "worker-w", lease_s=0.2)
    [claimed] = await w.claim(10)
    progress = f"{JOB_ID}.1@{EventJob.from_wire(decode(claimed.data or b'').payload).emitted_at}"
    await asyncio.sleep(0.3)  # w paused: its lease lapses
    await run_worker()
    assert len(receiver.requests()) == 1 and not await redis.exists(keys.arq_job(JOB_ID))
    assert await producer.emit("demo", "BUILD_END", {"n": 1}, event_id="e1") == "e1"
    queued = await redis.get(keys.arq_job(JOB_ID))

    answer = await late_end(how, redis, settings, w, progress)
    assert answer == ([0] if how == "finish" else [1] if how.endswith("record") else 0)
    assert await redis.get(keys.arq_job(JOB_ID)) == queued  # left as queued
    assert await redis.zscore(settings.queue_name, JOB_ID) is not None
    if how.endswith("record"):
        assert await redis.get(keys.delivery(progress)) == b"done"

    await run_worker()
    assert len(receiver.requests()) == 2  # the second emission delivered
    assert [r.status.value for r in await all_records(redis, settings, receiver.url())] == [
        "SUCCESS",
        "SUCCESS",
    ]
    assert not await redis.exists(keys.DROPPED, keys.POISON_JOBS, keys.arq_job(JOB_ID))


async def run_as(job_id: str, run: Coroutine[Any, Any, None]) -> None:
    """`run` in a task that runs `job_id`, as the worker starts one (its fence's job)."""
    context = contextvars.copy_context()
    context.run(running.set, job_id)
    await asyncio.create_task(run, context=context)


async def run_chunk(services: Services, w: Claims, claimed: Claimed, event: EventJob) -> None:
    """Worker w's run of its claimed fan-out job, as the job loop runs it: the chunk's
    attempts, then the job's end (with the one attempt's record, or on its own)."""
    engine = Engine(services, Writer(services.redis, services.history.assign_ids))
    engine.fence = Fence(w, w.lease_ms / 1000, held=lambda: [claimed.job_id])
    end = ChunkEnd(w, claimed, event)

    async def run() -> None:
        after = await engine.fan_out(event, rerun=end.rerun, end=end)
        if not end.written:
            await engine.writer.commit(lambda pipe: end(pipe, after))

    try:
        await run_as(claimed.job_id, run())
    finally:
        await engine.close()


@pytest.mark.parametrize("callbacks", [1, 2])
async def test_an_end_after_its_lease_lapsed_leaves_the_job_to_a_claim_that_sends_nothing(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, callbacks: int
) -> None:
    """Worker w's attempts outlast its lease (nothing renews it: as a worker paused past
    it), and no other worker took the job meanwhile. Its end (in its one attempt's record,
    or on its own after the chunk's two) leaves the job, each delivery marked done; the
    next worker claims it, finds every delivery done and ends it without sending again."""
    slow = Overlap(1.5).handle  # answers after w's lease (1 s)
    urls = [receiver.script(f"/slow-{n}", slow) for n in range(callbacks)]
    ids = [await register(redis, url) for url in urls]
    assert await Producer(settings, redis).emit("demo", "BUILD_END", event_id="e1") == "e1"
    services = Services(settings, redis)
    w = Claims(redis, keys, "worker-w", lease_s=1)
    [claimed] = await w.claim(10)
    wire = decode(claimed.data or b"")
    event = EventJob.from_wire(wire.payload, wire.enqueued_ms)

    await run_chunk(services, w, claimed, event)
    assert len(receiver.seen) == callbacks
    assert await redis.zscore(settings.queue_name, JOB_ID) is not None  # left: lapsed
    marks = [keys.delivery(f"{JOB_ID}.{i}@{event.emitted_at}") for i in ids]
    assert await redis.mget(marks) == [b"done"] * callbacks

    await run_worker()
    assert len(receiver.seen) == callbacks  # nothing sent again
    assert not await redis.exists(keys.arq_job(JOB_ID), keys.DROPPED)
    assert await redis.zcard(settings.queue_name) == 0
    for url in urls:
        assert len(await all_records(redis, settings, url)) == 1


async def test_a_late_put_back_leaves_the_new_job_of_its_event_id_due(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Worker w claims event e1 and is paused past its lease; another worker delivers and
    ends it; the producer emits e1 again; then w's run fails and puts its job back, due in
    a minute (`Served.put_back`). The new emission is left due as it was queued: counting
    the lapsed lease as w's used to set it a minute late (review)."""
    await register(redis, receiver.url())
    producer = Producer(settings, redis)
    assert await producer.emit("demo", "BUILD_END", {"n": 1}, event_id="e1") == "e1"
    w = Claims(redis, keys, "worker-w", lease_s=0.2)
    assert len(await w.claim(10)) == 1
    await asyncio.sleep(0.3)  # w paused: its lease lapses
    await run_worker()
    assert await producer.emit("demo", "BUILD_END", {"n": 1}, event_id="e1") == "e1"
    due = await redis.zscore(settings.queue_name, JOB_ID)

    answer = await run_pipeline(redis, lambda pipe: w.again(pipe, JOB_ID, 60, next_attempt=False))
    assert answer == [0]
    assert await redis.zscore(settings.queue_name, JOB_ID) == due  # still due now

    await run_worker()
    assert len(receiver.requests()) == 2  # the second emission delivered, not a minute on
    assert not await redis.exists(keys.arq_job(JOB_ID), keys.DROPPED)


def ends(queue: str, job_id: str, token: str, n: int) -> StreamRecord:
    """An attempt's record (the PostgreSQL store's script) whose job ends with it: call `n`
    marks its delivery's progress `p:{n}` when the job does not end."""
    record: AttemptRecord = {**attempt_record(), "id": n}
    job = JobEnd(queue, f"lease:{job_id}", f"job:{job_id}", f"claims:{job_id}", token, job_id)
    return streamed("s", record, False, Ending(f"p:{n}", "done", 60, job))


async def held(redis: Redis, job_id: str, token: str, queue: str = "q") -> None:
    await redis.set(f"lease:{job_id}", token)
    await redis.set(f"job:{job_id}", b"data")
    await redis.set(f"claims:{job_id}", 1)
    await redis.zadd(queue, {job_id: 1})


async def test_a_batchs_ends_land_once_all_ran_each_job_ended_once(redis: Redis) -> None:
    """Run together, the ends leave the queues once every call ran (`ENDS`, `END_JOBS`),
    as each would alone: a job whose lease is this run's ends, once (the same end again in
    the batch marks its progress, as after a `DEL`); a job another holds, or none, is left
    whole, its progress marked."""
    for job_id in ("a", "b", "c"):
        await held(redis, job_id, "mine")
    await held(redis, "d", "mine", queue="q2")  # another queue, in the same batch
    await held(redis, "theirs", "other")
    await redis.zadd("q", {"lapsed": 1})
    await redis.set("job:lapsed", b"data")
    named = ["a", "b", "a", "theirs", "lapsed", "d", "c"]
    calls = [
        ends("q2" if job_id == "d" else "q", job_id, "mine", n) for n, job_id in enumerate(named)
    ]
    (answers,) = await run_pipeline(redis, lambda pipe: StreamRecord.queue_together(pipe, calls))
    assert answers == [1] * 7
    assert [n for n in range(7) if await redis.get(f"p:{n}") == b"done"] == [2, 3, 4]
    assert await redis.zrange("q", 0, -1) == [b"lapsed", b"theirs"]
    assert await redis.zcard("q2") == 0
    for gone in ("a", "b", "c", "d"):
        assert await redis.exists(f"lease:{gone}", f"job:{gone}", f"claims:{gone}") == 0
    assert await redis.get("lease:theirs") == b"other"
    assert await redis.exists("job:theirs", "claims:theirs", "job:lapsed") == 3
    assert await redis.xlen("s") == 7


async def test_a_batch_ends_more_jobs_than_luas_unpack_takes_at_once(redis: Redis) -> None:
    """3,000 ends (9,000 keys) in one call: they go in slices (Lua's `unpack` stops at
    ~8,000 values; the writers' batches stay far under it, a script's caller need not)."""
    pipe = redis.pipeline(transaction=False)
    for n in range(3000):
        pipe.set(f"lease:{n}", "mine")
        pipe.set(f"job:{n}", b"d")
        pipe.set(f"claims:{n}", 1)
        pipe.zadd("q", {str(n): n})
    await pipe.execute()
    calls = [ends("q", str(n), "mine", n) for n in range(3000)]
    (answers,) = await run_pipeline(redis, lambda pipe: StreamRecord.queue_together(pipe, calls))
    assert answers == [1] * 3000
    assert await redis.zcard("q") == 0
    assert await redis.dbsize() == 1  # the stream


async def test_an_end_that_fails_leaves_no_queued_job_without_its_data(redis: Redis) -> None:
    """The ends of a batch leave their queues before their keys go: a `ZREM` refused (a
    queue key that is not a sorted set, which only a bug could give) stops the script with
    every job's data still there, and no job queued without it (the next claim would drop
    it as expired, delivered or not; review)."""
    await held(redis, "a", "mine", queue="q")
    await held(redis, "b", "mine", queue="q2")
    await redis.set("not-a-queue", "x")
    calls = [
        ends("q", "a", "mine", 0),
        ends("q2", "b", "mine", 1),
        ends("not-a-queue", "c", "mine", 2),
    ]
    await held(redis, "c", "mine", queue="q3")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await run_pipeline(redis, lambda pipe: StreamRecord.queue_together(pipe, calls))
    for queue in ("q", "q2", "q3"):
        for job_id in await redis.zrange(queue, 0, -1):
            assert await redis.exists(f"job:{job_id.decode()}") == 1, (queue, job_id)
    assert await redis.exists("job:a", "job:b", "job:c") == 3


@dataclass
class EndThenFail(Script):
    """A job's end, then a write that fails (`fail` a key that is not a number)."""

    LUA = END_JOB + "end_job()\nreturn redis.call('INCR', fail)"
    TOGETHER = True
    BEFORE, AFTER = ENDS, END_JOBS
    queue: Key
    lease: Key
    job: Key
    claims: Key
    fail: Key
    token: str
    job_id: str


@pytest.mark.parametrize("together", [False, True])
async def test_a_call_that_fails_after_its_end_ends_its_job_alone_or_together(
    redis: Redis, together: bool
) -> None:
    """What a call put off to its script's `AFTER` lands though it failed after, as what
    it wrote before failing stays: alone as run together (alone, the error skipped it)."""
    await held(redis, "a", "mine")
    await redis.set("f", "not a number")
    call = EndThenFail("q", "lease:a", "job:a", "claims:a", "f", "mine", "a")
    if together:
        (answers,) = await run_pipeline(
            redis, lambda pipe: EndThenFail.queue_together(pipe, [call])
        )
        assert isinstance(answers[0], ResponseError)
    else:
        with pytest.raises(ResponseError, match="not an integer"):
            await call.run(redis)
    assert await redis.zcard("q") == 0
    assert await redis.exists("lease:a", "job:a", "claims:a") == 0
