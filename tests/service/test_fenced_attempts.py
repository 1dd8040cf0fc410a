"""The fence before a callback's limits, on a real Redis with real claims and a real
receiver: a worker paused past its job's lease takes no fleet-wide start, slot or turn
for a job that is another worker's now, nor ends its deliveries giving up
(`Engine.attempt`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any

import pytest
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.delivery import encode_body
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.models import Event, Region
from dispatcher.registry import Options, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import Engine
from dispatcher.worker.claims import Claims
from dispatcher.worker.fence import Fence, LeaseLost, running
from dispatcher.worker.steps import NextStep
from dispatcher.worker.unending import giving_up, reason
from dispatcher.worker.writer import Writer
from tests.helpers import Receiver

PAUSED_LEASE_S = 0.2  # worker a's leases: lapsed after the test's pause of 0.3 s


async def run_as(job_id: str, run: Coroutine[Any, Any, None], gives_up: str | None = None) -> None:
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
