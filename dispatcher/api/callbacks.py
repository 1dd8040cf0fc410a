"""Callbacks: the two seed registration routes and their neighbours, defined once and
served at three levels: a project's (`/{apigwType}/v4/projects/{projectId}/callbacks`, here),
one of its pipelines' (`pipelines.py`) and the platform's (`platform.py`, operator token).

Each route is a function of this module. Its `access` parameter is `Changes` when it needs a
caller who may change the level's callbacks and `Looks` when looking is enough;
`callback_routes` mounts the routes at one level, with that level's dependencies in those
two places (the `deps.Access` dependencies)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Depends, Path, Query, params

from dispatcher.api.deps import (
    Access,
    PageQuery,
    PageSizeQuery,
    RegistrationQuery,
    RouterDep,
    apigw,
    project_admin,
    project_member,
)
from dispatcher.models import Callback, CallbackPage, CreateCallBackResult, Event, Result
from dispatcher.services import DEFAULT_OVERLAP_HOURS, MAX_OVERLAP_HOURS

__all__ = [
    "V4",
    "Changes",
    "Looks",
    "callback_routes",
    "create_callback",
    "create_callbacks_batch",
    "delete_callback",
    "disable_callback",
    "enable_callback",
    "get_callback",
    "list_callbacks",
    "rotate_secret",
    "router",
]

V4 = "/{apigwType}/v4/projects/{projectId}"
CallbackPath = Annotated[int, Path(alias="callbackId")]
# A level's dependency: whose callbacks a route manages and who asks, once allowed.
AccessOf = Callable[..., Awaitable[Access]]


async def changes() -> Access:
    """Where a route needs a caller who may change the level's callbacks."""
    raise RuntimeError("a callback route serves only as `callback_routes` mounts it")


async def looks() -> Access:
    """Where a route needs a caller who may look at the level's callbacks."""
    raise RuntimeError("a callback route serves only as `callback_routes` mounts it")


Changes = Annotated[Access, Depends(changes)]
Looks = Annotated[Access, Depends(looks)]


async def create_callback(
    router: RouterDep,
    access: Changes,
    event: Annotated[Event, Query(alias="event")],
    to: RegistrationQuery,
) -> Result[bool]:
    """Register a callback. An upsert on (url, event): registering again updates the
    region, token, auth header and receiver controls, and re-enables it."""
    registration = to.of(access)
    await router.callbacks(registration.project_id).register(registration, event)
    return Result[bool](data=True)


async def create_callbacks_batch(
    router: RouterDep,
    access: Changes,
    event: Annotated[str, Query(alias="event", description="Comma-separated event names")],
    to: RegistrationQuery,
) -> Result[CreateCallBackResult]:
    """Register one URL for several events; unknown names land in `failureEvents`."""
    registration = to.of(access)
    result = await router.callbacks(registration.project_id).register_batch(registration, event)
    return Result[CreateCallBackResult](data=result)


