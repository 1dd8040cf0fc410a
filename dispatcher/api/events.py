"""Emitting events over HTTP, for producers that are not Python."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from dispatcher.api.callbacks import V4
from dispatcher.api.deps import Admin, ProjectPath, ServicesDep, apigw
from dispatcher.models import EmitRequest, EmitResult, Result

__all__ = ["router"]

router = APIRouter(prefix=V4, dependencies=[Depends(apigw)], tags=["events"])


@router.post("/events", response_model=Result[EmitResult])
async def emit_event(
    services: ServicesDep, project_id: ProjectPath, uid: Admin, body: EmitRequest
) -> Result[EmitResult]:
    """Emit an event; returns at once with its id (delivery happens later)."""
    event_id = await services.producer.emit(
        project_id, body.event.value, body.data, event_id=body.event_id
    )
    return Result[EmitResult](data=EmitResult(event_id=event_id, queued=True))
