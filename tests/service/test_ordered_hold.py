"""An event with no ordered delivery does not hold its project's lanes while its first
attempts run (review finding), over a real Redis, real burst workers and a real receiver:
an unordered delivery of event 1 (the project's callback, the platform's, or an ordered
callback's for an event without the key) is held by its receiver until event 1's ordered
successors have all arrived, or a generous deadline. Before the fix they arrived only
after it: event 1 stayed in its project's pending set until its fan-out job ended, and
every later head waited for it (re-checked every 50 ms). Also the scripts' parts: an
event whose last chunk matched nothing lets the lanes go, a head that goes on wakes the
heads waiting with it, and a waiting head looks again less often the longer it waits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.ending import JobEnd
from dispatcher.jobs import DeliveryJob
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from dispatcher.worker.claims import Claims
from dispatcher.worker.lane_scripts import LATE, RECHECK_MAX_S, RECHECK_S, Enter, Head, recheck_at
from tests.helpers import Receiver, RunWorker, hang, make_settings

keys = Keys()
HOLD_S = 20.0  # how long the slow receiver waits for the ordered arrivals at most
BUILDS, STEPS = 5, 2  # the ordered events after event 1: each build's steps, in one lane


@dataclass
class Slow:
    """A receiver path that answers once `want` requests reached `path`, or after
    `HOLD_S`; `seen_then`: how many had reached it when it answered."""

    receiver: Receiver
    want: int
    path: str = "/hook"
    seen_then: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        deadline = time.monotonic() + HOLD_S
        while len(self.receiver.requests(self.path)) < self.want:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self.seen_then.append(len(self.receiver.requests(self.path)))
        return web.Response(text="ok")


def entry(
    project: str,
    event_job: str,
    parked: list[tuple[str, str, bytes]],
    *,
    last: bool,
    stamp: int | None = None,
    end: JobEnd | None = None,
    beyond: tuple[list[str], int] | None = None,
) -> Enter:
    """`Enter` of `event_job`'s `parked` deliveries, due now."""
    stamp = now_ms() if stamp is None else stamp
    return Enter.of(
        keys,
        project,
        event_job,
        parked,
        progress_ttl=60,
        now_ms=stamp,
        recheck_ms=stamp,
        last=last,
        end=end,
        beyond=beyond,
    )


@pytest.mark.parametrize("first", ["unordered", "platform", "keyless", "chunked"])
async def test_an_event_with_no_ordered_delivery_does_not_hold_its_projects_lanes(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker, first: str
) -> None:
    """Event 1 of project demo goes, unordered, to a receiver that answers only once the
    ordered deliveries of demo's later events (5 builds of 2 steps, one lane a build) have
    all arrived, or after 20 s: they arrive while its attempt is in flight, each build's
    steps in order. `first`: event 1's callback is demo's and unordered, the platform's and
    unordered, ordered by a key event 1's data lacks, or demo's and unordered, the first
    of two chunks (one callback a chunk), the second unordered too."""
    chunk = 1 if first == "chunked" else 500
    settings = make_settings(redis_server.url, total_timeout=HOLD_S + 10, fan_out_chunk=chunk)
    registry, ordered = Registry(redis), Options(order_by="buildId")
    slow = Slow(receiver, BUILDS * STEPS)
    url = receiver.script("/slow", slow.handle)
    owner = PLATFORM_PROJECT if first == "platform" else "demo"
    options = ordered if first == "keyless" else None
    await registry.create(owner, url, Event.BUILD_START, Region.DEVNET, options=options)
    if first == "chunked":
        await registry.create("demo", receiver.url("/next"), Event.BUILD_START, Region.DEVNET)
    hook = receiver.url("/hook")
    await registry.create("demo", hook, Event.BUILD_END, Region.DEVNET, options=ordered)
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_START", {"step": 0})  # event 1: no buildId
    later = [
        ("demo", "BUILD_END", {"buildId": f"b-{b}", "step": s})
        for s in range(STEPS)
        for b in range(BUILDS)
    ]
    await producer.emit_many(later)
    await run_worker(settings)
    assert slow.seen_then == [BUILDS * STEPS]  # all arrived while event 1's attempt ran
    arrived = [orjson.loads(seen.body)["data"] for seen in receiver.requests("/hook")]
    for b in range(BUILDS):
        assert [d["step"] for d in arrived if d["buildId"] == f"b-{b}"] == list(range(STEPS))
    assert not await redis.zcard(keys.lanes_pending("demo"))
    assert not await redis.keys(f"{keys.LANE_PREFIX}*")
    assert len(receiver.requests("/next")) == (first == "chunked")


