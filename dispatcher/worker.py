"""The arq worker: `fan_out` an event to its callbacks, `deliver` retries, sweep history.

A fan-out makes the first attempt of every delivery itself, concurrently, so an event
costs one queue job however many callbacks it has; only retries become `deliver` jobs
(job id = delivery id). Each attempt costs one Redis round trip: its history record, the
delivery's progress, the endpoint-health reset and the next attempt's job are written in
one pipeline, so a worker killed at any point loses nothing (the job runs again, with the
same delivery id for the receiver to de-duplicate).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
import structlog
from arq import Retry, cron
from arq.worker import Function, Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher import keys, metrics
from dispatcher.backoff import next_delay
from dispatcher.batch import Batcher
from dispatcher.delivery import (
    AttemptResult,
    Outcome,
    encode_body,
    mask_headers,
    request_headers,
    send,
)
from dispatcher.egress import make_transport, policy_for
from dispatcher.errors import InvalidUrl
from dispatcher.health import CircuitBreaker, Health
from dispatcher.history import History, truncate
from dispatcher.models import DeliveryStatus, Region
from dispatcher.queue import DELIVER, FAN_OUT, Queue
from dispatcher.redis import POISON, job_deserializer, job_serializer, redis_settings
from dispatcher.registry import CallbackTarget, Registry
from dispatcher.tokens import cipher_for

if TYPE_CHECKING:
    import httpx
    from arq.connections import ArqRedis
    from redis.asyncio.client import Pipeline

    from dispatcher.settings import Settings

__all__ = ["Engine", "create_worker", "worker_settings"]

log = structlog.get_logger("dispatcher.worker")

DONE = b"done"
STATS_TTL_S = 7200
HEARTBEAT_S = 5.0
_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event going to one callback, across all its attempts."""

    delivery_id: str
    progress_id: str  # whose attempt count this is: the delivery, or one redelivery of it
    event_id: str
    project_id: str
    event: str
    body: bytes
    callback_id: int
    redelivery_of: int | None = None

    def job_payload(self) -> dict[str, Any]:
        return {
            "deliveryId": self.delivery_id,
            "progressId": self.progress_id,
            "eventId": self.event_id,
            "projectId": self.project_id,
            "event": self.event,
            "body": self.body.decode(),
            "callbackId": self.callback_id,
            "redeliveryOf": self.redelivery_of,
        }

    @classmethod
    def from_job(cls, payload: dict[str, Any], job_id: str) -> Delivery:
        return cls(
            delivery_id=payload["deliveryId"],
            progress_id=payload.get("progressId") or job_id,
            event_id=payload.get("eventId") or "",
            project_id=payload["projectId"],
            event=payload["event"],
            body=payload["body"].encode(),
            callback_id=int(payload["callbackId"]),
            redelivery_of=payload.get("redeliveryOf"),
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    """Everything a worker process holds: one HTTP transport per region, the stores, the
    circuit breaker. Built in `on_startup`, closed in `on_shutdown`."""

    def __init__(self, settings: Settings, redis: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = Registry(redis, cipher_for(settings))
        self.history = History(redis, settings)
        self.health = Health(redis, self.registry, settings)
        self.queue = Queue(redis, settings.queue_name)
        self.batcher = Batcher(redis)
        self.breaker = CircuitBreaker(settings.circuit_threshold, settings.circuit_cooldown)
        self.policies = {region: policy_for(settings, region) for region in Region}
        self.transports: dict[Region, httpx.AsyncBaseTransport] = {
            region: make_transport(settings, region) for region in Region
        }
        schedule_s = sum(settings.retry_schedule)
        self.progress_ttl = int(max(86_400, 2 * schedule_s))
        # attempts by (epoch minute, outcome), flushed to Redis every few seconds
        self.stats: collections.Counter[tuple[int, str]] = collections.Counter()

    async def flush_stats(self) -> None:
        """Add the counted attempts to the per-minute hashes `dispatcher status` reads."""
        counts, self.stats = self.stats, collections.Counter()
        if not counts:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (minute, outcome), n in counts.items():
                    pipe.hincrby(keys.stats(minute), outcome, n)
                    pipe.expire(keys.stats(minute), STATS_TTL_S)
                await pipe.execute()
        except _REDIS_ERRORS:
            self.stats.update(counts)  # keep them for the next flush
            raise

    async def close(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self.transports.values()))
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.flush_stats()

    async def fan_out(self, event: dict[str, Any], *, job_try: int = 1) -> int:
        """First attempt of every delivery of `event`; returns how many callbacks matched."""
        project_id, name = event["projectId"], event["event"]
        (rows,) = await self.batcher.execute(
            lambda pipe: self.registry.queue_match(pipe, project_id, name)
        )
        targets = self.registry.targets(rows)
        if not targets:
            return 0
        body = encode_body(event["event"], event.get("data") or {})  # once for all callbacks
        deliveries = [
            Delivery(
                delivery_id=(did := f"{event['id']}.{target.id}"),
                progress_id=did,
                event_id=event["id"],
                project_id=event["projectId"],
                event=event["event"],
                body=body,
                callback_id=target.id,
            )
            for target in targets
        ]
        if job_try > 1:  # a re-run after a crash: skip what was already handled
            done = await self.redis.mget([keys.delivery(d.progress_id) for d in deliveries])
            pending = [(d, t) for d, t, m in zip(deliveries, targets, done, strict=True) if not m]
        else:
            pending = list(zip(deliveries, targets, strict=True))
        jobs = [self.attempt(d, t, 1, first=True) for d, t in pending]
        if len(jobs) == 1:
            await jobs[0]
        else:
            await asyncio.gather(*jobs)
        return len(targets)

    async def deliver(self, delivery: Delivery) -> None:
        """A retry (or a redelivery): one more attempt, then arq `Retry` if need be."""
        progress, target = await asyncio.gather(
            self.redis.get(keys.delivery(delivery.progress_id)),
            self.registry.target(delivery.callback_id),
        )
        if progress == DONE:
            return
        if target is None:
            log.info(
                "delivery.dropped",
                delivery_id=delivery.delivery_id,
                callback_id=delivery.callback_id,
                reason="callback deleted or disabled",
            )
            return
        attempt = int(progress or 0) + 1
        delay = await self.attempt(delivery, target, attempt, first=False)
        if delay is not None:
            raise Retry(defer=delay)

    async def attempt(
        self, delivery: Delivery, target: CallbackTarget, attempt: int, *, first: bool
    ) -> float | None:
        """One attempt, recorded. Returns the delay before the next one, or None when the
        delivery is over (or, from a fan-out, when its `deliver` job has been queued)."""
        host = urlsplit(target.url).netloc
        if wait := self.breaker.wait(host):
            if first:  # not an attempt: hand it to a deliver job that starts after the wait
                await self.queue.enqueue(
                    DELIVER, delivery.job_payload(), job_id=delivery.progress_id, defer_s=wait
                )
                return None
            return wait

        headers = request_headers(
            event=delivery.event,
            delivery_id=delivery.delivery_id,
            body=delivery.body,
            token=target.secret_token,
            user_agent=self.settings.user_agent,
        )
        result = await self._send(target, delivery.body, headers)
        self.breaker.record(host, result.outcome is not Outcome.RETRY)
        delay = None
        if result.outcome is Outcome.RETRY:
            delay = next_delay(
                self.settings.retry_schedule,
                attempt,
                jitter=self.settings.retry_jitter,
                retry_after=result.retry_after,
                retry_after_cap=self.settings.retry_after_cap,
            )
        final = delay is None
        await self._record(delivery, target, attempt, headers, result, final, first, delay)
        self._observe(delivery, target, attempt, result, delay)
        self.stats[(_now_ms() // 60_000, result.outcome.value)] += 1
        if result.outcome is Outcome.GONE:
            metrics.CALLBACKS_DISABLED.labels(reason="gone").inc()
            await self.health.disable(target.id, "the receiver answered 410 Gone")
        elif final and result.outcome is not Outcome.SUCCESS:
            if await self.health.failed(target.id, result.error or "failed"):
                metrics.CALLBACKS_DISABLED.labels(reason="failing").inc()
        return None if first else delay

    async def _send(
        self, target: CallbackTarget, body: bytes, headers: dict[str, str]
    ) -> AttemptResult:
        policy = self.policies[target.region]
        try:
            # Literal addresses, ports and metadata names: the resolver never sees them.
            policy.check_url(target.url)
            if target.region in self.settings.region_proxies:
                # Through a proxy the proxy resolves the host: check the address ourselves.
                await policy.check_resolved(target.url)
        except InvalidUrl as exc:
            now = _now_ms()
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

    async def _record(
        self,
        delivery: Delivery,
        target: CallbackTarget,
        attempt: int,
        headers: dict[str, str],
        result: AttemptResult,
        final: bool,
        first: bool,
        delay: float | None,
    ) -> None:
        body_text, body_truncated = truncate(
            delivery.body.decode(errors="replace"), self.settings.max_request_body
        )
        ok = result.outcome is Outcome.SUCCESS
        created = _now_ms()
        record = {
            "projectId": delivery.project_id,
            "callBackUrl": target.url,
            "events": delivery.event,
            "status": (DeliveryStatus.SUCCESS if ok else DeliveryStatus.FAILED).value,
            "errorMsg": result.error,
            "requestHeaders": mask_headers(headers),
            "requestBody": body_text,
            "responseCode": result.status_code,
            "responseBody": result.response_body,
            "startTime": result.started_ms,
            "endTime": result.ended_ms,
            "createdTime": created,
            "attempt": attempt,
            "deliveryId": delivery.delivery_id,
            "eventId": delivery.event_id,
            "callbackId": target.id,
            "durationMs": result.duration_ms,
            "final": final,
            "requestBodyTruncated": body_truncated,
            "redeliveryOf": delivery.redelivery_of,
        }

        def write(pipe: Pipeline) -> None:
            # all idempotent but the record, which runs once (see Batcher.execute)
            self.history.record(pipe, record, dead=final and not ok)
            pipe.set(
                keys.delivery(delivery.progress_id),
                DONE if final else str(attempt),
                ex=self.progress_ttl,
            )
            if ok and target.failing:
                self.health.succeeded(pipe, target.id)
            if first and delay is not None:
                self.queue.push(
                    pipe, DELIVER, delivery.job_payload(), job_id=delivery.progress_id,
                    defer_s=delay,
                )  # fmt: skip

        await self.batcher.execute(write)

    @staticmethod
    def _observe(
        delivery: Delivery,
        target: CallbackTarget,
        attempt: int,
        result: AttemptResult,
        delay: float | None,
    ) -> None:
        metrics.DELIVERIES.labels(outcome=result.outcome.value, event=delivery.event).inc()
        metrics.ATTEMPT_SECONDS.observe(result.duration_ms / 1000)
        metrics.HISTORY_RECORDS.inc()
        if delay is not None:
            metrics.RETRIES.inc()
        log.info(
            "delivery.attempt",
            event_id=delivery.event_id,
            delivery_id=delivery.delivery_id,
            callback_id=target.id,
            callback_url=target.url,
            project_id=delivery.project_id,
            event_type=delivery.event,
            attempt=attempt,
            outcome=result.outcome.value,
            status_code=result.status_code,
            duration_ms=result.duration_ms,
            error=result.error,
            retry_in_s=None if delay is None else round(delay, 3),
        )


def _redis_retry(ctx: dict[str, Any], exc: Exception) -> Retry:
    delay = min(60.0, 0.5 * 2 ** min(ctx.get("job_try", 1), 7))
    log.warning("job.redis_unavailable", job_id=ctx.get("job_id"), retry_in_s=delay, error=str(exc))
    return Retry(defer=delay)


def _check_event(event: Any) -> dict[str, Any]:
    """A fan-out payload as the producer writes it; ValueError for anything else."""
    if not isinstance(event, dict) or not isinstance(event.get("data", {}), dict):
        raise ValueError("event payload is not an object with an object `data`")
    for name in ("id", "projectId", "event"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise ValueError(f"event payload has no string {name!r}")
    return event


def _poison(ctx: dict[str, Any], function: str, exc: Exception) -> None:
    """An undecodable job is logged with its id and dropped, never retried forever."""
    log.error("job.poison", job_id=ctx.get("job_id"), function=function, error=repr(exc))


async def fan_out_job(ctx: dict[str, Any], event: Any) -> int:
    engine: Engine = ctx["engine"]
    try:
        event = _check_event(event)
    except ValueError as exc:
        _poison(ctx, FAN_OUT, exc)
        return 0
    structlog.contextvars.bind_contextvars(event_id=event["id"])
    try:
        return await engine.fan_out(event, job_try=ctx.get("job_try", 1))
    except _REDIS_ERRORS as exc:
        raise _redis_retry(ctx, exc) from exc
    finally:
        structlog.contextvars.clear_contextvars()


async def deliver_job(ctx: dict[str, Any], payload: Any) -> None:
    engine: Engine = ctx["engine"]
    try:
        delivery = Delivery.from_job(payload, ctx.get("job_id", ""))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        _poison(ctx, DELIVER, exc)
        return
    try:
        await engine.deliver(delivery)
    except _REDIS_ERRORS as exc:
        raise _redis_retry(ctx, exc) from exc


async def poison_job(ctx: dict[str, Any], problem: str, raw: str) -> None:
    """Jobs the deserializer could not read land here: recorded for operators, dropped."""
    redis: ArqRedis = ctx["redis"]
    entry = orjson.dumps({"jobId": ctx.get("job_id"), "problem": problem, "raw": raw,
                          "at": _now_ms()})  # fmt: skip
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.POISON_JOBS, entry)
        pipe.ltrim(keys.POISON_JOBS, 0, 999)
        await pipe.execute()
    metrics.POISON_JOBS.inc()
    log.error("job.poison", job_id=ctx.get("job_id"), problem=problem)


async def _heartbeat(engine: Engine, key: str, started: int) -> None:
    """Tell `dispatcher status` and `dispatcher worker --check` this process is alive, and
    flush the attempt statistics."""
    while True:
        value = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": started, "seen": _now_ms()})  # fmt: skip
        try:
            await engine.redis.set(key, value, ex=int(HEARTBEAT_S * 6))
            await engine.flush_stats()
        except _REDIS_ERRORS as exc:
            log.warning("worker.heartbeat_failed", error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)


async def sweep_history_job(ctx: dict[str, Any]) -> int:
    engine: Engine = ctx["engine"]
    # Bounded so that the job ends well within its timeout; the next run goes on.
    removed = await engine.history.sweep(max_seconds=engine.settings.effective_job_timeout / 2)
    log.info("history.swept", removed=removed)
    return removed


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["engine"] = Engine(settings, ctx["redis"])
    ctx["heartbeat_key"] = key = keys.worker(socket.gethostname(), os.getpid())
    ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx["engine"], key, _now_ms()))
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.api_host)
    log.info("worker.started", queue=settings.queue_name, max_jobs=settings.worker_max_jobs)


