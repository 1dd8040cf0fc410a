"""The fence before a callback's limits, on a real Redis with real claims and a real
receiver: a worker paused past its job's lease takes no fleet-wide start, slot or turn
for a job that is another worker's now, nor ends its deliveries giving up
(`Engine.attempt`), nor puts them off to the queue (`Engine._defer`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.delivery import encode_body
from dispatcher.jobs import DeliveryJob, EventJob, decode
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.registry.rules import destination
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import Engine
from dispatcher.worker.claims import Claimed, Claims
from dispatcher.worker.fence import Fence, LeaseLost, running
from dispatcher.worker.steps import ChunkEnd, NextStep
from dispatcher.worker.unending import giving_up, reason
from dispatcher.worker.writer import Writer
from tests.helpers import Receiver

PAUSED_LEASE_S = 0.2  # worker a's leases: lapsed after the test's pause of 0.3 s


async def run_as(job_id: str, run: Coroutine[Any, Any, Any], gives_up: str | None = None) -> None:
    """`run` in a task that runs `job_id`, as the worker starts one (its fence's job;
    `gives_up`: the reason its run ends its deliveries unsent, `unending`)."""
    context = contextvars.copy_context()
    context.run(running.set, job_id)
    context.run(giving_up.set, gives_up)
    await asyncio.create_task(run, context=context)


async def test_a_worker_paused_past_its_lease_takes_no_start_of_a_callback_with_limits(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Worker a claimed a retry of a callback with limits (one start a second, one in
    flight), was paused past its lease, and worker b took the job. On waking, a's run
    stops at its fence before the admission (`LeaseLost`): no request, and no start, slot
    or turn of the callback's taken, so b, its holder now, sends the delivery at once."""
    url, limits = receiver.url("/limited"), Options(max_per_second=1, max_in_flight=1)
    callback_id, _ = await Registry(redis).create(
        "demo", url, Event.BUILD_END, Region.DEVNET, "t", options=limits
    )
    services = Services(settings, redis)
    event = EventJob(id="evt_paused", project_id="demo", event="BUILD_END", emitted_at=now_ms())
    job = DeliveryJob.first(event, callback_id, encode_body(event.event, "demo", event.data))
    assert await services.queue.enqueue(job)
    a = Claims(redis, services.keys, "worker-a", lease_s=PAUSED_LEASE_S)
    b = Claims(redis, services.keys, "worker-b", lease_s=10)
    [claimed] = await a.claim(10)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    engine.fence = Fence(a, PAUSED_LEASE_S, held=lambda: [claimed.job_id])
    try:
        await asyncio.sleep(0.3)  # a paused: its lease lapses, and b claims the job
        [taken] = await b.claim(10)
        with pytest.raises(LeaseLost):
            await run_as(job.job_id, engine.deliver(job, NextStep(a, claimed.job_id)))
        assert not receiver.seen
        assert await redis.exists(*services.keys.limits(callback_id)) == 0
        engine.fence = Fence(b, 10, held=lambda: [taken.job_id])
        await run_as(job.job_id, engine.deliver(job, NextStep(b, taken.job_id)))
    finally:
        await engine.close()
    assert [s.path for s in receiver.seen] == ["/limited"]  # b's, admitted: not put off
    starts, *_ = services.keys.limits(callback_id)
    assert await redis.zcard(starts) == 1  # b's start, the only one
    assert await redis.zcard(settings.queue_name) == 0  # ended by b's record


