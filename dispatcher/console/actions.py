"""The console's forms (POST): enable and disable a callback, redeliver one attempt or a
window's failed deliveries. Each needs a valid CSRF token and the admin role (`AdminForm`),
calls one `Services` operation, and redirects (303) to the page it came from."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Form, Path
from starlette.responses import RedirectResponse

from dispatcher.console.page import PREFIX, AdminForm, ConsoleRoute, ProjectPath, redirect

__all__ = ["router"]

CallbackPath = Annotated[int, Path(alias="callbackId")]
RecordPath = Annotated[int, Path(alias="id")]
Field = Annotated[str, Form(max_length=2048)]

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)


def _project(project_id: str) -> str:
    return f"/projects/{quote(project_id, safe='')}"


@router.post("/projects/{projectId}/callbacks/{callbackId:int}/enable")
async def enable(
    page: AdminForm, project_id: ProjectPath, callback_id: CallbackPath
) -> RedirectResponse:
    await page.services.enable(callback_id, project_id=project_id)
    return redirect(page, _project(project_id), notice="enabled")


@router.post("/projects/{projectId}/callbacks/{callbackId:int}/disable")
async def disable(
    page: AdminForm,
    project_id: ProjectPath,
    callback_id: CallbackPath,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> RedirectResponse:
    await page.services.disable(
        callback_id, by=page.uid, reason=reason.strip() or None, project_id=project_id
    )
    return redirect(page, _project(project_id), notice="disabled")


@router.post("/projects/{projectId}/history/{id:int}/redeliver")
async def redeliver(
    page: AdminForm,
    project_id: ProjectPath,
    record_id: RecordPath,
    back: Annotated[Literal["record", "dead-letters"], Form()] = "record",
) -> RedirectResponse:
    """Send the recorded request again; back to the attempt, or to the dead letters."""
    await page.services.redeliver(record_id, project_id)
    where = "/dead-letters" if back == "dead-letters" else f"/history/{record_id}"
    return redirect(page, _project(project_id) + where, notice="redelivered")


@router.post("/projects/{projectId}/history/redeliver-failed")
async def redeliver_failed(
    page: AdminForm,
    project_id: ProjectPath,
    url: Field,
    event: Field,
    start_time: Annotated[str, Form(alias="startTime", max_length=32)] = "",
    end_time: Annotated[str, Form(alias="endTime", max_length=32)] = "",
) -> RedirectResponse:
    """Every delivery of the window that finally failed, sent again."""
    queued = await page.services.redeliver_failed(
        project_id, url, event, start_time or None, end_time or None
    )
    return redirect(
        page, _project(project_id) + "/history", url=url, event=event, startTime=start_time,
        endTime=end_time, notice="queued" if queued else "none-queued", n=queued,
    )  # fmt: skip
