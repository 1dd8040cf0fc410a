"""Callbacks: the two seed registration routes and their neighbours, defined once and
served for a project (`/{apigwType}/v4/projects/{projectId}/callbacks`), for one of its
pipelines (`pipelines.py`) and for the platform (`platform.py`, operator token)."""

# No `from __future__ import annotations` here: the routes are defined inside a function,
# and FastAPI must see their parameter types (local aliases) as objects, not names.
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, params

from dispatcher.api.deps import (
    Admin,
    Member,
    PageQuery,
    PageSizeQuery,
    ProjectPath,
    RegistrationQuery,
    RouterDep,
    Scope,
    apigw,
)
from dispatcher.models import Callback, CallbackPage, CreateCallBackResult, Event, Result
from dispatcher.services import DEFAULT_OVERLAP_HOURS, MAX_OVERLAP_HOURS

__all__ = ["V4", "callback_routes", "router"]

V4 = "/{apigwType}/v4/projects/{projectId}"
CallbackPath = Annotated[int, Path(alias="callbackId")]
# A dependency: who the route manages the callbacks of, or who the caller is once allowed.
ScopeOf = Callable[..., Coroutine[Any, Any, Scope]]
Allowed = Callable[..., Coroutine[Any, Any, str]]


def callback_routes(
    prefix: str,
    tag: str,
    scope_of: ScopeOf,
    admin: Allowed,
    member: Allowed,
    *,
    switches: bool = True,
    dependencies: Sequence[params.Depends] = (),
) -> APIRouter:
    """The callback routes at `prefix` for one kind of scope: register (one event or a
    batch), list, delete; and show, enable and disable unless `switches` is False. `admin`
    and `member` are the dependencies that let a caller change or only look."""
    router = APIRouter(prefix=prefix, dependencies=dependencies, tags=[tag])
    ScopeDep = Annotated[Scope, Depends(scope_of)]
    AdminDep = Annotated[str, Depends(admin)]
    MemberDep = Annotated[str, Depends(member)]

    @router.post("", response_model=Result[bool])
    async def create_callback(
        router: RouterDep,
        scope: ScopeDep,
        uid: AdminDep,
        event: Annotated[Event, Query(alias="event")],
        to: RegistrationQuery,
    ) -> Result[bool]:
        """Register a callback. An upsert on (url, event): registering again updates the
        region, token, auth header and receiver controls, and re-enables it."""
        await router.callbacks(scope.project_id).register(
            scope.project_id, to.url, event, to.region, to.secret_token, creator=uid,
            pipeline_id=scope.pipeline_id, auth_header=to.auth_header, options=to.options,
        )  # fmt: skip
        return Result[bool](data=True)

    @router.post("/batch", response_model=Result[CreateCallBackResult])
    async def create_callbacks_batch(
        router: RouterDep,
        scope: ScopeDep,
        uid: AdminDep,
        event: Annotated[str, Query(alias="event", description="Comma-separated event names")],
        to: RegistrationQuery,
    ) -> Result[CreateCallBackResult]:
        """Register one URL for several events; unknown names land in `failureEvents`."""
        result = await router.callbacks(scope.project_id).register_batch(
            scope.project_id, to.url, event, to.region, to.secret_token, creator=uid,
            pipeline_id=scope.pipeline_id, auth_header=to.auth_header, options=to.options,
        )  # fmt: skip
        return Result[CreateCallBackResult](data=result)

    @router.get("", response_model=Result[CallbackPage])
    async def list_callbacks(
        router: RouterDep,
        scope: ScopeDep,
        uid: MemberDep,
        page: PageQuery = 1,
        page_size: PageSizeQuery = 20,
    ) -> Result[CallbackPage]:
        """The callbacks, oldest first, each with its level (secrets never included)."""
        found = await router.callbacks(scope.project_id, changing=False).callbacks(
            scope.project_id, page, page_size, pipeline_id=scope.pipeline_id
        )
        return Result[CallbackPage](data=found)

    @router.delete("/{callbackId:int}", response_model=Result[bool])
    async def delete_callback(
        router: RouterDep, scope: ScopeDep, uid: AdminDep, callback_id: CallbackPath
    ) -> Result[bool]:
        """Delete a callback."""
        await router.callbacks(scope.project_id).delete(
            callback_id, scope.project_id, pipeline_id=scope.pipeline_id
        )
        return Result[bool](data=True)

    @router.post("/{callbackId:int}/secret", response_model=Result[Callback])
    async def rotate_secret(
        router: RouterDep,
        scope: ScopeDep,
        uid: AdminDep,
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
        found = await router.callbacks(scope.project_id).rotate_secret(
            callback_id,
            scope.project_id,
            secret_token,
            overlap_hours,
            pipeline_id=scope.pipeline_id,
        )
        return Result[Callback](data=found)

    if switches:
        _add_switches(router, ScopeDep, AdminDep, MemberDep)
    return router


def _add_switches(router: APIRouter, ScopeDep: Any, AdminDep: Any, MemberDep: Any) -> None:
    """Show, enable and disable one callback by id."""

    @router.get("/{callbackId:int}", response_model=Result[Callback])
    async def get_callback(
        router: RouterDep, scope: ScopeDep, uid: MemberDep, callback_id: CallbackPath
    ) -> Result[Callback]:
        """One callback, with its level and its disabled reason if any."""
        return Result[Callback](
            data=await router.callbacks(scope.project_id, changing=False).callback(
                callback_id, scope.project_id
            )
        )

    @router.put("/{callbackId:int}/enable", response_model=Result[bool])
    async def enable_callback(
        router: RouterDep, scope: ScopeDep, uid: AdminDep, callback_id: CallbackPath
    ) -> Result[bool]:
        """Enable a callback again (also one the service disabled); clears the reason."""
        await router.callbacks(scope.project_id).enable(callback_id, project_id=scope.project_id)
        return Result[bool](data=True)

    @router.put("/{callbackId:int}/disable", response_model=Result[bool])
    async def disable_callback(
        router: RouterDep,
        scope: ScopeDep,
        uid: AdminDep,
        callback_id: CallbackPath,
        reason: Annotated[str | None, Query(alias="reason", max_length=500)] = None,
    ) -> Result[bool]:
        """Disable a callback, with an optional reason shown in the list."""
        await router.callbacks(scope.project_id).disable(
            callback_id, by=uid, reason=reason, project_id=scope.project_id
        )
        return Result[bool](data=True)


async def project_scope(project_id: ProjectPath) -> Scope:
    return Scope(project_id)


async def _admin(uid: Admin) -> str:
    return uid


async def _member(uid: Member) -> str:
    return uid


router = callback_routes(
    f"{V4}/callbacks", "callbacks", project_scope, _admin, _member, dependencies=[Depends(apigw)]
)