async def test_a_worker_paused_past_its_lease_does_not_end_anothers_delivery_giving_up(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Worker a's run was giving up (its job claimed 26 times) when it was paused past its
    lease, and worker b took the job: on waking, a writes no FAILED record for a delivery
    that is b's now (`LeaseLost`); b sends it."""
    url = receiver.url("/hook")
    callback_id, _ = await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    services = Services(settings, redis)
    event = EventJob(id="evt_given_up", project_id="demo", event="BUILD_END", emitted_at=now_ms())
    job = DeliveryJob.first(event, callback_id, encode_body(event.event, "demo", event.data))
    assert await services.queue.enqueue(job)
    a = Claims(redis, services.keys, "worker-a", lease_s=PAUSED_LEASE_S)
    [claimed] = await a.claim(10)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    engine.fence = Fence(a, PAUSED_LEASE_S, held=lambda: [claimed.job_id])
    try:
        await asyncio.sleep(0.3)  # a paused: its lease lapses, and b claims the job
        [taken] = await Claims(redis, services.keys, "worker-b", lease_s=10).claim(10)
        with pytest.raises(LeaseLost):
            run = engine.deliver(job, NextStep(a, claimed.job_id))
            await run_as(job.job_id, run, gives_up=reason(26))
        assert await redis.keys(services.keys.HISTORY_RECORD_PREFIX + "*") == []
        assert await redis.zscore(settings.queue_name, taken.job_id) is not None  # b's still
    finally:
        await engine.close()


async def a_fans_out(
    settings: Settings, redis: Redis, urls: list[str]
) -> tuple[Services, Engine, Claimed, Callable[[], Coroutine[Any, Any, Any]]]:
    """Event e1 of demo to a callback at each of `urls`, its fan-out job claimed by worker
    a (leases of `PAUSED_LEASE_S`, renewed by no one: as if a were paused): the services,
    a's engine (fenced by a's leases), a's claim, and a's run of its chunk (to run with
    `run_as`)."""
    for url in urls:
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    assert await Producer(settings, redis).emit("demo", "BUILD_END", event_id="e1") == "e1"
    services = Services(settings, redis)
    a = Claims(redis, services.keys, "worker-a", lease_s=PAUSED_LEASE_S)
    [claimed] = await a.claim(10)
    wire = decode(claimed.data or b"")
    event = EventJob.from_wire(wire.payload, wire.enqueued_ms)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    engine.fence = Fence(a, PAUSED_LEASE_S, held=lambda: [claimed.job_id])
    return services, engine, claimed, lambda: engine.fan_out(event, end=ChunkEnd(a, claimed, event))


async def b_takes(services: Services) -> Claimed:
    """Worker b's claim of a's job, once a's lease lapsed (a paused)."""
    await asyncio.sleep(0.3)  # past a's lease (0.2 s)
    [taken] = await Claims(services.redis, services.keys, "worker-b", lease_s=10).claim(10)
    return taken


async def left_to(taken: Claimed, services: Services) -> None:
    """Nothing a's run wrote of its chunk: the queue holds b's job alone, no delivery is
    marked, no attempt recorded."""
    queued = await services.redis.zrange(services.settings.queue_name, 0, -1)
    assert queued == [taken.job_id.encode()]
    assert await services.redis.keys(services.keys.delivery("*")) == []
    assert await services.redis.keys(services.keys.HISTORY_RECORD_PREFIX + "*") == []


async def test_a_worker_paused_past_its_lease_puts_off_nothing_of_a_fan_out_anothers_now(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Worker a ran the fan-out of an event to two callbacks on a host whose circuit is open
    in a (each attempt is put off to the queue, a delivery job of its own) when it was
    paused past its lease, and worker b took the job. On waking, a's run puts nothing off
    (`LeaseLost`): a delivery job it queued would be sent beside b's run of the chunk,
    which may have read the deliveries' marks before a wrote them (under load, a resumed
    worker sent 10-21 deliveries its successor sent too, each claimed from such a job)."""
    urls = [receiver.url(f"/c{n}") for n in range(2)]
    services, engine, claimed, fan_out = await a_fans_out(settings, redis, urls)
    for _ in range(engine.breaker.threshold):  # the host failed in a: its circuit open
        engine.breaker.record(("demo", destination(urls[0]).host), ok=False)
    try:
        taken = await b_takes(services)
        with pytest.raises(LeaseLost):
            await run_as(claimed.job_id, fan_out())
    finally:
        await engine.close()
    assert not receiver.seen
    await left_to(taken, services)


async def test_an_attempt_in_flight_past_its_lease_queues_no_retry_of_a_fan_out_anothers_now(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Worker a's fan-out sent its one attempt, and a was paused past its lease while the
    receiver held the request; worker b took the job. The receiver then answers 500: a's
    run queues no retry (`LeaseLost`), a job of its own that a worker may send beside b's
    run of the chunk (a pause past the request timeout fails every request in flight),
    and writes no record or mark of it: b's run sends the delivery."""
    b_took = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await b_took.wait()
        return web.Response(status=500)

    url = receiver.script("/hook", held)
    services, engine, claimed, fan_out = await a_fans_out(settings, redis, [url])
    run = asyncio.create_task(run_as(claimed.job_id, fan_out()))
    try:
        await receiver.wait_for(1, within=30)  # sent: in flight
        taken = await b_takes(services)
        b_took.set()
        with pytest.raises(LeaseLost):
            await run
    finally:
        await engine.close()
    await left_to(taken, services)
