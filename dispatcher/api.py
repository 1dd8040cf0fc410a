"""The HTTP API: the seed routes to the letter, their neighbours in the same envelope.

Every error leaves through one handler as `{data: null, message, status}` with the HTTP
code as `status`: 400 bad input, 401 no identity, 403 not allowed, 404 unknown id,
413 too large, 503 Redis unreachable.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, cast

import orjson
import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatcher import metrics
from dispatcher.auth import Role, Roles
from dispatcher.egress import policy_for
from dispatcher.errors import (
    DispatcherError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
)
from dispatcher.history import History, parse_window
from dispatcher.models import (
    ApigwType,
    Callback,
    CallbackPage,
    CreateCallBackResult,
    EmitRequest,
    EmitResult,
    Event,
    HistoryPage,
    Region,
    Result,
)
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.redis import connect
from dispatcher.registry import Registry, parse_event, validate_url
from dispatcher.tokens import cipher_for

if TYPE_CHECKING:
    from arq.connections import ArqRedis

    from dispatcher.settings import Settings

__all__ = ["create_app"]

log = structlog.get_logger("dispatcher.api")

V4 = "/{apigwType}/v4/projects/{projectId}"
V3_HISTORY = "/ms/openapi/api/apigw/v3/projects/{projectId}/callbacks/history"
MAX_BODY_BYTES = 1024 * 1024
MAX_QUERY_BYTES = 8 * 1024
UNGATED = frozenset({"/healthz", "/readyz", "/metrics"})

ApigwPath = Annotated[
    ApigwType, Path(alias="apigwType", description="apigw-user, apigw-app or apigw")
]
ProjectPath = Annotated[str, Path(alias="projectId", min_length=1, max_length=128)]
UrlQuery = Annotated[str, Query(alias="url", description="The callback URL")]
RegionQuery = Annotated[Region, Query(alias="region")]
TokenQuery = Annotated[
    str | None,
    Query(alias="secretToken", description="Sent back in X-DEVOPS-WEBHOOK-TOKEN; never shown"),
]
# Bounded so that the offset, (page - 1) * pageSize, fits Redis' 64-bit integers.
MAX_PAGE = 1_000_000_000
PageQuery = Annotated[
    int, Query(alias="page", ge=1, le=MAX_PAGE, description="Page number, from 1")
]
PageSizeQuery = Annotated[
    int, Query(alias="pageSize", ge=1, description="Page size, capped at 100")
]


def _envelope(status: int, message: str) -> JSONResponse:
    return JSONResponse({"data": None, "message": message, "status": status}, status_code=status)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own answers (no such route, method not allowed, unreadable body), in the
    envelope too; their headers (Allow) kept."""
    exc = cast(StarletteHTTPException, error)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = _envelope(exc.status_code, message)
    response.headers.update(exc.headers or {})
    return response


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where, name = (loc[0], loc[-1]) if len(loc) > 1 else ("request", "".join(loc))
        if where == "body":
            where, name = "body field", ".".join(loc[1:]) or "body"
        if error.get("type") == "missing":
            parts.append(f"{where} parameter '{name}' is required")
        else:
            parts.append(f"{where} parameter '{name}': {error.get('msg')}")
    return "; ".join(parts) or "invalid request"


router = APIRouter()


def _state(request: Request) -> Any:
    return request.app.state


async def caller(
    uid: Annotated[str | None, Header(alias="X-DEVOPS-UID", description="User name")] = None,
) -> str:
    """The calling user, from the gateway's X-DEVOPS-UID header (401 when absent)."""
    if not uid or not uid.strip():
        raise Unauthenticated("header X-DEVOPS-UID is required (the calling user's name)")
    return uid.strip()


Caller = Annotated[str, Depends(caller)]


async def require(request: Request, project_id: str, uid: str, role: Role) -> None:
    await _state(request).roles.require(project_id, uid, role)


async def check_target(request: Request, url: str, region: Region) -> None:
    """The region's address policy for a URL to register, DNS included."""
    await policy_for(_state(request).settings, region).check_resolved(validate_url(url))


# ---- the seed routes -------------------------------------------------------------


