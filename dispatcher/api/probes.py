"""Liveness, readiness and the Prometheus scrape (outside the gateway token)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher import metrics
from dispatcher.api.deps import ServicesDep
from dispatcher.api.errors import envelope
from dispatcher.connections import REDIS_ERRORS
from dispatcher.status import count_live_workers

if TYPE_CHECKING:
    from dispatcher.services import Services

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Redis answers; 503 otherwise."""
    try:
        await services.redis.ping()
    except REDIS_ERRORS as exc:
        return envelope(503, f"Redis unreachable: {exc}")
    return JSONResponse({"data": "ready", "message": None, "status": 0})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_route(services: ServicesDep) -> Response:
    """Prometheus metrics of this process, plus the fleet's: the queue's depth and age, the
    history backlog, live workers and Redis' memory. Answered even when Redis is not
    (`dispatcher_redis_up 0`; the fleet's gauges keep their last values)."""
    try:
        await _fleet_gauges(services)
    except REDIS_ERRORS:
        metrics.REDIS_UP.set(0)
    else:
        metrics.REDIS_UP.set(1)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _fleet_gauges(services: Services) -> None:
    depth, age = await services.queue.depth()
    metrics.QUEUE_DEPTH.set(depth)
    metrics.QUEUE_OLDEST_SECONDS.set(age)
    waiting, oldest = await services.history.backlog()
    metrics.HISTORY_BACKLOG.set(waiting)
    metrics.HISTORY_BACKLOG_AGE.set(oldest)
    metrics.WORKERS_LIVE.set(await count_live_workers(services.redis))
    memory = await services.redis.info("memory")
    metrics.REDIS_USED_MEMORY.set(int(memory.get("used_memory", 0)))
    metrics.REDIS_MAX_MEMORY.set(int(memory.get("maxmemory", 0)))
