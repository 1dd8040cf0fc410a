"""Callbacks of a project: the two seed registration routes and their neighbours."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from dispatcher.api.deps import (
    Admin,
    Member,
    PageQuery,
    PageSizeQuery,
    ProjectPath,
    RegionQuery,
    ServicesDep,
    TokenQuery,
    UrlQuery,
    apigw,
)
from dispatcher.models import Callback, CallbackPage, CreateCallBackResult, Event, Result

__all__ = ["V4", "router"]

V4 = "/{apigwType}/v4/projects/{projectId}"
CallbackPath = Annotated[int, Path(alias="callbackId")]

router = APIRouter(prefix=f"{V4}/callbacks", dependencies=[Depends(apigw)], tags=["callbacks"])


@router.post("", response_model=Result[bool])
async def create_callback(
    services: ServicesDep,
    project_id: ProjectPath,
    uid: Admin,
    event: Annotated[Event, Query(alias="event")],
    url: UrlQuery,
    region: RegionQuery,
    secret_token: TokenQuery = None,
) -> Result[bool]:
    """Register a callback (project admins). An upsert on (project, url, event):
    registering again updates region and token and re-enables it."""
    await services.register(project_id, url, event, region, secret_token, creator=uid)
    return Result[bool](data=True)


@router.post("/batch", response_model=Result[CreateCallBackResult])
async def create_callbacks_batch(
    services: ServicesDep,
    project_id: ProjectPath,
    uid: Admin,
    event: Annotated[str, Query(alias="event", description="Comma-separated event names")],
    url: UrlQuery,
    region: RegionQuery,
    secret_token: TokenQuery = None,
) -> Result[CreateCallBackResult]:
    """Register one URL for several events; unknown names land in `failureEvents`."""
    result = await services.register_batch(
        project_id, url, event, region, secret_token, creator=uid
    )
    return Result[CreateCallBackResult](data=result)


@router.get("", response_model=Result[CallbackPage])
async def list_callbacks(
    services: ServicesDep,
    project_id: ProjectPath,
    uid: Member,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[CallbackPage]:
    """The project's callbacks, oldest first (secret tokens never included)."""
    return Result[CallbackPage](data=await services.callbacks(project_id, page, page_size))


@router.get("/{callbackId:int}", response_model=Result[Callback])
async def get_callback(
    services: ServicesDep, project_id: ProjectPath, uid: Member, callback_id: CallbackPath
) -> Result[Callback]:
    """One callback, with its disabled reason if any."""
    return Result[Callback](data=await services.registry.get(callback_id, project_id))


@router.delete("/{callbackId:int}", response_model=Result[bool])
async def delete_callback(
    services: ServicesDep, project_id: ProjectPath, uid: Admin, callback_id: CallbackPath
) -> Result[bool]:
    """Delete a callback (project admins)."""
    await services.registry.delete(project_id, callback_id)
    return Result[bool](data=True)


@router.put("/{callbackId:int}/enable", response_model=Result[bool])
async def enable_callback(
    services: ServicesDep, project_id: ProjectPath, uid: Admin, callback_id: CallbackPath
) -> Result[bool]:
    """Enable a callback again (also one the service disabled); clears the reason."""
    await services.enable(callback_id, project_id=project_id)
    return Result[bool](data=True)


@router.put("/{callbackId:int}/disable", response_model=Result[bool])
async def disable_callback(
    services: ServicesDep,
    project_id: ProjectPath,
    uid: Admin,
    callback_id: CallbackPath,
    reason: Annotated[str | None, Query(alias="reason", max_length=500)] = None,
) -> Result[bool]:
    """Disable a callback, with an optional reason shown in the list."""
    await services.disable(callback_id, by=uid, reason=reason, project_id=project_id)
    return Result[bool](data=True)
