"""An attempt that sent nothing (its secrets unreadable by this worker, a proxy URL it
cannot use) is no failure of its host: the circuit breaker does not count it."""

from __future__ import annotations

import dataclasses

from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.delivery import Attempted, AttemptResult, Outcome, encode_body
from dispatcher.health import CircuitBreaker
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.models import Event, Region
from dispatcher.registry import CallbackTarget, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import Engine
from dispatcher.worker.claims import Claims
from dispatcher.worker.fence import Fence
from dispatcher.worker.steps import NextStep
from dispatcher.worker.writer import Writer
from tests.helpers import Receiver
from tests.service.test_fenced_attempts import run_as


async def test_an_attempt_that_sent_nothing_is_not_its_hosts_failure(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """A breaker that opens at the first failure: a retried attempt that sent nothing
    leaves the circuit closed (it opened it, and the callback's deliveries were put off
    as if the host had failed); the same failure sent opens it."""
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", receiver.url("/hook"), Event.BUILD_END,
                                           Region.DEVNET)  # fmt: skip
    services = Services(settings, redis)
    engine = Engine(services, Writer(redis, services.history.assign_ids))
    engine.breaker = CircuitBreaker(threshold=1, cooldown=30.0)
    unsent = AttemptResult.unsent("its secrets cannot be read here", Outcome.RETRY)
    result = unsent

    async def send(job: DeliveryJob, target: CallbackTarget, headers: object) -> Attempted:
        return Attempted(result, [])

    engine.sender.send = send  # type: ignore[method-assign, assignment]
    claims = Claims(redis, services.keys, "worker-a", lease_s=10)
    target = await registry.target(callback_id)
    assert target is not None
    circuit = ("demo", target.destination.host)
    try:
        for n, result in enumerate([unsent, dataclasses.replace(unsent, sent=True)]):
            event = EventJob(id=f"evt_{n}", project_id="demo", event="BUILD_END",
                             emitted_at=now_ms())  # fmt: skip
            job = DeliveryJob.first(event, callback_id, encode_body(event.event, "demo", {}))
            assert await services.queue.enqueue(job)
            [claimed] = await claims.claim(10)
            engine.fence = Fence(claims, 10, held=lambda: [claimed.job_id])  # noqa: B023
            await run_as(job.job_id, engine.deliver(job, NextStep(claims, claimed.job_id)))
            opened = engine.breaker.wait(circuit, callback_id) > 0
            assert opened is result.sent, (n, result)
    finally:
        await engine.close()