async def test_an_event_whose_later_chunk_is_ordered_holds_the_lanes_until_it_entered(
    redis_server: EmbeddedRedis, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The guarantee kept: event 1 of build b goes to a receiver that answers after 1 s in
    its first chunk, and to /hook, ordered by build, in its second; event 2 of build b
    goes to /hook too (the same lane). Event 1's first chunk lets nothing go, so event 2
    arrives after event 1 (it would arrive first, were event 1 ready at its first chunk)."""
    settings = make_settings(redis_server.url, total_timeout=5, fan_out_chunk=1)
    registry, ordered = Registry(redis), Options(order_by="buildId")
    slow = receiver.script("/slow", hang(1.0))
    await registry.create("demo", slow, Event.BUILD_START, Region.DEVNET)
    hook = receiver.url("/hook")
    for event in (Event.BUILD_START, Event.BUILD_END):
        await registry.create("demo", hook, event, Region.DEVNET, options=ordered)
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_START", {"buildId": "b", "step": 0})
    await producer.emit("demo", "BUILD_END", {"buildId": "b", "step": 1})
    await run_worker(settings)
    arrived = [orjson.loads(seen.body)["data"]["step"] for seen in receiver.requests("/hook")]
    assert arrived == [0, 1]
    assert len(receiver.requests("/slow")) == 1


async def test_a_chunk_lets_the_lanes_go_when_no_ordered_callback_of_its_event_follows(
    redis: Redis,
) -> None:
    """`Enter` of a chunk before the last (none of its deliveries ordered): the event moves
    to the ready set unless an ordered callback (the project's or the platform's) that its
    event goes to (in one of its levels' match sets) comes after the chunk; one of another
    event, or before the chunk, does not count. A flag of a version before (not a set)
    keeps the event pending (not known)."""
    project, event_job = "look", "look:evt_1"
    own, platform = keys.match("look", "BUILD_START"), keys.match(PLATFORM_PROJECT, "BUILD_START")
    other = keys.match("look", "BUILD_END")
    await redis.zadd(keys.QUEUE, {event_job: now_ms()})
    await redis.zadd(own, {"3": 3, "9": 9})
    await redis.zadd(platform, {"5": 5})
    await redis.zadd(other, {"12": 12})

    async def ready_after(after: int) -> bool:
        await redis.delete(keys.lanes_ready(project))
        await redis.zadd(keys.lanes_pending(project), {event_job: 1})
        await entry(project, event_job, [], last=False, beyond=([platform, own], after)).run(redis)
        return bool(await redis.zscore(keys.lanes_ready(project), event_job))

    await redis.sadd(keys.lanes_ordered(project), "3", "12")  # type: ignore[misc]  # sync|async
    # (3 comes before the chunk's end; 12 is another event's)
    assert await ready_after(4)
    await redis.sadd(keys.lanes_ordered(PLATFORM_PROJECT), "5")  # type: ignore[misc]
    assert not await ready_after(4)
    assert await ready_after(5)
    await redis.sadd(keys.lanes_ordered(project), "9")  # type: ignore[misc]
    assert not await ready_after(5)
    assert await ready_after(9)
    await redis.delete(keys.lanes_ordered(project))
    await redis.set(keys.lanes_ordered(project), "1")  # a version before's flag
    assert not await ready_after(9)


async def test_a_delivery_ordered_after_its_event_let_the_lanes_go_is_sent_unordered(
    redis: Redis,
) -> None:
    """An event ready at a chunk before its last (no ordered callback after it then), whose
    later chunk finds a callback ordered since: that delivery is not put behind later
    events in its lane (they may have gone already): it is attempted now, unordered (`LATE`,
    and the fan-out's job is left to it). One of the same event in its lane already (its
    entry sent again) is entered as before."""
    project, event_job, lane = "late", "late:evt_1", keys.lane("late-lane")
    stamp = now_ms()
    await redis.zadd(keys.lanes_ready(project), {event_job: 1})
    await redis.zadd(lane, {"late:evt_2.7@1": 2})  # a later event's, in the lane already
    claims = Claims(redis, keys, "worker-a", lease_s=10)
    await redis.zadd(keys.QUEUE, {event_job: stamp})
    await redis.set(keys.arq_job(event_job), b"{}")
    [claimed] = await claims.claim(1)
    new, again = "late:evt_1.7@1", "late:evt_1.8@1"
    await redis.zadd(keys.lane("late-other"), {again: 1})
    entries = [(lane, new, b"{}"), (keys.lane("late-other"), again, b"{}")]
    enter = entry(project, event_job, entries, last=True, end=claims.job_end(claimed.job_id))
    *verdicts, _woken, ended = await enter.run(redis)
    assert (verdicts, ended) == ([LATE, 1], 0)
    assert await redis.zrange(lane, 0, -1) == [b"late:evt_2.7@1"]
    assert not await redis.exists(keys.delivery(new))
    assert await redis.zscore(keys.QUEUE, event_job) is not None  # left to the attempts


async def test_a_project_without_an_ordered_callback_pays_no_command_for_the_hold(
    redis: Redis, settings: Settings, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Whether a fan-out's event may hold its project's lanes is known from its chunk
    (`Chunk.numbered`, kept with the match), not asked per delivery: 20 events of a
    project with no ordered callback (another project has one) are claimed, fanned out
    and delivered without a ZSCORE. The claim used to look each claimed job up in its
    project's pending set (20 ZSCORE, one a delivery of every project: issue #20's count)."""
    ordered = Options(order_by="buildId")
    await Registry(redis).create("demo", receiver.url("/o"), Event.BUILD_END, Region.DEVNET,
                                 options=ordered)  # fmt: skip
    await Registry(redis).create("other", receiver.url(), Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit_many(
        [("other", "BUILD_END", {"buildId": "b", "n": n}) for n in range(20)]
    )
    await redis.config_resetstat()
    await run_worker()
    assert len(receiver.requests()) == 20
    stats = await redis.info("commandstats")
    assert int(stats.get("cmdstat_zscore", {}).get("calls", 0)) == 0


async def test_a_numbered_event_that_matches_no_callback_lets_its_lanes_go(
    redis: Redis, settings: Settings, receiver: Receiver, run_worker: RunWorker
) -> None:
    """An event of a numbered project (it has an ordered callback) that matches no
    callback at all still lets its lanes go at its last chunk (`Lanes.ready`, as its chunk
    says its project numbers events): it is in the ready set, its job ended in that
    script; an event of another project is never numbered."""
    ordered = Options(order_by="buildId")
    hook = receiver.url("/hook")
    await Registry(redis).create("demo", hook, Event.BUILD_END, Region.DEVNET, options=ordered)
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_START", {"step": 0}, event_id="nothing-matches")
    await producer.emit("other", "BUILD_START", {"step": 0}, event_id="not-numbered")
    assert await redis.zrange(keys.lanes_pending("demo"), 0, -1) == [b"demo:nothing-matches"]
    assert not await redis.exists(keys.lanes_pending("other"))
    await run_worker()
    assert await redis.zrange(keys.lanes_ready("demo"), 0, -1) == [b"demo:nothing-matches"]
    assert not await redis.zcard(keys.lanes_pending("demo"))
    assert not await redis.zcard(keys.QUEUE)


async def test_an_entry_of_no_delivery_lets_the_lanes_go_and_wakes_their_heads(
    redis: Redis,
) -> None:
    """What a last chunk with nothing ordered runs before its attempts: the event moves
    from its project's pending set to the ready set, and the head that waited for it is
    due now (no longer at its next look)."""
    project, event_job, head = "none", "none:evt_1", "none:evt_2.1@1"
    stamp, far = now_ms(), now_ms() + 60_000
    await redis.zadd(keys.QUEUE, {event_job: stamp, head: far})
    await redis.zadd(keys.lanes_pending(project), {event_job: 1})
    await redis.zadd(keys.lanes_waiting(project), {head: 2})
    enter = entry(project, event_job, [], last=True, stamp=stamp)
    assert await enter.run(redis) == [1, 0]  # one head woken; no job end given
    assert await redis.zrange(keys.lanes_ready(project), 0, -1) == [event_job.encode()]
    assert not await redis.zcard(keys.lanes_pending(project))
    assert await redis.zscore(keys.QUEUE, head) == stamp
    assert not await redis.zcard(keys.lanes_waiting(project))


async def test_a_head_that_goes_on_wakes_the_heads_that_waited_with_it(redis: Redis) -> None:
    """A wake-up takes 100 waiting heads at a time: a head that finds its earlier events
    in their lanes wakes those of its project whose earlier events are in too (numbered up
    to the lowest event still pending), rather than leave them to their next look; one
    numbered higher, which waits for that event, waits on."""
    project, lane, head = "chain", keys.lane("chain-lane"), "chain:evt_5.1@1"
    lower, also, higher = "chain:evt_3.2@1", "chain:evt_4.3@1", "chain:evt_7.4@1"
    stamp, far = now_ms(), now_ms() + 60_000
    await redis.zadd(lane, {head: 5})
    await redis.set(keys.arq_job(head), b"{}")
    await redis.zadd(keys.QUEUE, {head: stamp, lower: far, also: far, higher: far})
    await redis.zadd(keys.QUEUE, {"chain:evt_6": stamp})  # event 6, its fan-out under way
    await redis.zadd(keys.lanes_pending(project), {"chain:evt_6": 6})
    await redis.zadd(keys.lanes_waiting(project), {lower: 3, also: 4, higher: 7})
    check = Head.of(keys, lane, project, head, stamp + 50, stamp + 1000, now_ms=stamp)
    assert await check.run(redis) == 1
    due = [await redis.zscore(keys.QUEUE, job_id) for job_id in (lower, also, higher)]
    assert due == [stamp, stamp, far]
    assert await redis.zrange(keys.lanes_waiting(project), 0, -1) == [higher.encode()]


async def test_heads_of_more_than_a_wake_ups_worth_of_events_wake_one_another(
    redis: Redis,
) -> None:
    """150 later events, each heading a lane of its own, wait behind one slow event: its
    entry wakes 100, and each of those that goes on wakes the next, so none is left to
    its own look (up to 5 s). A head woke only heads numbered no higher than itself, and
    those of events 102-151 waited for their look (review)."""
    project, event_job = "many", "many:evt_1"
    stamp, far = now_ms(), now_ms() + 60_000
    await redis.zadd(keys.QUEUE, {event_job: stamp})
    await redis.zadd(keys.lanes_pending(project), {event_job: 1})
    heads = [(f"many:evt_{n}.1@1", keys.lane(f"many-lane-{n}"), n) for n in range(2, 152)]
    for head, lane, n in heads:
        await redis.zadd(lane, {head: n})
        await redis.set(keys.arq_job(head), b"{}")
        await redis.zadd(keys.QUEUE, {head: far})
        await redis.zadd(keys.lanes_waiting(project), {head: n})
    assert await entry(project, event_job, [], last=True, stamp=stamp).run(redis) == [100, 0]
    went: set[str] = set()
    while due := [
        h for h, _, _ in heads if h not in went and await redis.zscore(keys.QUEUE, h) == stamp
    ]:
        for head, lane, _ in heads:
            if head in due:
                check = Head.of(keys, lane, project, head, stamp + 50, stamp + 1000, now_ms=stamp)
                assert await check.run(redis) == 1
                went.add(head)
    assert len(went) == 150 and not await redis.zcard(keys.lanes_waiting(project))


def test_a_waiting_head_looks_again_less_often_the_longer_it_waits() -> None:
    """The next look of a head that waits for its earlier events: after half its
    event's age, from 50 ms to 5 s; over a hold of 8 s, 13 looks, not 160 (every 50 ms,
    as before). An id without its emission (a version before's) looks after 50 ms."""
    emitted = 1_700_000_000_000
    job = DeliveryJob("demo:e.1", f"demo:e.1@{emitted}", "e", "demo", "BUILD_END", b"", 1)

    def delay(waited_ms: int) -> int:
        return recheck_at(job, emitted + waited_ms) - (emitted + waited_ms)

    least, most = int(RECHECK_S * 1000), int(RECHECK_MAX_S * 1000)
    assert (delay(0), delay(1000), delay(60_000), delay(-5000)) == (least, 500, most, least)
    waited, looks = 0, 0
    while waited < 8000:
        waited, looks = waited + delay(waited), looks + 1
    assert looks == 13
    old = DeliveryJob("demo:e.1", "demo:e.1", "e", "demo", "BUILD_END", b"", 1)
    assert recheck_at(old, emitted) == emitted + least