@router.post(f"{V4}/callbacks", response_model=Result[bool], tags=["callbacks"])
async def create_callback(
    request: Request,
    apigw_type: ApigwPath,
    project_id: ProjectPath,
    uid: Caller,
    event: Annotated[Event, Query(alias="event")],
    url: UrlQuery,
    region: RegionQuery,
    secret_token: TokenQuery = None,
) -> Result[bool]:
    """Register a callback (project admins). An upsert on (project, url, event):
    registering again updates region and token and re-enables it."""
    await require(request, project_id, uid, Role.ADMIN)
    await check_target(request, url, region)
    await _state(request).registry.create(project_id, url, event, region, secret_token, creator=uid)
    return Result[bool](data=True)


@router.post(
    f"{V4}/callbacks/batch", response_model=Result[CreateCallBackResult], tags=["callbacks"]
)
async def create_callbacks_batch(
    request: Request,
    apigw_type: ApigwPath,
    project_id: ProjectPath,
    uid: Caller,
    event: Annotated[str, Query(alias="event", description="Comma-separated event names")],
    url: UrlQuery,
    region: RegionQuery,
    secret_token: TokenQuery = None,
) -> Result[CreateCallBackResult]:
    """Register one URL for several events; unknown names land in `failureEvents`."""
    await require(request, project_id, uid, Role.ADMIN)
    await check_target(request, url, region)
    result = await _state(request).registry.create_batch(
        project_id, url, event, region, secret_token, creator=uid
    )
    return Result[CreateCallBackResult](data=result)


async def history_page(
    request: Request,
    project_id: str,
    uid: str,
    url: str,
    event: str,
    start_time: str | None,
    end_time: str | None,
    page: int,
    page_size: int,
) -> Result[HistoryPage]:
    await require(request, project_id, uid, Role.MEMBER)
    name = parse_event(event).value
    start_ms, end_ms = parse_window(start_time, end_time, _state(request).settings.tz)
    result = await _state(request).history.query(
        project_id, url, name, start_ms=start_ms, end_ms=end_ms, page=page,
        page_size=page_size,
    )  # fmt: skip
    return Result[HistoryPage](data=result)


