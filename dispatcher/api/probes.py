"""Liveness, readiness and the Prometheus scrape (outside the gateway token)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from dispatcher import metrics
from dispatcher.api.deps import RouterDep
from dispatcher.api.errors import envelope
from dispatcher.connections import NO_ANSWER, REDIS_ERRORS
from dispatcher.shards import gauges

__all__ = ["READY_BOUND", "router"]

router = APIRouter(tags=["operations"])

# The longest /readyz takes (seconds): each shard's PING within it, every shard at once. Every
# readiness probe's timeout in deploy/ exceeds it (tests/repo/test_deploy.py). Not
# `DISPATCHER_REDIS_TIMEOUT` (5 s): one frozen shard made /readyz answer past the Kubernetes
# probe's 3 s, and every API pod went NotReady (review).
READY_BOUND = 1.5


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(router: RouterDep) -> JSONResponse:
    """Ready while a shard's Redis answers: every shard asked at once, each within
    `READY_BOUND` (or `DISPATCHER_REDIS_TIMEOUT` when shorter), a silent one counted as
    unreachable; 503 when none does. A shard that does not answer is named in
    the message (its projects get 503s from their routes): not-ready on any shard down took
    every API process out of service, the other shards' projects with them (review). The
    message is fixed, no error text: the route answers anyone."""
    bound = min(router.settings.redis_timeout, READY_BOUND)
    answers = await asyncio.gather(*(_answers(s.redis, bound) for s in router.shards))
    down = [s.shard.index for s, up in zip(router.shards, answers, strict=True) if not up]
    if len(down) == len(answers):
        return envelope(503, "Redis unreachable" + (" (every shard)" if router.sharded else ""))
    message = f"Redis unreachable on shard(s) {', '.join(map(str, down))}" if down else None
    return JSONResponse({"data": "ready", "message": message, "status": 0})


async def _answers(redis: Redis, bound: float) -> bool:
    try:
        async with asyncio.timeout(bound):  # not the retries' sum
            return bool(await redis.ping())
    except NO_ANSWER:  # TimeoutError among them; or a refusal (NOAUTH, ...)
        return False


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_route(router: RouterDep) -> Response:
    """Prometheus metrics of this process, plus the fleet's: the queue's depth and age, the
    history backlog, live workers and Redis' memory. Answered even when Redis is not
    (`dispatcher_redis_up 0`; the fleet's gauges keep their last values)."""
    try:
        await gauges.fleet_gauges(router)
    except REDIS_ERRORS:
        metrics.REDIS_UP.set(0)
    else:
        metrics.REDIS_UP.set(1)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
