"""The job loop: arq's Worker runs `fan_out`, `deliver` and the history sweep."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from arq import Retry, cron
from arq.worker import Function, Worker, func

from dispatcher import keys, metrics
from dispatcher.connections import REDIS_ERRORS, redis_settings
from dispatcher.jobs import (
    DELIVER,
    FAN_OUT,
    POISON,
    BadJob,
    DeliveryJob,
    EventJob,
    job_deserializer,
    job_serializer,
    now_ms,
)
from dispatcher.services import Services
from dispatcher.worker.engine import Engine

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["create_worker", "worker_settings"]

log = structlog.get_logger("dispatcher.worker")

HEARTBEAT_S = 5.0


def _redis_retry(ctx: dict[str, Any], exc: BaseException) -> Retry:
    delay = min(60.0, 0.5 * 2 ** min(ctx.get("job_try", 1), 7))
    log.warning("job.redis_unavailable", job_id=ctx.get("job_id"), retry_in_s=delay, error=str(exc))
    return Retry(defer=delay)


def _poison(ctx: dict[str, Any], function: str, exc: Exception) -> None:
    """An undecodable job is logged with its id and dropped, never retried forever."""
    log.error("job.poison", job_id=ctx.get("job_id"), function=function, error=repr(exc))


async def fan_out_job(ctx: dict[str, Any], payload: Any) -> int:
    engine: Engine = ctx["engine"]
    try:
        event = EventJob.from_wire(payload)
    except BadJob as exc:
        _poison(ctx, FAN_OUT, exc)
        return 0
    structlog.contextvars.bind_contextvars(event_id=event.id)
    try:
        return await engine.fan_out(event, rerun=ctx.get("job_try", 1) > 1)
    except REDIS_ERRORS as exc:
        raise _redis_retry(ctx, exc) from exc
    finally:
        structlog.contextvars.clear_contextvars()


async def deliver_job(ctx: dict[str, Any], payload: Any) -> None:
    engine: Engine = ctx["engine"]
    try:
        job = DeliveryJob.from_wire(payload, ctx.get("job_id", ""))
    except BadJob as exc:
        _poison(ctx, DELIVER, exc)
        return
    try:
        delay = await engine.deliver(job)
    except REDIS_ERRORS as exc:
        raise _redis_retry(ctx, exc) from exc
    if delay is not None:
        raise Retry(defer=delay)


async def poison_job(ctx: dict[str, Any], problem: str, raw: str) -> None:
    """Jobs the deserializer could not read land here: recorded for operators, dropped."""
    services: Services = ctx["services"]
    entry = orjson.dumps({"jobId": ctx.get("job_id"), "problem": problem, "raw": raw,
                          "at": now_ms()})  # fmt: skip
    async with services.redis.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.POISON_JOBS, entry)
        pipe.ltrim(keys.POISON_JOBS, 0, 999)
        await pipe.execute()
    metrics.POISON_JOBS.inc()
    log.error("job.poison", job_id=ctx.get("job_id"), problem=problem)


async def _heartbeat(engine: Engine, key: str, started: int) -> None:
    """Tell `dispatcher status` and `dispatcher worker --check` this process is alive, and
    flush the attempt statistics."""
    redis = engine.services.redis
    while True:
        value = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": started, "seen": now_ms()})  # fmt: skip
        try:
            await redis.set(key, value, ex=int(HEARTBEAT_S * 6))
            await engine.stats.flush(redis)
        except REDIS_ERRORS as exc:
            log.warning("worker.heartbeat_failed", error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)


async def sweep_history_job(ctx: dict[str, Any]) -> int:
    services: Services = ctx["services"]
    # Bounded so that the job ends well within its timeout; the next run goes on.
    removed = await services.history.sweep(max_seconds=services.settings.effective_job_timeout / 2)
    log.info("history.swept", removed=removed)
    return removed


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["services"] = services = Services(settings, ctx["redis"])
    ctx["engine"] = engine = Engine(services)
    ctx["heartbeat_key"] = key = keys.worker(socket.gethostname(), os.getpid())
    ctx["heartbeat"] = asyncio.create_task(_heartbeat(engine, key, now_ms()))
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.api_host)
    log.info("worker.started", queue=settings.queue_name, max_jobs=settings.worker_max_jobs)


async def _shutdown(ctx: dict[str, Any]) -> None:
    engine: Engine | None = ctx.get("engine")
    if engine is not None:
        await engine.close()
        with contextlib.suppress(*REDIS_ERRORS):
            await engine.stats.flush(engine.services.redis)
    heartbeat: asyncio.Task[None] | None = ctx.get("heartbeat")
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        with contextlib.suppress(*REDIS_ERRORS):
            await ctx["redis"].delete(ctx["heartbeat_key"])
    log.info("worker.stopped")


def worker_settings(settings: Settings, redis_url: str | None = None) -> dict[str, Any]:
    """arq Worker keyword arguments for `settings`."""
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
        "redis_settings": redis_settings(settings, redis_url),
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
