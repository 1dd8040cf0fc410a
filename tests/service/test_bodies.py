"""An event's body kept once for its retries (`dispatcher.bodies`): real Redis, real burst
workers, a real receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from redis.asyncio import Redis

from dispatcher import bodies
from dispatcher.bodies import body_key
from dispatcher.clock import now_ms
from dispatcher.delivery import encode_body
from dispatcher.errors import InvalidInput
from dispatcher.history.redis import RedisHistory
from dispatcher.jobs import DeliveryJob, EventJob, decode
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Options, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.stats import AttemptStats
from dispatcher.worker import Engine
from dispatcher.worker.duties import Counts, Duties
from dispatcher.worker.lane_scripts import Enter, Head
from dispatcher.worker.served import Served
from dispatcher.worker.writer import Then
from tests.helpers import Receiver, RunWorker, answer, make_settings

keys = Keys()
BIG = {"log": "x" * 8_000}  # an event body well over SHARED_MIN_BYTES


async def fail_once(redis: Redis, receiver: Receiver, paths: list[str], project: str) -> None:
    """Callbacks of `project` at `paths`, each failing its first request, then answering."""
    for path in paths:
        url = receiver.script(path, answer(500), answer(200))
        await Registry(redis).create(project, url, Event.BUILD_END, Region.DEVNET, "s3cret")


async def park_retries(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, paths: list[str]
) -> tuple[Settings, str]:
    """Callbacks of "demo" at `paths` failing once, a big event to them, and the fan-out
    run alone: every first attempt failed, every retry waits (0.3 s). Returns the settings
    of those retries and the event's id."""
    await fail_once(redis, receiver, paths, "demo")
    slow = make_settings(settings.redis_url or "", retry_schedule=(0.3,))
    event_id = await Producer(slow, redis).emit("demo", "BUILD_END", BIG)
    await run_worker(slow, max_burst_jobs=1)
    return slow, event_id


async def retry_jobs(redis: Redis, settings: Settings) -> dict[str, bytes]:
    """The queued jobs' bytes by id."""
    ids = [i.decode() for i in await redis.zrange(settings.queue_name, 0, -1)]
    datas = await redis.mget([keys.arq_job(i) for i in ids])
    return {i: d for i, d in zip(ids, datas, strict=True) if d is not None}


async def body_keys(redis: Redis) -> list[str]:
    return sorted(key.decode() for key in await redis.keys(keys.BODY_PREFIX + "*"))


