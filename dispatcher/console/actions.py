"""The console's forms (POST): register a callback (its receiver controls included),
rotate its secret, enable and disable it, redeliver one attempt or a window's failed
deliveries. Each needs a valid CSRF token and the admin role (`AdminForm`),
calls one `Services` operation, and redirects (303) to the page it came from."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Path
from starlette.responses import RedirectResponse

from dispatcher.api.pacing import PacedRedelivery, PacedWindow, refunded
from dispatcher.console.page import PREFIX, AdminForm, ConsoleRoute, ProjectPath, redirect
from dispatcher.errors import InvalidInput
from dispatcher.models import Region
from dispatcher.registry import Options, Registration
from dispatcher.shards import views

__all__ = ["router"]

CallbackPath = Annotated[int, Path(alias="callbackId")]
RecordPath = Annotated[int, Path(alias="id")]
Field = Annotated[str, Form(max_length=2048)]

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)


def _project(project_id: str) -> str:
    return f"/projects/{quote(project_id, safe='')}"


def _number(value: str, name: str) -> int | None:
    """An optional whole number of a form (blank: not set)."""
    if not value.strip():
        return None
    if not value.strip().isdecimal():
        raise InvalidInput(f"{name} must be a whole number", param=name)
    return int(value)


@router.post("/projects/{projectId}/callbacks")
async def register(
    page: AdminForm,
    project_id: ProjectPath,
    pace: PacedWindow,
    url: Field,
    event: Field,
    region: Annotated[Region, Form()] = Region.DEVNET,
    secret_token: Annotated[str, Form(alias="secretToken", max_length=1024)] = "",
    pipeline_id: Annotated[str, Form(alias="pipelineId", max_length=128)] = "",
    max_per_second: Annotated[str, Form(alias="maxPerSecond", max_length=16)] = "",
    max_in_flight: Annotated[str, Form(alias="maxInFlight", max_length=16)] = "",
    filter_: Annotated[str, Form(alias="filter", max_length=1024)] = "",
    order_by: Annotated[str, Form(alias="orderBy", max_length=256)] = "",
) -> RedirectResponse:
    """Register a URL for one or more events (comma-separated), as the batch route does."""
    options = Options(
        _number(max_per_second, "maxPerSecond"),
        _number(max_in_flight, "maxInFlight"),
        filter_.strip() or None,
        order_by.strip() or None,
    )
    pipeline = pipeline_id.strip() or None
    registration = Registration(
        project_id, url, region, page.uid, secret_token or None, pipeline, options=options
    )
    result = await page.writing.register_batch(registration, event)
    if result.failure_events:
        refused = "; ".join(f"{name}: {why}" for name, why in result.failure_events.items())
        done = ", ".join(result.success_events) or "none"
        raise InvalidInput(f"refused {refused} (registered: {done})", param="event")
    return redirect(page, _project(project_id), notice="registered", n=len(result.success_events))


@router.post("/projects/{projectId}/callbacks/{callbackId:id}/secret")
async def rotate(
    page: AdminForm,
    project_id: ProjectPath,
    callback_id: CallbackPath,
    secret_token: Annotated[str, Form(alias="secretToken", min_length=1, max_length=1024)],
    overlap_hours: Annotated[float, Form(alias="overlapHours", ge=0, le=168)] = 24,
) -> RedirectResponse:
    """Rotate the callback's secret token, the old one signing beside it for a while."""
    await page.writing.rotate_secret(callback_id, project_id, secret_token, overlap_hours)
    return redirect(page, _project(project_id), notice="rotated")


@router.post("/projects/{projectId}/callbacks/{callbackId:id}/enable")
async def enable(
    page: AdminForm, project_id: ProjectPath, callback_id: CallbackPath
) -> RedirectResponse:
    await page.writing.enable(callback_id, project_id=project_id)
    return redirect(page, _project(project_id), notice="enabled")


@router.post("/projects/{projectId}/callbacks/{callbackId:id}/disable")
async def disable(
    page: AdminForm,
    project_id: ProjectPath,
    callback_id: CallbackPath,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> RedirectResponse:
    await page.writing.disable(
        callback_id, by=page.uid, reason=reason.strip() or None, project_id=project_id
    )
    return redirect(page, _project(project_id), notice="disabled")


@router.post("/projects/{projectId}/history/{id:id}/redeliver")
async def redeliver(
    page: AdminForm,
    project_id: ProjectPath,
    paced: PacedRedelivery,
    record_id: RecordPath,
    back: Annotated[str, Form()] = "record",
) -> RedirectResponse:
    """Send the recorded request again; back to the attempt, or to the dead letters.
    (`back` is checked here, where a refusal gives back what the redelivery paid: as a
    `Literal` it was refused after the charge, and kept it: review.)"""
    with refunded(paced):
        if back not in ("record", "dead-letters"):
            raise InvalidInput(f"back: {back!r} is not 'record' or 'dead-letters'")
        await views.redeliver(page.router, project_id, record_id)
    where = "/dead-letters" if back == "dead-letters" else f"/history/{record_id}"
    return redirect(page, _project(project_id) + where, notice="redelivered")


@router.post("/projects/{projectId}/history/redeliver-failed")
async def redeliver_failed(
    page: AdminForm,
    project_id: ProjectPath,
    pace: PacedWindow,
    url: Field,
    event: Field,
    start_time: Annotated[str, Form(alias="startTime", max_length=32)] = "",
    end_time: Annotated[str, Form(alias="endTime", max_length=32)] = "",
) -> RedirectResponse:
    """Every delivery of the window that finally failed, sent again (paced as the API's)."""
    done = await views.redeliver_failed(
        page.router, project_id, url, event, start_time or None, end_time or None, pace=pace
    )
    left = done.already_queued + done.body_not_kept + done.callback_gone
    return redirect(
        page,
        _project(project_id) + "/history",
        url=url,
        event=event,
        startTime=start_time,
        endTime=end_time,
        notice="window" if left else "queued" if done.queued else "none-queued",
        n=done.queued,
        again=done.already_queued,
        cut=done.body_not_kept,
        gone=done.callback_gone,
    )
