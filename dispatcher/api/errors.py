"""The envelope of every error: `{data: null, message, status}` with the HTTP code as
`status`: 400 bad input, 401 no identity, 403 not allowed, 404 unknown id, 409 a limit
reached or an event id naming another event still queued, 413 too large, 503 Redis
unreachable, full or answering "not now", 500 a bug (never a stack trace)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import structlog
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatcher.connections import redis_full, transient_reply
from dispatcher.errors import DispatcherError, TooManyRequests

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

__all__ = ["ANSWER_HEADERS", "REQUEST_ID_KEY", "envelope", "install_error_handlers"]

log = structlog.get_logger("dispatcher.api")

# where the request-id middleware leaves the request's id in the ASGI scope
REQUEST_ID_KEY = "dispatcher.request_id"
REDIS_DOWN = "storage (Redis) is unreachable; retry in a few seconds"
REDIS_FULL = "storage (Redis) is full (maxmemory reached) and refuses writes; retry later"
REDIS_BUSY = "storage (Redis) answers 'not now' (busy, loading, ...); retry in a few seconds"


# What every answer carries unless its route set it (`middleware.RequestId`; a 500 here):
# no other site may frame a page of ours (Swagger UI at /docs: review), nor a browser sniff
# an answer's type.
ANSWER_HEADERS = (
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
)


def envelope(status: int, message: str) -> JSONResponse:
    return JSONResponse({"data": None, "message": message, "status": status}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    """Every problem of a request, each naming where it is and the parameter."""
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


# Starlette passes each handler the exception class it was registered for.
async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    exc = cast(DispatcherError, error)
    response = envelope(exc.http_status, exc.message)
    if isinstance(exc, TooManyRequests):
        response.headers.update(exc.headers)
    return response


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own answers (no such route, method not allowed, unreadable body) and
    the body limit's, in the envelope too; their headers (Allow) kept."""
    exc = cast(StarletteHTTPException, error)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = envelope(exc.status_code, message)
    response.headers.update(exc.headers or {})
    return response


async def _bad_request(request: Request, error: Exception) -> JSONResponse:
    return envelope(400, validation_message(cast(RequestValidationError, error)))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("api.redis_unavailable", path=request.url.path, error=str(exc))
    return envelope(503, REDIS_DOWN)


async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
    """A reply error: one that means "not now" (a full Redis, one busy with a script, ...:
    `connections.transient_reply`) is an outage (503); any other is a bug."""
    if redis_full(exc):
        log.warning("api.redis_full", path=request.url.path, error=str(exc))
        return envelope(503, REDIS_FULL)
    if transient_reply(exc):
        log.warning("api.redis_not_now", path=request.url.path, error=str(exc))
        return envelope(503, REDIS_BUSY)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback; the answer names the request id to look for. It
    leaves through Starlette's outermost middleware, so the id header and `ANSWER_HEADERS`
    are set here (a 500 carried none of the latter: review)."""
    log.exception("api.error", path=request.url.path)
    request_id = request.scope.get(REQUEST_ID_KEY, "")
    response = envelope(500, f"internal error ({type(exc).__name__}); see the service log")
    response.raw_headers.extend(ANSWER_HEADERS)
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DispatcherError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(ResponseError, _redis_refused)
    app.add_exception_handler(Exception, _unexpected)
