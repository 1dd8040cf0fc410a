"""Delivery history: the seed's query, redelivery and dead letters, defined once and
served under the seed's v3 prefix and under v4."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, params

from dispatcher.api.callbacks import V4
from dispatcher.api.deps import (
    Admin,
    HistoryUrlQuery,
    Member,
    PageQuery,
    PageSizeQuery,
    ProjectPath,
    RouterDep,
    apigw,
)
from dispatcher.api.pacing import PacedRedelivery, PacedWindow, refunded
from dispatcher.models import HistoryPage, HistoryRecord, RedeliveryResult, Result
from dispatcher.shards import views

__all__ = ["V3", "routers"]

V3 = "/ms/openapi/api/apigw/v3/projects/{projectId}"
EventQuery = Annotated[str, Query(alias="event")]
StartQuery = Annotated[
    str | None, Query(alias="startTime", description="yyyy-MM-dd HH:mm:ss, inclusive")
]
EndQuery = Annotated[
    str | None, Query(alias="endTime", description="yyyy-MM-dd HH:mm:ss, inclusive")
]

routes = APIRouter(tags=["history"])


@routes.get("/callbacks/history", response_model=Result[HistoryPage])
async def callback_history(
    router: RouterDep,
    project_id: ProjectPath,
    uid: Member,
    url: HistoryUrlQuery,
    event: EventQuery,
    start_time: StartQuery = None,
    end_time: EndQuery = None,
    page: PageQuery = 1,
    page_size: PageSizeQuery = 20,
) -> Result[HistoryPage]:
    """Delivery attempts of one (url, event), newest first. Times are
    `yyyy-MM-dd HH:mm:ss` in the configured time zone, inclusive; default: today."""
    found = await views.history_page(
        router, project_id, url, event, start_time, end_time, page, page_size
    )
    return Result[HistoryPage](data=found)


@routes.post("/callbacks/history/{id:id}/retry", response_model=Result[str])
async def redeliver(
    router: RouterDep,
    project_id: ProjectPath,
    uid: Admin,
    paced: PacedRedelivery,
    record_id: Annotated[int, Path(alias="id")],
) -> Result[str]:
    """Send a recorded request again (project admins): same body and delivery id,
    the callback's current token, new history records. Returns the job id; a 503 while
    the project moves to another shard."""
    with refunded(paced):
        return Result[str](data=await views.redeliver(router, project_id, record_id))


@routes.post("/callbacks/history/retry", response_model=Result[RedeliveryResult])
async def redeliver_failed(
    router: RouterDep,
    project_id: ProjectPath,
    uid: Admin,
    pace: PacedWindow,
    url: HistoryUrlQuery,
    event: EventQuery,
    start_time: StartQuery = None,
    end_time: EndQuery = None,
) -> Result[RedeliveryResult]:
    """Send again every delivery of the window that finally failed (project admins);
    the window has the history query's rules. Returns how many were queued, and how many
    were not and why. Each job queued is paid for from the project's emit share: past it,
    a 429 saying how many were queued; calling again goes on."""
    result = await views.redeliver_failed(
        router, project_id, url, event, start_time, end_time, pace=pace
    )
    return Result[RedeliveryResult](data=result)


@routes.get("/callbacks/history/dead-letters", response_model=Result[list[HistoryRecord]])
async def dead_letters(
    router: RouterDep,
    project_id: ProjectPath,
    uid: Member,
    limit: Annotated[int, Query(alias="limit", ge=1, le=100)] = 50,
) -> Result[list[HistoryRecord]]:
    """The project's latest deliveries that gave up (their final attempt), newest first."""
    return Result[list[HistoryRecord]](data=await views.dead_letters(router, project_id, limit))


def _served_at(prefix: str, dependencies: Sequence[params.Depends] = ()) -> APIRouter:
    router = APIRouter(prefix=prefix, dependencies=dependencies)
    router.include_router(routes)
    return router


routers = [_served_at(V3), _served_at(V4, [Depends(apigw)])]