async def _shutdown(ctx: dict[str, Any]) -> None:
    engine: Engine | None = ctx.get("engine")
    if engine is not None:
        await engine.close()
    heartbeat: asyncio.Task[None] | None = ctx.get("heartbeat")
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        with contextlib.suppress(*_REDIS_ERRORS):
            await ctx["redis"].delete(ctx["heartbeat_key"])
    log.info("worker.stopped")


def worker_settings(settings: Settings, redis_url: str | None = None) -> dict[str, Any]:
    """arq Worker keyword arguments for `settings`."""
    url = redis_url or settings.redis_url
    if url is None:
        raise RuntimeError("no Redis URL: start EmbeddedRedis first or set DISPATCHER_REDIS_URL")
    job_timeout = settings.effective_job_timeout
    functions: list[Function] = [
        # We count attempts ourselves; arq's tries only bound Redis outages and crashes.
        func(fan_out_job, name=FAN_OUT, timeout=job_timeout, keep_result=0, max_tries=1000),
        func(deliver_job, name=DELIVER, timeout=job_timeout, keep_result=0, max_tries=1000),
        func(poison_job, name=POISON, timeout=job_timeout, keep_result=0, max_tries=3),
    ]
    return {
        "functions": functions,
        "cron_jobs": [
            cron(
                sweep_history_job,
                name="sweep_history",
                minute=set(range(0, 60, 5)),
                unique=True,
                timeout=job_timeout,  # every timeout bounds how soon a crashed job runs again
                keep_result=0,
            ),
        ],
        "redis_settings": redis_settings(url),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "poll_delay": settings.poll_delay,
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": {"settings": settings},
        "keep_result": 0,
        "job_completion_wait": int(settings.shutdown_grace),
        "health_check_interval": 10,
        "log_results": False,
    }


def create_worker(settings: Settings, redis_url: str | None = None, **overrides: Any) -> Worker:
    """An arq Worker for `settings`; `overrides` (e.g. `burst=True`) win."""
    return Worker(**{**worker_settings(settings, redis_url), **overrides})
