"""A backlog behind an open circuit breaker: each delivery waits longer each time it is put
off, and ends on its schedule, whatever the backlog (`dispatcher/worker/circuit.py`)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.worker import create_worker
from dispatcher.worker.circuit import ENDED, PutOff, budget, read, waiting_key
from tests.helpers import Receiver, RunWorker, all_records

DEAD = "http://127.0.0.1:9/down"  # nothing listens: every request fails at once


def deferrals(reason: str) -> float:
    found = REGISTRY.get_sample_value("dispatcher_deliveries_deferred_total", {"reason": reason})
    return found or 0.0


def circuit_deferrals() -> float:
    return deferrals("circuit")


async def states(redis: Redis) -> dict[str, bytes]:
    """Each delivery's circuit state (`circuit.waiting_key`), by its delivery id."""
    found, prefix = {}, Keys().DELIVERY_PREFIX
    async for key in redis.scan_iter(match=prefix + "*:w"):
        progress_id = key.decode().removeprefix(prefix).removesuffix(":w")
        found[progress_id.split("@")[0]] = await redis.get(key)
    return found


async def dead_host_backlog(
    settings: Settings, redis: Redis, count: int, cooldown: float, schedule: tuple[float, ...]
) -> Settings:
    """`count` events of demo's queued for its callback on the dead host; the settings to
    deliver them with (a circuit that opens at the first failure, `cooldown`, `schedule`)."""
    settings = settings.model_copy(
        update={"circuit_threshold": 1, "circuit_cooldown": cooldown,
                "retry_schedule": schedule, "retry_jitter": 0.2}
    )  # fmt: skip
    await Registry(redis).create("demo", DEAD, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for i in range(count):
        await producer.emit("demo", "BUILD_END", {"i": i})
    return settings


@pytest.mark.parametrize("backlog", [6, 24])
async def test_a_backlog_behind_an_open_circuit_ends_on_its_schedule(
    settings: Settings, redis: Redis, run_worker: RunWorker, backlog: int
) -> None:
    """`backlog` deliveries to a dead host, its breaker open after one failure: each is
    put off a number of times that does not grow with the backlog (each wait longer than
    the one before), sent when it may probe the circuit, and, put off past what was left
    of its schedule, ends with one final record, unsent. Before, each went back to the
    queue due the moment the circuit half-opened, where one delivery a cool-down got
    through: 6 deliveries were put off 50 times (8 each), 24 were put off 694 times (29
    each) and claimed 766 times, their last final record 15 s after the emit for a
    schedule of 0.1 s (review)."""
    settings = await dead_host_backlog(settings, redis, backlog, 0.3, (0.05, 0.05))
    before = circuit_deferrals()
    worker = await run_worker(settings)
    deferred = circuit_deferrals() - before
    attempts = settings.max_attempts
    by_delivery: dict[str, list[int]] = defaultdict(list)
    records = await all_records(redis, settings, DEAD)
    for record in records:
        by_delivery[record.delivery_id].append(record.attempt)
    # put off a few times a delivery, claimed a few times, however many wait (before: 8 and
    # 29 put-offs a delivery for 6 and 24)
    assert deferred <= backlog * attempts
    assert worker.jobs_complete <= backlog * (1 + 2 * attempts)
    unsent = [r for r in records if r.error_msg == ENDED]
    assert unsent and all(r.final and r.response_code is None for r in unsent)
    assert all("could not connect" in (r.error_msg or "") for r in records if r not in unsent)
    # every delivery: each attempt once, in order, the last one final (none started over)
    assert len(by_delivery) == backlog
    assert all(made == list(range(1, len(made) + 1)) for made in by_delivery.values())
    assert all(sum(r.final for r in records if r.delivery_id == d) == 1 for d in by_delivery)
    assert sum(r.final for r in records) == backlog
    # one ended unsent was put off for what was left of its schedule, at least
    waited = await states(redis)
    for record in unsent:
        times, seconds = read(waited[record.delivery_id], record.attempt)
        assert times >= 1 and seconds >= budget(settings.retry_schedule, record.attempt)


async def test_an_attempt_put_off_by_an_open_circuit_is_sent_when_it_may_be_probed(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Waiting for a circuit is not an attempt: a receiver down for one request opens the
    breaker; the retry due meanwhile is put off, then sent as the circuit's probe, and
    succeeds (no unsent record)."""
    settings = settings.model_copy(
        update={"circuit_threshold": 1, "circuit_cooldown": 0.3, "retry_schedule": (0.05, 0.05)}
    )
    answers = iter([500])

    async def down_once(_: web.Request) -> web.StreamResponse:
        return web.Response(status=next(answers, 200))

    url = receiver.script("/flaky", down_once)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    before = circuit_deferrals()
    await run_worker(settings)
    records = await all_records(redis, settings, url)
    assert [(r.attempt, r.response_code) for r in records] == [(1, 500), (2, 200)]
    assert circuit_deferrals() - before == 1 and len(receiver.requests("/flaky")) == 2


async def test_a_put_off_keeps_the_mark_a_count_and_its_state_beside_it(redis: Redis) -> None:
    """A put-off's writes (`PutOff`): the progress mark stays what the version before reads
    with `int()` (review: a mark `1w` failed every run of an old worker, and its job was
    dropped after 29 claims), 0 or the count made when none, never over a later count or
    "done", its time to live renewed; the state beside it, with the same."""
    progress = Keys().delivery("demo:evt.1@1")
    for found, number, left in [
        (None, 1, b"0"), (b"0", 1, b"0"), (b"1", 2, b"1"), (None, 3, b"2"),
        (b"2", 2, b"2"), (b"done", 2, b"done"),
    ]:  # fmt: skip
        await redis.delete(progress, waiting_key(progress))
        if found is not None:
            await redis.set(progress, found, ex=5)
        await PutOff.of(progress, number, f"{number} 1 0.350", 60).run(redis)
        mark = await redis.get(progress)
        assert mark == left and 55 < await redis.ttl(progress) <= 60
        if mark != b"done":
            assert int(mark) == number - 1 or int(mark) > number - 1  # the old parsing
        state = await redis.get(waiting_key(progress))
        assert read(state, number) == (1, 0.35) and 55 < await redis.ttl(waiting_key(progress))
    assert read(b"2 3 1.5", 2) == (3, 1.5) and read(b"2 3 1.5", 3) == (0, 0.0)
    assert read(None, 1) == (0, 0.0) and read(b"1w", 1) == (0, 0.0)


async def test_a_put_off_delivery_is_read_as_a_count_by_the_version_before(
    settings: Settings, redis: Redis
) -> None:
    """Deliveries put off by an open circuit, their worker stopped meanwhile: each one's
    progress mark is a count (`int(mark)`, as a worker of the version before parses it),
    and its state beside it counts the put-off for the attempt due."""
    settings = settings.model_copy(
        update={"circuit_threshold": 1, "circuit_cooldown": 30.0, "retry_schedule": (0.05,)}
    )
    await Registry(redis).create("demo", DEAD, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for i in range(3):
        await producer.emit("demo", "BUILD_END", {"i": i})
    worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
    task = asyncio.ensure_future(worker.main())
    try:
        for _ in range(500):  # (a guard: 10 s)
            if len(await states(redis)) >= 2:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    waiting = await states(redis)
    assert len(waiting) >= 2
    prefix = Keys().DELIVERY_PREFIX
    for delivery_id, state in waiting.items():
        keys = [k async for k in redis.scan_iter(match=f"{prefix}{delivery_id}@*")]
        (mark,) = [await redis.get(k) for k in keys if not k.endswith(b":w")]
        number = int(mark) + 1  # the version before: `int(progress or 0) + 1`
        assert read(state, number)[0] == 1


async def test_a_delivery_held_by_an_open_circuit_ends_once_unsent_after_its_schedule(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """Deliveries to a dead host wait for its circuit, each put off for longer each time;
    one put off for longer than what was left of its schedule (0.3 s from its first
    attempt) ends with one final FAILED record without a request, none before it: no
    attempt is spent unsent on the way (before: every attempt due while the circuit was
    open was spent so, one after the other)."""
    settings = await dead_host_backlog(settings, redis, 4, 0.1, (0.1, 0.2))
    await run_worker(settings)
    records = await all_records(redis, settings, DEAD)
    waited = await states(redis)
    ended = 0
    for delivery_id in {r.delivery_id for r in records}:
        mine = [r for r in records if r.delivery_id == delivery_id]
        assert [r.final for r in mine] == [False] * (len(mine) - 1) + [True]
        assert all(r.status.value == "FAILED" for r in mine[-1:])
        unsent = [r for r in mine if r.error_msg == ENDED]
        assert unsent in ([], mine[-1:])  # only the last, if any
        if unsent:
            ended += 1
            times, seconds = read(waited[delivery_id], unsent[0].attempt)
            assert times >= 1 and seconds >= budget(settings.retry_schedule, unsent[0].attempt)
            assert unsent[0].response_code is None
    assert ended >= 1


@pytest.mark.parametrize("failing", [1, 20])
async def test_a_healthy_callback_on_the_host_of_a_failing_one_is_sent_and_stays_enabled(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker, failing: int
) -> None:
    """demo's /bad answers 500, which opens demo's circuit to the host; /good, on the same
    host, answers 200. Each callback probes the circuit on its own, once a cool-down: /bad's
    failed probes do not hold /good's, whose success closes the circuit; /good's 3
    deliveries are all sent and succeed, and /good stays enabled (an unsent delivery never
    counts toward disabling). Before (review): /good's deliveries were spent unsent down to
    a final FAILED, never sent once, and /good was disabled. With 20 failing callbacks, past
    the 16 that probe each on its own, /good shares a probe with the rest: one that failed
    takes it no more, and its failure is its own, not the group's (review of the fix: the
    shared probe's failure counted as /good's, whose deliveries ended unsent)."""
    settings = settings.model_copy(
        update={"circuit_threshold": 2, "circuit_cooldown": 0.3, "retry_schedule": (0.05, 0.05),
                "disable_after_failures": 1, "disable_after_seconds": 0}
    )  # fmt: skip

    async def fails(_: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    bad = receiver.script("/bad", fails)
    good = receiver.url("/good")  # answers 200 to every request
    registry = Registry(redis)
    for n in range(failing):
        await registry.create("demo", f"{bad}?n={n}", Event.BUILD_START, Region.DEVNET)
    good_id, _ = await registry.create("demo", good, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for i in range(30):
        await producer.emit("demo", "BUILD_START", {"i": i})
    for i in range(3):
        await producer.emit("demo", "BUILD_END", {"i": i})
    await run_worker(settings)
    records = await all_records(redis, settings, good)
    assert [(r.status.value, r.response_code, r.final) for r in records] == [
        ("SUCCESS", 200, True)
    ] * 3
    assert len(receiver.requests("/good")) == 3
    callback = await registry.get(good_id)
    assert callback is not None and callback.enabled