@router.get(V3_HISTORY, response_model=Result[HistoryPage], tags=["history"])
async def callback_history(
    request: Request,
    project_id: ProjectPath,
    uid: Caller,
    url: UrlQuery,
    event: Annotated[str, Query(alias="event")],
    start_time: Annotated[str | None, Query(alias="startTime")] = None,
    end_time: Annotated[str | None, Query(alias="endTime")] = None,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[HistoryPage]:
    """Delivery attempts of one (url, event), newest first. Times are
    `yyyy-MM-dd HH:mm:ss` in the configured time zone, inclusive; default: today."""
    return await history_page(
        request, project_id, uid, url, event, start_time, end_time, page, page_size
    )


@router.get(f"{V4}/callbacks/history", response_model=Result[HistoryPage], tags=["history"])
async def callback_history_v4(
    request: Request,
    apigw_type: ApigwPath,
    project_id: ProjectPath,
    uid: Caller,
    url: UrlQuery,
    event: Annotated[str, Query(alias="event")],
    start_time: Annotated[str | None, Query(alias="startTime")] = None,
    end_time: Annotated[str | None, Query(alias="endTime")] = None,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[HistoryPage]:
    """The history route under the v4 prefix; same parameters and answer."""
    return await history_page(
        request, project_id, uid, url, event, start_time, end_time, page, page_size
    )


# ---- neighbours ------------------------------------------------------------------


async def redeliver(request: Request, project_id: str, uid: str, record_id: int) -> Result[str]:
    await require(request, project_id, uid, Role.ADMIN)
    record = await _state(request).history.get(record_id, project_id)
    job_id = await _state(request).producer.redeliver(record)
    return Result[str](data=job_id)


@router.post(
    f"{V4}/callbacks/history/{{id:int}}/retry", response_model=Result[str], tags=["history"]
)
async def redeliver_v4(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    record_id: Annotated[int, Path(alias="id")],
) -> Result[str]:  # fmt: skip
    """Send a recorded request again (project admins): same body and delivery id,
    the callback's current token, new history records. Returns the job id."""
    return await redeliver(request, project_id, uid, record_id)


@router.post(f"{V3_HISTORY}/{{id:int}}/retry", response_model=Result[str], tags=["history"])
async def redeliver_v3(
    request: Request, project_id: ProjectPath, uid: Caller,
    record_id: Annotated[int, Path(alias="id")],
) -> Result[str]:  # fmt: skip
    """The redelivery route under the v3 history prefix."""
    return await redeliver(request, project_id, uid, record_id)


@router.get(f"{V4}/callbacks", response_model=Result[CallbackPage], tags=["callbacks"])
async def list_callbacks(
    request: Request,
    apigw_type: ApigwPath,
    project_id: ProjectPath,
    uid: Caller,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[CallbackPage]:
    """The project's callbacks, oldest first (secret tokens never included)."""
    await require(request, project_id, uid, Role.MEMBER)
    size = min(page_size, _state(request).settings.history_max_page_size)
    result = await _state(request).registry.list(project_id, page, size)
    return Result[CallbackPage](data=result)


@router.get(
    f"{V4}/callbacks/{{callbackId:int}}", response_model=Result[Callback], tags=["callbacks"]
)
async def get_callback(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    callback_id: Annotated[int, Path(alias="callbackId")],
) -> Result[Callback]:  # fmt: skip
    """One callback, with its disabled reason if any."""
    await require(request, project_id, uid, Role.MEMBER)
    return Result[Callback](data=await _state(request).registry.get(callback_id, project_id))


@router.delete(
    f"{V4}/callbacks/{{callbackId:int}}", response_model=Result[bool], tags=["callbacks"]
)
async def delete_callback(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    callback_id: Annotated[int, Path(alias="callbackId")],
) -> Result[bool]:  # fmt: skip
    """Delete a callback (project admins)."""
    await require(request, project_id, uid, Role.ADMIN)
    await _state(request).registry.delete(project_id, callback_id)
    return Result[bool](data=True)


@router.put(
    f"{V4}/callbacks/{{callbackId:int}}/enable",
    response_model=Result[bool],
    tags=["callbacks"],
)
async def enable_callback(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    callback_id: Annotated[int, Path(alias="callbackId")],
) -> Result[bool]:  # fmt: skip
    """Enable a callback again (also one the service disabled); clears the reason."""
    await require(request, project_id, uid, Role.ADMIN)
    await _state(request).registry.set_enabled(callback_id, True, project_id=project_id)
    return Result[bool](data=True)


@router.put(
    f"{V4}/callbacks/{{callbackId:int}}/disable",
    response_model=Result[bool],
    tags=["callbacks"],
)
async def disable_callback(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    callback_id: Annotated[int, Path(alias="callbackId")],
    reason: Annotated[str | None, Query(alias="reason", max_length=500)] = None,
) -> Result[bool]:  # fmt: skip
    """Disable a callback, with an optional reason shown in the list."""
    await require(request, project_id, uid, Role.ADMIN)
    await _state(request).registry.set_enabled(
        callback_id, False, reason or f"disabled by {uid}", project_id=project_id
    )
    return Result[bool](data=True)


@router.post(f"{V4}/events", response_model=Result[EmitResult], tags=["events"])
async def emit_event(
    request: Request, apigw_type: ApigwPath, project_id: ProjectPath, uid: Caller,
    body: EmitRequest,
) -> Result[EmitResult]:  # fmt: skip
    """Emit an event for producers that are not Python; returns at once with its id."""
    await require(request, project_id, uid, Role.ADMIN)
    try:  # what the queue's JSON cannot hold (integers beyond 64 bits, deep nesting)
        orjson.dumps(body.data)
    except orjson.JSONEncodeError as exc:
        raise InvalidInput(f"body field 'data' cannot be queued: {exc}", param="data") from None
    event_id = await _state(request).producer.emit(
        project_id, body.event.value, body.data, event_id=body.event_id
    )
    metrics.EVENTS_EMITTED.inc()
    return Result[EmitResult](data=EmitResult(event_id=event_id, queued=True))


async def operator(
    request: Request,
    token: Annotated[
        str | None, Header(alias="X-DEVOPS-OPERATOR-TOKEN", description="Operator token")
    ] = None,
) -> None:
    """Role management is for operators: DISPATCHER_OPERATOR_TOKEN, compared in constant time."""
    expected = _state(request).settings.operator_token
    if expected is None:
        raise Forbidden("role management over HTTP is off: set DISPATCHER_OPERATOR_TOKEN")
    if not token or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Unauthenticated("missing or wrong X-DEVOPS-OPERATOR-TOKEN")


Operator = Annotated[None, Depends(operator)]
ROLES = "/operator/roles/{projectId}"


@router.get(ROLES, response_model=Result[dict[str, Role]], tags=["operations"])
async def list_roles(
    request: Request, project_id: ProjectPath, _: Operator
) -> Result[dict[str, Role]]:
    """Who has which role in a project (`*`: every project)."""
    return Result[dict[str, Role]](data=await _state(request).roles.list(project_id))


@router.put(ROLES + "/{user}", response_model=Result[bool], tags=["operations"])
async def grant_role(
    request: Request,
    project_id: ProjectPath,
    _: Operator,
    user: Annotated[str, Path(min_length=1, max_length=128)],
    role: Annotated[Role, Query(alias="role")],
) -> Result[bool]:
    """Make `user` admin or member of a project."""
    await _state(request).roles.grant(project_id, user, role)
    return Result[bool](data=True)


@router.delete(ROLES + "/{user}", response_model=Result[bool], tags=["operations"])
async def revoke_role(
    request: Request,
    project_id: ProjectPath,
    _: Operator,
    user: Annotated[str, Path(min_length=1, max_length=128)],
) -> Result[bool]:
    """Take `user`'s role in a project away."""
    if not await _state(request).roles.revoke(project_id, user):
        raise NotFound(f"user {user!r} has no role in project {project_id!r}")
    return Result[bool](data=True)


# ---- operations ------------------------------------------------------------------


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"])
async def readyz(request: Request) -> JSONResponse:
    """Redis answers; 503 otherwise."""
    try:
        await _state(request).redis.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        return _envelope(503, f"Redis unreachable: {exc}")
    return JSONResponse({"data": "ready", "message": None, "status": 0})


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def metrics_route(request: Request) -> Response:
    """Prometheus metrics of this process, plus the queue's depth."""
    depth, age = await _state(request).queue.depth()
    metrics.QUEUE_DEPTH.set(depth)
    metrics.QUEUE_OLDEST_SECONDS.set(age)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# Starlette passes each handler the exception class it was registered for.
async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    exc = cast(DispatcherError, error)
    return _envelope(exc.http_status, exc.message)


async def _bad_request(request: Request, error: Exception) -> JSONResponse:
    return _envelope(400, _validation_message(cast(RequestValidationError, error)))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("api.redis_unavailable", path=request.url.path, error=str(exc))
    return _envelope(503, "storage (Redis) is unreachable; retry in a few seconds")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("api.error", path=request.url.path)
    return _envelope(500, f"internal error ({type(exc).__name__}); see the service log")


async def _request_id(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Every log line of a request carries its id; the answer names it too."""
    request_id = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:64]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await call_next(request)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers["X-Request-ID"] = request_id
    return response


async def _limits(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Size limits, and the gateway token when one is configured."""
    if len(request.url.query) > MAX_QUERY_BYTES:
        return _envelope(400, f"query string longer than {MAX_QUERY_BYTES} bytes")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _envelope(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    token = _state(request).settings.gateway_token
    # Probes and the Prometheus scrape come from inside the cluster, not the gateway.
    if token is not None and request.url.path not in UNGATED:
        given = request.headers.get("x-devops-gateway-token", "")
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return _envelope(401, "missing or wrong X-DEVOPS-GATEWAY-TOKEN")
    return await call_next(request)


def create_app(settings: Settings, redis: ArqRedis | None = None) -> FastAPI:
    """The API for `settings`. With `redis` given, the app uses (and does not close) it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = redis or await connect(settings)
        app.state.redis = pool
        app.state.registry = Registry(pool, cipher_for(settings))
        app.state.history = History(pool, settings)
        app.state.producer = Producer(settings, pool)
        app.state.queue = Queue(pool, settings.queue_name)
        app.state.roles = Roles(pool, settings)
        try:
            yield
        finally:
            if redis is None:
                await pool.aclose()

    app = FastAPI(
        title="callback-dispatcher",
        version="0.1.0",
        description="Register callbacks per project and event; query their delivery history.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_exception_handler(DispatcherError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
    app.middleware("http")(_request_id)
    app.middleware("http")(_limits)
    app.include_router(router)
    return app