async def test_an_events_retries_share_one_copy_of_its_body(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Twenty failing callbacks of an 8 KB event park one copy of the body, not twenty;
    each retry sends the body byte for byte, and the last one out deletes it."""
    paths = [f"/cb{n}" for n in range(20)]
    slow, _ = await park_retries(settings, redis, receiver, run_worker, paths)

    jobs = await retry_jobs(redis, slow)
    assert len(jobs) == 20
    for data in jobs.values():
        payload = decode(data).payload
        assert "body" not in payload and payload["bodyOf"].startswith("demo:evt_")
        assert len(data) < 1_000
    [kept] = await body_keys(redis)
    stored = await redis.hgetall(kept)  # type: ignore[misc]  # sync|async
    assert sorted(k.decode() for k in stored if k != b"body") == sorted(jobs)
    assert stored[b"body"] == encode_body("BUILD_END", "demo", BIG)
    assert await redis.pttl(kept) >= max([await redis.pttl(keys.arq_job(i)) for i in jobs])

    await run_worker(slow)
    for path in paths:
        first, second = receiver.requests(path)
        assert second.body == first.body == stored[b"body"]
    assert await body_keys(redis) == []  # the last retry out deleted it
    assert await redis.zcard(slow.queue_name) == 0


async def test_a_small_body_or_sharing_turned_off_keeps_the_body_in_each_retry(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Under 1 KiB a reference costs about what the body does; with DISPATCHER_SHARED_BODIES
    off (a fleet still running workers that predate it) no retry refers to a kept body."""
    await fail_once(redis, receiver, ["/a", "/b"], "demo")
    for data, shared in (({"buildId": "b-1"}, True), (BIG, False)):
        slow = make_settings(settings.redis_url or "", retry_schedule=(0.3,), shared_bodies=shared)
        await Producer(slow, redis).emit("demo", "BUILD_END", data)
        await run_worker(slow, max_burst_jobs=1)
        jobs = await retry_jobs(redis, slow)
        assert len(jobs) == 2
        for raw in jobs.values():
            payload = decode(raw).payload
            assert "bodyOf" not in payload
            assert orjson.loads(payload["body"])["data"] == data
        assert await body_keys(redis) == []
        await run_worker(slow)
        assert await redis.zcard(slow.queue_name) == 0
        for path in ("/a", "/b"):
            receiver.scripts[path] = [answer(500), answer(200)]
    assert len(receiver.requests("/a")) == 4


async def test_a_retry_whose_kept_body_is_gone_is_dropped_on_record(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Gone (a Redis that lost it), the body is not sent as nothing: each retry that
    referred to it ends as a recorded drop naming its delivery, which is marked done;
    another event's retries, whose body is there, still go."""
    slow, lost = await park_retries(settings, redis, receiver, run_worker, ["/a", "/b"])
    [kept] = await body_keys(redis)
    await redis.delete(kept)
    for path in ("/a", "/b"):
        receiver.scripts[path] = [answer(500), answer(200)]
    await Producer(slow, redis).emit("demo", "BUILD_END", {**BIG, "n": 2})
    await run_worker(slow)
    sent = [
        orjson.loads(s.body)["data"].get("n") for p in ("/a", "/b") for s in receiver.requests(p)
    ]
    assert sorted(sent, key=str) == [2, 2, 2, 2, None, None]  # the lost body's: no retry
    drops = [orjson.loads(e) for e in await redis.lrange(keys.DROPPED, 0, -1)]  # type: ignore[misc]
    assert sorted(d["deliveryId"].rpartition(".")[0] for d in drops) == [f"demo:{lost}"] * 2
    assert {d["reason"] for d in drops} == {bodies.GONE}
    marks = await redis.keys(keys.DELIVERY_PREFIX + f"demo:{lost}.*")
    assert len(marks) == 2 and set(await redis.mget(marks)) == {b"done"}
    assert await redis.zcard(slow.queue_name) == 0
    assert await body_keys(redis) == []


async def test_two_projects_events_of_one_id_and_time_keep_their_own_bodies(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A project names its own event ids: another project's event of the same id, emitted
    the same millisecond, keeps a body of its own, and each retry sends its own event."""
    emitted = now_ms()
    queue = Queue(redis, keys)
    for project in ("alpha", "beta"):
        await fail_once(redis, receiver, [f"/{project}", f"/{project}-2"], project)
        data = {"owner": project, **BIG}
        event = EventJob(
            id="evt_same", project_id=project, event="BUILD_END", data=data, emitted_at=emitted
        )
        assert await queue.enqueue(event)
    slow = make_settings(settings.redis_url or "", retry_schedule=(0.3,))
    await run_worker(slow, max_burst_jobs=2)
    assert len(await body_keys(redis)) == 2
    await run_worker(slow)
    for project in ("alpha", "beta"):
        sent = [orjson.loads(s.body)["data"]["owner"] for s in receiver.requests(f"/{project}")]
        assert sent == [project, project]


async def test_a_kept_body_outlives_the_jobs_that_refer_to_it(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A run that reads the body keeps it at least its job's time to live plus the
    longest the run may put the job off by; the release after a run that put its job off
    for longer than that (a long line of a rate-limited callback) keeps it past the job."""
    slow, _ = await park_retries(settings, redis, receiver, run_worker, ["/a", "/b"])
    job_id = sorted(await retry_jobs(redis, slow))[0]
    [kept] = await body_keys(redis)
    job = DeliveryJob.from_wire(decode(await redis.get(keys.arq_job(job_id))).payload, job_id)
    assert body_key(keys, job) == kept
    await redis.pexpire(kept, 1_000)
    found = await bodies.read(redis, keys, job, 3_600_000)
    assert found is not None and found.body == encode_body("BUILD_END", "demo", BIG)
    assert await redis.pttl(kept) > await redis.pttl(keys.arq_job(job_id)) + 3_500_000
    five_days = 5 * 86_400_000
    await redis.pexpire(keys.arq_job(job_id), five_days)  # as a put-off's write sets it
    async with redis.pipeline(transaction=False) as pipe:
        bodies.release(pipe, keys, job, 60_000)
        assert await pipe.execute() == [0]  # its job is still queued: kept
    assert await redis.hexists(body_key(keys, job), job_id)  # type: ignore[misc]  # sync|async
    assert await redis.pttl(kept) > five_days + 50_000


async def park_in_lanes(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, paths: list[str]
) -> None:
    """Callbacks of "demo" at `paths` ordered by `buildId`, failing twice then answering;
    three big events of one build (steps 0 to 2), and their fan-outs run alone: each
    lane's head (step 0) failed, the others are parked."""
    for path in paths:
        url = receiver.script(path, answer(500), answer(500), answer(200))
        await Registry(redis).create(
            "demo", url, Event.BUILD_END, Region.DEVNET, "s3cret",
            options=Options(order_by="buildId"),
        )  # fmt: skip
    events = [("demo", "BUILD_END", {"buildId": "b-1", "step": s, **BIG}) for s in range(3)]
    await Producer(settings, redis).emit_many(events)
    await run_worker(max_burst_jobs=3)


async def test_an_ordered_events_parked_deliveries_share_one_copy_of_its_body(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A lane parks its deliveries out of the queue, with no time to live: each parked
    job held its event's whole body, callbacks x event size per event (a project's
    ordered callbacks behind a failing head). Now an event's parked deliveries and its
    heads' retries refer to one copy, kept apart for the lanes and for ever while parked;
    each delivery sends its own event whole, in order (the next one taken by a release,
    or claimed), and the last one out deletes each copy."""
    paths = ["/lane1", "/lane2"]
    await park_in_lanes(settings, redis, receiver, run_worker, paths)
    kept = await body_keys(redis)
    assert len(kept) == 3 and all(k.startswith(keys.BODY_PREFIX + ":lane:demo:") for k in kept)
    ttls = sorted([await redis.pttl(k) for k in kept])
    assert ttls[:2] == [-1, -1] and ttls[2] > 0  # the parked ones' for ever; the heads' retries
    for key in kept:
        stored = await redis.hgetall(key)  # type: ignore[misc]  # sync|async
        assert len(stored) == 3 and stored[b"body"].endswith(BIG["log"].encode() + b'"}}')
    jobs = await redis.mget([keys.arq_job(k.decode()) for k in await redis.hkeys(kept[0])  # type: ignore[misc]
                             if k != b"body"])  # fmt: skip
    assert all(j is not None and len(j) < 1_000 and b"bodyOf" in j for j in jobs)
    await run_worker()
    for path in paths:
        sent = [orjson.loads(s.body)["data"] for s in receiver.requests(path)]
        assert [d["step"] for d in sent] == [0, 0, 0, 1, 2]
        assert all(d["log"] == BIG["log"] for d in sent)
    assert await body_keys(redis) == []


@pytest.mark.parametrize(("step", "sent"), [(1, [0, 0, 0, 2]), (0, [0, 1, 1, 2])])
async def test_an_ordered_delivery_whose_kept_body_is_gone_is_dropped_and_its_lane_goes_on(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    step: int,
    sent: list[int],
) -> None:
    """A lane's delivery whose body is gone (a Redis that lost it) is never sent empty: it
    ends as a recorded drop naming it, and the lane goes on with the next: a parked one
    (step 1) that a release hands over, or a head's retry (step 0) claimed from the queue,
    whose drop ended its job without releasing its lane, which then stopped for good
    (review)."""
    await park_in_lanes(settings, redis, receiver, run_worker, ["/lane1", "/lane2"])
    for key in await body_keys(redis):
        if (await redis.hget(key, "body") or b"").find(f'"step":{step}'.encode()) >= 0:  # type: ignore[misc]
            await redis.delete(key)
    await run_worker()
    for path in ("/lane1", "/lane2"):
        assert [orjson.loads(s.body)["data"]["step"] for s in receiver.requests(path)] == sent
    drops = [orjson.loads(e) for e in await redis.lrange(keys.DROPPED, 0, -1)]  # type: ignore[misc]
    assert sorted(d["deliveryId"][-2:] for d in drops) == [".1", ".2"]
    assert {d["reason"] for d in drops} == {bodies.GONE}
    assert await body_keys(redis) == [] and not await redis.keys(keys.LANE_PREFIX + "*")


async def test_a_parked_deliverys_body_is_kept_for_ever_as_its_job(redis: Redis) -> None:
    """A lane parks a delivery with no time to live, so its body must have none either:
    kept first with one for a head's retry (the event's delivery in another lane), it
    would expire under a delivery parked for longer. `Enter` parks it for ever; so does
    `Head`, which parks a queued job again (a lower-numbered delivery joined its lane),
    the job too (a retry's, with a time to live: parked, it would expire); and a read or a
    release never gives such a body a time to live."""
    body = keys.BODY_PREFIX + ":lane:demo:evt_1@5"
    await redis.hset(body, mapping={"body": "x" * 2_000, "demo:evt_1.1@5": 1})  # type: ignore[misc]
    await redis.pexpire(body, 60_000)  # a head's retry's, in the lane of callback 1
    await redis.zadd(keys.lanes_pending("demo"), {"demo:evt_1": 1})
    for lane in ("lane-2", "lane-3"):  # callbacks 2 and 3's lanes: an earlier head each
        await redis.zadd(lane, {f"demo:evt_0.{lane[-1]}@4": 0})
    parked = [(f"lane-{n}", f"demo:evt_1.{n}@5", b"{}") for n in (2, 3)]
    enter = Enter.of(keys, "demo", "demo:evt_1", parked, progress_ttl=60, now_ms=now_ms(),
                     recheck_ms=now_ms(), last=True, body=(body, b"x" * 2_000),
                     refers={"demo:evt_1.2@5"})  # fmt: skip
    assert (await enter.run(redis))[:2] == [0, 0]  # both parked; 3 holds its body (a re-run's
    assert await redis.pttl(body) == -1  # delivery under its old id: worker.marks)
    refs = await redis.hmget(body, ["demo:evt_1.2@5", "demo:evt_1.3@5"])  # type: ignore[misc]
    assert refs == [b"1", None]
    await redis.pexpire(body, 60_000)
    job = keys.arq_job("demo:evt_1.1@5")
    await redis.set(job, b"{}", px=60_000)  # callback 1's retry, queued; then parked again
    await redis.zadd("lane-1", {"demo:evt_0.1@4": 0, "demo:evt_1.1@5": 1})
    head = Head.of(keys, "lane-1", "demo", "demo:evt_1.1@5", now_ms(), now_ms(), body=body)
    assert await head.run(redis) == 0
    assert (await redis.pttl(job), await redis.pttl(body)) == (-1, -1)
    assert await bodies.Read(body, job, 60_000).run(redis)
    await bodies.Release(body, job, "demo:evt_1.1@5", 60_000).run(redis)
    assert await redis.pttl(body) == -1


async def test_the_sweep_gives_back_what_jobs_gone_without_their_lanes_release_held(
    redis: Redis, settings: Settings
) -> None:
    """An ordered delivery's body is kept for ever while parked, so a reference whose job
    ended without its lane's release (a poison job, a job that expired) kept the bytes for
    ever. The sweep gives such references back and deletes a body none refers to; it
    leaves alone a live job's and the unordered retries' bodies (they have a TTL)."""
    lane_body, other = keys.BODY_PREFIX + ":lane:demo:e@1", keys.BODY_PREFIX + "demo:e@1"
    for key in (lane_body, other):
        await redis.hset(key, mapping={"body": "x", "demo:e.1@1": 1, "demo:e.2@1": 1})  # type: ignore[misc]
    await redis.set(keys.arq_job("demo:e.1@1"), b"{}")  # parked; demo:e.2@1's job is gone
    cursor, gone = 0, 0
    while True:
        cursor, n = await bodies.sweep_lanes(redis, keys, cursor, 100)
        gone += n
        if not cursor:
            break
    assert gone == 1 and await redis.hkeys(lane_body) == [b"body", b"demo:e.1@1"]  # type: ignore[misc]
    assert await redis.hlen(other) == 3  # type: ignore[misc]
    await redis.delete(keys.arq_job("demo:e.1@1"))
    home = Services(settings, redis)  # the fleet's sweep (one worker, every 5 minutes)
    duties = Duties(settings, home, [home], AttemptStats(), "t", lambda: Counts(0, 0, 0))
    await duties._sweep(home, slot=1)
    assert not await redis.exists(lane_body)


async def test_a_retry_dropped_unrun_gives_back_its_body(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A retry dropped without a run (claimed too often: it killed its workers) ends on
    record and gives its reference back, so its event's body goes with its last retry
    rather than days later."""
    slow, _ = await park_retries(settings, redis, receiver, run_worker, ["/a", "/b"])
    jobs = sorted(await retry_jobs(redis, slow))
    for job_id in jobs:  # as if each had been claimed 30 times already
        await redis.set(keys.ARQ_RETRY_PREFIX + job_id, 30, ex=3_600)
    await run_worker(slow)
    for key in (keys.DROPPED, keys.dropped("demo")):  # every project's; demo's own
        drops = [orjson.loads(e) for e in await redis.lrange(key, 0, -1)]  # type: ignore[misc]
        assert sorted(d["jobId"] for d in drops) == jobs
    assert await body_keys(redis) == []


async def test_a_run_that_fails_after_its_job_ended_still_gives_back_its_body(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that raises (or times out, or is cancelled) once its job's end is written
    still releases its reference: one reference left behind would keep the whole event's
    body for days."""
    slow, _ = await park_retries(settings, redis, receiver, run_worker, ["/a", "/b"])
    assert len(await body_keys(redis)) == 1
    delivered = Engine.deliver

    async def ends_then_raises(engine: Engine, job: DeliveryJob, then: Then) -> None:
        await delivered(engine, job, then)
        raise RuntimeError("after the job's end")

    monkeypatch.setattr(Engine, "deliver", ends_then_raises)
    await run_worker(slow)
    assert [len(receiver.requests(p)) for p in ("/a", "/b")] == [2, 2]
    assert await redis.zcard(slow.queue_name) == 0
    assert await body_keys(redis) == []


async def test_a_retry_put_off_for_days_keeps_its_body_in_the_same_write(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that puts its job off for longer than a read keeps the body (a rate-limited
    callback's long line: its wait has no cap) raises the body's time to live in the write
    that puts the job off, so the body outlives the job even when the release after the
    run is lost (a worker killed before it)."""
    slow, _ = await park_retries(settings, redis, receiver, run_worker, ["/a", "/b"])
    job_ids = await retry_jobs(redis, slow)
    await asyncio.sleep(0.35)  # due

    async def puts_off(engine: Engine, job: DeliveryJob, then: Then) -> None:
        await engine._defer(job, then, 5 * 86_400, "share")

    monkeypatch.setattr(Engine, "deliver", puts_off)
    monkeypatch.setattr(Served, "release", lambda *_: None)  # lost
    await run_worker(slow, max_burst_jobs=1)  # one of the two
    job_ttl = max([await redis.pttl(keys.arq_job(job_id)) for job_id in job_ids])
    assert job_ttl > 5 * 86_400_000
    [kept] = await body_keys(redis)
    assert await redis.pttl(kept) > job_ttl


async def test_a_run_that_puts_its_job_back_keeps_its_body_in_that_write_alone(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retry put back for its next attempt keeps its body in the write that puts it
    back; it then also sent a release after the run, which only did that again (a script
    call per run put back). Two callbacks failing twice: one release after each job's end,
    none after a run put back; every retry still sends the body, and the last one out
    deletes it."""
    for path in ("/a", "/b"):
        url = receiver.script(path, answer(500), answer(500), answer(200))
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "s3cret")
    slow = make_settings(settings.redis_url or "", retry_schedule=(0.2, 0.2))
    await Producer(slow, redis).emit("demo", "BUILD_END", BIG)
    released: list[str] = []
    release = Served.release

    def counted(served: Served, job: DeliveryJob, keep_ms: int) -> None:
        released.append(job.job_id)
        release(served, job, keep_ms)

    monkeypatch.setattr(Served, "release", counted)
    await run_worker(slow)
    sent = [orjson.loads(seen.body)["data"] for p in ("/a", "/b") for seen in receiver.requests(p)]
    assert sent == [BIG] * 6
    assert len(released) == len(set(released)) == 2  # one per retry job, at its end
    assert await body_keys(redis) == []


async def test_the_redis_history_keeps_an_emissions_body_once_and_serves_records_whole(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Six callbacks of an 8 KB event, five failing twice then answering and one failing
    for good: eighteen records keep one copy of the body, lasting as long as the newest of
    them; the history read back (a page, one record, a delivery's attempts, a URL's
    recent deliveries, the dead letters) serves each record with its body, as sent."""
    paths = [f"/r{n}" for n in range(5)]
    for path in paths:
        url = receiver.script(path, answer(500), answer(500), answer(200))
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "s3cret")
    last = receiver.script("/dead", answer(500))
    await Registry(redis).create("demo", last, Event.BUILD_END, Region.DEVNET, "s3cret")
    slow = make_settings(
        settings.redis_url or "", retry_schedule=(0.05, 0.05), circuit_threshold=1_000
    )  # one host: its breaker would put the retries off
    await Producer(slow, redis).emit("demo", "BUILD_END", BIG)
    await run_worker(slow)
    sent = encode_body("BUILD_END", "demo", BIG)
    [kept] = [k.decode() for k in await redis.keys(keys.HISTORY_BODY_PREFIX + "*")]
    assert (await redis.get(kept)) == sent
    names = await redis.keys(keys.HISTORY_RECORD_PREFIX + "*")
    raws = [raw for raw in await redis.mget(names) if raw is not None]
    assert len(raws) == 18 and all(len(raw) < 2_000 for raw in raws)  # none holds the body
    assert await redis.pttl(kept) >= max([await redis.pttl(name) for name in names])

    history, now = RedisHistory(redis, slow, keys), now_ms()
    start, end = now - 60_000, now + 1_000
    found = []
    for path in [*paths, "/dead"]:
        url = receiver.url(path)
        found += (await history.query("demo", url, "BUILD_END", start_ms=start, end_ms=end)).records
    assert len(found) == 18
    one = await history.get(found[0].id, "demo")
    attempts = await history.attempts(found[0].delivery_id or "", "demo")
    urls = [receiver.url(p) for p in paths]
    recent = await history.recent("demo", urls, start_ms=start, end_ms=end)
    dead = await history.dead("demo")
    for record in [*found, one, *attempts, *recent.records, *dead]:
        assert record.request_body == sent.decode()
    assert len(attempts) == 3 and len(dead) == 1 and recent.records


async def test_a_records_kept_body_is_the_one_it_kept_and_never_cut_short(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A record keeps its body as it kept it: attempts of one emission written under
    another `DISPATCHER_MAX_REQUEST_BODY` each read back their own (cut, or whole); a
    record written with a shorter retention does not cut the body's time to live short;
    a body found gone is served empty and not kept whole, so it is never redelivered."""
    url = receiver.script("/a", answer(500), answer(500), answer(200))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, "s3cret")
    other = receiver.script("/b", answer(500), answer(500), answer(200))  # shares with it
    await Registry(redis).create("demo", other, Event.BUILD_END, Region.DEVNET, "s3cret")
    base = settings.redis_url or ""
    cut = make_settings(base, retry_schedule=(0.3, 0.3), max_request_body=2048)
    await Producer(cut, redis).emit("demo", "BUILD_END", BIG)
    await run_worker(cut, max_burst_jobs=1)  # attempt 1, its body cut to 2 KiB
    await run_worker(make_settings(base, retry_schedule=(0.3, 0.3)), max_burst_jobs=1)
    await asyncio.sleep(0.35)  # attempt 2 (whole, kept 7 days); attempt 3 kept 1 day:
    short = make_settings(base, retry_schedule=(0.3, 0.3), history_retention_days=1)
    await run_worker(short)
    sent = encode_body("BUILD_END", "demo", BIG).decode()
    history, now = RedisHistory(redis, short, keys), now_ms()
    page = await history.query("demo", url, "BUILD_END", start_ms=now - 60_000,
                               end_ms=now + 1_000)  # fmt: skip
    third, second, first = page.records
    assert (first.request_body, first.request_body_truncated) == (sent[:2048], True)
    for record in (second, third):
        assert (record.request_body, record.request_body_truncated) == (sent, False)
    kept = sorted(k.decode() for k in await redis.keys(keys.HISTORY_BODY_PREFIX + "*"))
    assert sorted(k.rpartition("#")[2] for k in kept) == sorted([str(len(sent)), "2048"])
    [whole] = [k for k in kept if k.endswith(f"#{len(sent)}")]
    assert await redis.ttl(whole) > 6 * 86_400  # attempt 2's 7 days, not attempt 3's one

    await redis.delete(whole)  # gone (a Redis that lost it)
    gone = await history.get(third.id, "demo")
    assert (gone.request_body, gone.request_body_truncated) == ("", True)
    with pytest.raises(InvalidInput, match="truncated"):
        await Producer(short, redis).redeliver(gone)


async def test_an_event_to_one_callback_keeps_its_body_in_its_job_and_record(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A fan-out chunk's only delivery has no one to share its body with: its retry and
    its records keep the body as before, and no key of its own is made for it."""
    slow, _ = await park_retries(settings, redis, receiver, run_worker, ["/only"])
    [raw] = (await retry_jobs(redis, slow)).values()
    assert "body" in decode(raw).payload and "bodyOf" not in decode(raw).payload
    await run_worker(slow)
    assert len(receiver.requests("/only")) == 2
    assert await body_keys(redis) == []
    assert await redis.keys(keys.HISTORY_BODY_PREFIX + "*") == []