async def list_callbacks(
    router: RouterDep,
    access: Looks,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[CallbackPage]:
    """The callbacks, oldest first, each with its level (secrets never included)."""
    project_id, pipeline_id = access.scope
    found = await router.callbacks(project_id, changing=False).callbacks(
        project_id, page, page_size, pipeline_id=pipeline_id
    )
    return Result[CallbackPage](data=found)


async def delete_callback(
    router: RouterDep, access: Changes, callback_id: CallbackPath
) -> Result[bool]:
    """Delete a callback."""
    project_id, pipeline_id = access.scope
    await router.callbacks(project_id).delete(callback_id, project_id, pipeline_id=pipeline_id)
    return Result[bool](data=True)


async def rotate_secret(
    router: RouterDep,
    access: Changes,
    callback_id: CallbackPath,
    secret_token: Annotated[
        str, Query(alias="secretToken", min_length=1, description="The new token")
    ],
    overlap_hours: Annotated[
        float,
        Query(
            alias="overlapHours",
            ge=0,
            le=MAX_OVERLAP_HOURS,
            description="Hours the old token keeps signing beside the new one",
        ),
    ] = DEFAULT_OVERLAP_HOURS,
) -> Result[Callback]:
    """Rotate the callback's secret token: from now on the token header carries the new
    one and `webhook-signature` a signature with each (new first) until the overlap
    ends. Returns the callback, with `rotationEndTime`."""
    project_id, pipeline_id = access.scope
    found = await router.callbacks(project_id).rotate_secret(
        callback_id, project_id, secret_token, overlap_hours, pipeline_id=pipeline_id
    )
    return Result[Callback](data=found)


async def get_callback(
    router: RouterDep, access: Looks, callback_id: CallbackPath
) -> Result[Callback]:
    """One callback, with its level and its disabled reason if any."""
    project_id = access.scope.project_id
    found = await router.callbacks(project_id, changing=False).callback(callback_id, project_id)
    return Result[Callback](data=found)


async def enable_callback(
    router: RouterDep, access: Changes, callback_id: CallbackPath
) -> Result[bool]:
    """Enable a callback again (also one the service disabled); clears the reason."""
    project_id = access.scope.project_id
    await router.callbacks(project_id).enable(callback_id, project_id=project_id)
    return Result[bool](data=True)


async def disable_callback(
    router: RouterDep,
    access: Changes,
    callback_id: CallbackPath,
    reason: Annotated[str | None, Query(alias="reason", max_length=500)] = None,
) -> Result[bool]:
    """Disable a callback, with an optional reason shown in the list."""
    project_id = access.scope.project_id
    await router.callbacks(project_id).disable(
        callback_id, by=access.uid, reason=reason, project_id=project_id
    )
    return Result[bool](data=True)


class Route(NamedTuple):
    method: str
    path: str
    endpoint: Callable[..., Awaitable[Any]]


# Every level has these; `switches` adds the rest.
ROUTES = [
    Route("POST", "", create_callback),
    Route("POST", "/batch", create_callbacks_batch),
    Route("GET", "", list_callbacks),
    Route("DELETE", "/{callbackId:id}", delete_callback),
    Route("POST", "/{callbackId:id}/secret", rotate_secret),
]
SWITCHES = [
    Route("GET", "/{callbackId:id}", get_callback),
    Route("PUT", "/{callbackId:id}/enable", enable_callback),
    Route("PUT", "/{callbackId:id}/disable", disable_callback),
]


def callback_routes(
    prefix: str,
    tag: str,
    change: AccessOf,
    look: AccessOf,
    *,
    switches: bool = True,
    dependencies: Sequence[params.Depends] = (),
) -> APIRouter:
    """The callback routes at `prefix` for one level: register (one event or a batch),
    list, delete, rotate a secret; and show, enable and disable unless `switches` is False.
    `change` and `look` are the level's dependencies in the routes' `Changes` and `Looks`."""
    router = APIRouter(prefix=prefix, dependencies=dependencies, tags=[tag])
    for method, path, endpoint in ROUTES + (SWITCHES if switches else []):
        router.add_api_route(path, _at_level(endpoint, change, look), methods=[method])
    return router


def _at_level(
    endpoint: Callable[..., Awaitable[Any]], change: AccessOf, look: AccessOf
) -> Callable[..., Awaitable[Any]]:
    """`endpoint` as FastAPI is to see it at one level: its `access` parameter served by
    `change` or `look` (FastAPI reads a route's dependencies from its signature)."""
    signature = inspect.signature(endpoint, eval_str=True)
    access = signature.parameters["access"]
    level = change if access.annotation is Changes else look
    at_level = access.replace(annotation=Annotated[Access, Depends(level)])

    @functools.wraps(endpoint)
    async def route(**values: Any) -> Any:
        return await endpoint(**values)

    route.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[at_level if p.name == "access" else p for p in signature.parameters.values()]
    )
    return route


router = callback_routes(
    f"{V4}/callbacks", "callbacks", project_admin, project_member, dependencies=[Depends(apigw)]
)
