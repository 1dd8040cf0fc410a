"""The app factory: the API's routers, the console, and `/docs` and `/redoc` with their
Swagger UI and ReDoc files served by the app (from the `fastapi-offline` package), so the
docs work on an intranet."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI
from fastapi_offline import FastAPIOffline

from dispatcher import __version__, console
from dispatcher.api import (
    callbacks,
    catalogue,
    events,
    history,
    operator,
    pipelines,
    platform,
    probes,
)
from dispatcher.api.errors import install_error_handlers
from dispatcher.api.middleware import Limits, RequestId
from dispatcher.api.pacing import EmitPace
from dispatcher.history import heal
from dispatcher.shards.router import Router

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.settings import Settings

__all__ = ["create_app"]

DOCS_STATIC = "/docs-static"


def create_app(settings: Settings, redis: Redis | None = None) -> FastAPI:
    """The API for `settings`. With `redis` given, the app uses (and does not close) it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The history schema upgraded once PostgreSQL answers (`dispatcher.history.heal`).
        async with Router.open(settings, redis) as router, heal.keeping(settings):
            await router.upgrade()
            app.state.router = router
            app.state.emit_pace = EmitPace.of(settings)
            yield

    app = FastAPIOffline(
        static_url=DOCS_STATIC,
        title="callback-dispatcher",
        version=__version__,
        description="Register callbacks per project and event; query their delivery history.",
        lifespan=lifespan,
        # Metrics are Prometheus' (/metrics); FastAPI's OpenTelemetry hooks would only look
        # for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    # The last added is the outermost: the request id wraps the limits' refusals too.
    batch_limit = {events.BATCH_PATH: settings.emit_batch_max_bytes}
    app.add_middleware(Limits, settings=settings, body_limits=batch_limit)
    app.add_middleware(RequestId)
    # Routes are matched in order: the producers', which take the volume, come first.
    app.include_router(events.router(settings))
    share_routes(app, (*FIXED_ROUTERS, *console.ROUTERS))
    console.install(app, settings)
    return app


# The routers whose routes are the same in every app (they read the app's state per request).
FIXED_ROUTERS = (
    callbacks.router,
    pipelines.router,
    *history.routers,
    operator.router,
    platform.router,
    catalogue.router,
    probes.router,
)


def share_routes(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """Serve `routers`' routes from `app` as they are, built once for every app of the
    process. `include_router` builds a router's routes again for each app it is included
    in (FastAPI analyses every endpoint's parameters again, on the app's first request:
    about 50 ms of CPU for the API's); the fixed routes need nothing of the app. (So
    `app.dependency_overrides` does not reach them; nothing here uses it.)"""
    for router in routers:
        app.router.routes.extend(router.routes)
