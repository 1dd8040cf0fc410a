"""The event catalogue: `GET /{apigwType}/v4/callbacks/events`, for anyone with an
identity (it names no project)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from dispatcher.api.deps import Caller, apigw
from dispatcher.catalogue import CATALOGUE
from dispatcher.models import EventInfo, Result

__all__ = ["router"]

router = APIRouter(tags=["events"], dependencies=[Depends(apigw)])


@router.get("/{apigwType}/v4/callbacks/events", response_model=Result[list[EventInfo]])
async def event_catalogue(uid: Caller) -> Result[list[EventInfo]]:
    """The 18 events: where a callback may subscribe to each (`levels`), what it is about,
    what emits it and when, and an example of its `data`."""
    return Result[list[EventInfo]](data=CATALOGUE)
