"""What a worker does with a job: `fan_out` an event to its callbacks, `deliver` a retry.

A fan-out makes the first attempt of every delivery itself, concurrently, so an event
costs one queue job however many callbacks it has; only retries become `deliver` jobs
(job id = delivery id). Each attempt costs one Redis round trip, shared with other jobs'
(group commit): its history record, the delivery's progress, the endpoint-health reset and
the next attempt's job are written in one pipeline, so a worker killed at any point loses
nothing (the job runs again, with the same delivery id for the receiver to de-duplicate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from dispatcher import keys, metrics
from dispatcher.backoff import next_delay
from dispatcher.batch import Batcher
from dispatcher.delivery import AttemptResult, Outcome, encode_body, request_headers, send
from dispatcher.egress import make_transport
from dispatcher.errors import InvalidUrl
from dispatcher.health import CircuitBreaker
from dispatcher.jobs import DeliveryJob, EventJob, now_ms
from dispatcher.models import Region
from dispatcher.status import AttemptStats
from dispatcher.worker.record import attempt_record

if TYPE_CHECKING:
    import httpx
    from redis.asyncio.client import Pipeline

    from dispatcher.registry import CallbackTarget
    from dispatcher.services import Services

__all__ = ["Engine", "Schedule"]

log = structlog.get_logger("dispatcher.worker")

DONE = b"done"

# Queues the next attempt of a delivery, `delay` seconds from now, on the pipeline that
# records this one (so both are written, or neither).
Schedule = Callable[["Pipeline", DeliveryJob, float], None]


class Engine:
    """A worker process's delivery machinery: one HTTP transport per region, the circuit
    breaker, the attempt statistics, over the process's services. Closed on shutdown."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.batcher = Batcher(services.redis)
        self.breaker = CircuitBreaker(
            self.settings.circuit_threshold, self.settings.circuit_cooldown
        )
        self.transports: dict[Region, httpx.AsyncBaseTransport] = {
            region: make_transport(self.settings, region) for region in Region
        }
        self.stats = AttemptStats()
        schedule_s = sum(self.settings.retry_schedule)
        self.progress_ttl = int(max(86_400, 2 * schedule_s))

    async def close(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self.transports.values()))

    def push_retry(self, pipe: Pipeline, job: DeliveryJob, delay: float) -> None:
        """The next attempt as a `deliver` job of its own (job id = progress id)."""
        self.services.queue.push(pipe, job, defer_s=delay)

    async def fan_out(self, event: EventJob, *, rerun: bool = False) -> int:
        """First attempt of every delivery of `event`; returns how many callbacks matched.
        A `rerun` (the job ran before and did not finish) skips what was already handled."""
        registry = self.services.registry
        (rows,) = await self.batcher.execute(
            lambda pipe: registry.queue_match(pipe, event.project_id, event.event)
        )
        targets = registry.targets(rows)
        if not targets:
            return 0
        body = encode_body(event.event, event.data)  # once for all callbacks
        pending = [(DeliveryJob.first(event, target.id, body), target) for target in targets]
        if rerun:
            done = await self.services.redis.mget(
                [keys.delivery(j.progress_id) for j, _ in pending]
            )
            pending = [pair for pair, mark in zip(pending, done, strict=True) if not mark]
        attempts = [self.attempt(job, target, 1, self.push_retry) for job, target in pending]
        if len(attempts) == 1:
            await attempts[0]
        else:
            await asyncio.gather(*attempts)
        return len(targets)

    async def deliver(self, job: DeliveryJob, schedule: Schedule | None = None) -> float | None:
        """One more attempt of a delivery. Returns the delay before the next one when it is
        to be tried again and `schedule` is None, else None."""
        progress, target = await asyncio.gather(
            self.services.redis.get(keys.delivery(job.progress_id)),
            self.services.registry.target(job.callback_id),
        )
        if progress == DONE:
            return None
        if target is None:
            log.info("delivery.dropped", delivery_id=job.delivery_id, callback_id=job.callback_id,
                     reason="callback deleted or disabled")  # fmt: skip
            return None
        return await self.attempt(job, target, int(progress or 0) + 1, schedule)

    async def attempt(
        self, job: DeliveryJob, target: CallbackTarget, number: int, schedule: Schedule | None
    ) -> float | None:
        """Attempt `number` of `job`, recorded. A retry is queued through `schedule` in the
        record's own pipeline; without one, its delay is returned instead (None: no retry)."""
        host = urlsplit(target.url).netloc
        if wait := self.breaker.wait(host):  # not an attempt: try again once it may
            if schedule is None:
                return wait
            await self.batcher.execute(lambda pipe: schedule(pipe, job, wait))
            return None

        headers = request_headers(
            event=job.event,
            delivery_id=job.delivery_id,
            body=job.body,
            token=target.secret_token,
            user_agent=self.settings.user_agent,
        )
        result = await self._send(target, job.body, headers)
        self.breaker.record(host, result.outcome is not Outcome.RETRY)
        delay = None
        if result.outcome is Outcome.RETRY:
            delay = next_delay(
                self.settings.retry_schedule,
                number,
                jitter=self.settings.retry_jitter,
                retry_after=result.retry_after,
                retry_after_cap=self.settings.retry_after_cap,
            )
        record = attempt_record(job, target, number, headers, result, delay is None, self.settings)
        await self._write(job, target, number, record, result, delay, schedule)
        _observe(job, target, number, result, delay)
        self.stats.count(result.outcome.value)
        await self._judge(target, result, final=delay is None)
        return delay if schedule is None else None

    async def _write(
        self,
        job: DeliveryJob,
        target: CallbackTarget,
        number: int,
        record: dict[str, Any],
        result: AttemptResult,
        delay: float | None,
        schedule: Schedule | None,
    ) -> None:
        ok = result.outcome is Outcome.SUCCESS

        def write(pipe: Pipeline) -> None:
            # all idempotent but the record, which runs once (see Batcher.execute)
            self.services.history.record(pipe, record, dead=delay is None and not ok)
            progress = DONE if delay is None else str(number)
            pipe.set(keys.delivery(job.progress_id), progress, ex=self.progress_ttl)
            if ok and target.failing:
                self.services.health.succeeded(pipe, target.id)
            if delay is not None and schedule is not None:
                schedule(pipe, job, delay)

        await self.batcher.execute(write)

    async def _judge(self, target: CallbackTarget, result: AttemptResult, *, final: bool) -> None:
        """Endpoint health: a 410 disables at once; a final failure counts towards it."""
        health = self.services.health
        if result.outcome is Outcome.GONE:
            metrics.CALLBACKS_DISABLED.labels(reason="gone").inc()
            await health.disable(target.id, "the receiver answered 410 Gone")
        elif final and result.outcome is not Outcome.SUCCESS:
            if await health.failed(target.id, result.error or "failed"):
                metrics.CALLBACKS_DISABLED.labels(reason="failing").inc()

    async def _send(
        self, target: CallbackTarget, body: bytes, headers: dict[str, str]
    ) -> AttemptResult:
        policy = self.services.policies[target.region]
        try:
            # Literal addresses, ports and metadata names: the resolver never sees them.
            policy.check_url(target.url)
            if target.region in self.settings.region_proxies:
                # Through a proxy the proxy resolves the host: check the address ourselves.
                await policy.check_resolved(target.url)
        except InvalidUrl as exc:
            now = now_ms()
            return AttemptResult(Outcome.FAILED, None, None, f"refused: {exc.message}", None,
                                 now, now)  # fmt: skip
        return await send(
            self.transports[target.region],
            target.url,
            body,
            headers,
            connect_timeout=self.settings.connect_timeout,
            total_timeout=self.settings.total_timeout,
            max_response_body=self.settings.max_response_body,
        )


def _observe(
    job: DeliveryJob, target: CallbackTarget, number: int, result: AttemptResult,
    delay: float | None,
) -> None:  # fmt: skip
    """The attempt's metrics and its one canonical log line."""
    metrics.DELIVERIES.labels(outcome=result.outcome.value, event=job.event).inc()
    metrics.ATTEMPT_SECONDS.observe(result.duration_ms / 1000)
    metrics.HISTORY_RECORDS.inc()
    if delay is not None:
        metrics.RETRIES.inc()
    log.info(
        "delivery.attempt",
        event_id=job.event_id,
        delivery_id=job.delivery_id,
        callback_id=target.id,
        callback_url=target.url,
        project_id=job.project_id,
        event_type=job.event,
        attempt=number,
        outcome=result.outcome.value,
        status_code=result.status_code,
        duration_ms=result.duration_ms,
        error=result.error,
        retry_in_s=None if delay is None else round(delay, 3),
    )
