"""Liveness, readiness and the Prometheus scrape (outside the gateway token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatcher import metrics
from dispatcher.api.deps import RouterDep
from dispatcher.api.errors import envelope
from dispatcher.connections import REDIS_ERRORS
from dispatcher.shards import views

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(router: RouterDep) -> JSONResponse:
    """Redis answers; 503 otherwise."""
    for services in router.shards:
        try:
            await services.redis.ping()
        except REDIS_ERRORS as exc:
            where = f" (shard {services.shard.index})" if router.sharded else ""
            return envelope(503, f"Redis unreachable{where}: {exc}")
    return JSONResponse({"data": "ready", "message": None, "status": 0})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_route(router: RouterDep) -> Response:
    """Prometheus metrics of this process, plus the fleet's: the queue's depth and age, the
    history backlog, live workers and Redis' memory. Answered even when Redis is not
    (`dispatcher_redis_up 0`; the fleet's gauges keep their last values)."""
    try:
        await views.fleet_gauges(router)
    except REDIS_ERRORS:
        metrics.REDIS_UP.set(0)
    else:
        metrics.REDIS_UP.set(1)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
