"""The console's pages (GET): home, a project's callbacks, its history and one attempt in
detail, its dead letters, and the service's status. Each reads through `Services` and
renders a template; none changes anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query
from starlette.responses import HTMLResponse, RedirectResponse

from dispatcher.catalogue import CATALOGUE
from dispatcher.console import charts
from dispatcher.console.page import (
    PREFIX,
    AnyPage,
    ConsoleRoute,
    EveryProjectPage,
    MemberPage,
    ProjectPath,
    redirect,
)
from dispatcher.errors import InvalidInput
from dispatcher.models import Event, Region
from dispatcher.shards import views

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from dispatcher.stats import Series

__all__ = ["router"]

# bounded like the API's, so that the offset fits Redis' integers
PageQuery = Annotated[int, Query(alias="page", ge=1, le=1_000_000_000)]
CALLBACKS_PER_PAGE = 50
PAGE_SIZES = (10, 20, 50, 100)
WINDOWS = {"1h": "the last hour", "1d": "the last day", "all": "the retention"}

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)


@router.get("")
async def home(page: AnyPage) -> HTMLResponse:
    return await page.render("home.html", "Console")


@router.get("/projects")
async def open_project(
    page: AnyPage,
    project_id: Annotated[str, Query(alias="projectId", min_length=1, max_length=128)],
) -> RedirectResponse:
    """The home page's project form lands here."""
    return redirect(page, f"/projects/{quote(project_id.strip(), safe='')}")


@router.get("/projects/{projectId}")
async def callbacks(
    page: MemberPage, project_id: ProjectPath, number: PageQuery = 1
) -> HTMLResponse:
    found = await page.services.callbacks(project_id, number, CALLBACKS_PER_PAGE)
    failures = await page.services.failures([cb.id for cb in found.records])
    return await page.render(
        "callbacks.html",
        f"Callbacks · {project_id}",
        "callbacks",
        callbacks=found,
        failures=failures,
        events=[e.value for e in Event],
        regions=[r.value for r in Region],
    )


@router.get("/events")
async def events(page: AnyPage) -> HTMLResponse:
    """The event catalogue: what each event is, where it can be subscribed, its data."""
    return await page.render("events.html", "Events", "events", catalogue=CATALOGUE)


@router.get("/projects/{projectId}/history")
async def history(
    page: MemberPage,
    project_id: ProjectPath,
    url: Annotated[str, Query(alias="url", max_length=2048)] = "",
    event: Annotated[str, Query(alias="event", max_length=64)] = "",
    start_time: Annotated[str, Query(alias="startTime", max_length=32)] = "",
    end_time: Annotated[str, Query(alias="endTime", max_length=32)] = "",
    number: PageQuery = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=1000)] = 20,
) -> HTMLResponse:
    """The seed's query as a form; the page of records when url and event are given."""
    query = {
        "url": url,
        "event": event,
        "startTime": start_time,
        "endTime": end_time,
        "pageSize": page_size,
    }
    found, problem = None, None
    if url and event:
        try:
            found = await page.services.history_page(
                project_id, url, event, start_time or None, end_time or None, number, page_size
            )
        except InvalidInput as exc:
            problem = exc.message
    known = await page.services.callbacks(project_id, 1, 100)
    response = await page.render(
        "history.html",
        f"History · {project_id}",
        "history",
        query=query,
        found=found,
        problem=problem,
        events=[e.value for e in Event],
        urls=sorted({cb.url for cb in known.records}),
        page_sizes=PAGE_SIZES,
    )
    if problem is not None:
        response.status_code = 400
    return response


@router.get("/projects/{projectId}/history/{id:id}")
async def record(
    page: MemberPage, project_id: ProjectPath, record_id: Annotated[int, Path(alias="id")]
) -> HTMLResponse:
    """One attempt: request and response, timing, and its delivery's other attempts."""
    found = await page.services.get_record(record_id, project_id)
    attempts = await page.services.attempts(found)
    return await page.render(
        "record.html",
        f"Attempt #{record_id} · {project_id}",
        "history",
        record=found,
        attempts=attempts,
    )


@router.get("/projects/{projectId}/deliveries")
async def deliveries(
    page: MemberPage,
    project_id: ProjectPath,
    url: Annotated[str, Query(alias="url", max_length=2048)] = "",
    status: Annotated[str, Query(alias="status", max_length=16)] = "",
    within: Annotated[str, Query(alias="within", max_length=8)] = "all",
    before: Annotated[str, Query(alias="before", max_length=40)] = "",
) -> HTMLResponse:
    """Recent deliveries: one callback URL's attempts across its events, or every URL's
    of the project; by status, within the last hour, day or the retention."""
    query = {"url": url, "status": status.upper(), "within": within}
    found, problem = None, None
    try:
        found = await page.services.recent(
            project_id,
            url=url or None,
            status=status or None,
            within=within,
            before=before or None,
        )
    except InvalidInput as exc:
        problem = exc.message
    known = await page.services.callbacks(project_id, 1, 100)
    failures = query == {"url": "", "status": "FAILED", "within": "1h"}
    response = await page.render(
        "deliveries.html",
        f"{'Failures of the last hour' if failures else 'Recent deliveries'} · {project_id}",
        "failures" if failures else "deliveries",
        query=query,
        found=found,
        problem=problem,
        before=before,
        urls=sorted({cb.url for cb in known.records} | ({url} if url else set())),
        windows=WINDOWS,
    )
    if problem is not None:
        response.status_code = 400
    return response


@router.get("/projects/{projectId}/dead-letters")
async def dead_letters(
    page: MemberPage,
    project_id: ProjectPath,
    limit: Annotated[int, Query(alias="limit", ge=1, le=100)] = 50,
) -> HTMLResponse:
    records = await views.dead_letters(page.router, project_id, limit)
    return await page.render("dead.html", f"Dead letters · {project_id}", "dead", records=records)


@router.get("/status")
async def status(page: EveryProjectPage) -> HTMLResponse:
    """Queue, workers, and the attempts of the last hour and day: the service's, not one
    project's (for a member of `*`: it names every project's blocked lanes)."""
    found = await views.status(page.router)
    tz = page.services.settings.tz
    spans = [_span(found.hour, tz, "hour", "minute"), _span(found.day, tz, "day", "10 minutes")]
    return await page.render(
        "status.html", "Status", "status", status=found, spans=spans, outcomes=charts.OUTCOMES
    )


def _span(series: Series, tz: ZoneInfo, window: str, per: str) -> dict[str, Any]:
    """A span's charts and what the template says of them."""
    return {
        "id": series.span.name,
        "heading": f"Last {window}",
        "window": window,
        "per": per,
        "series": series,
        "attempts": charts.attempts_chart(series, tz, f"Attempts per {per} in the last {window}"),
        "latency": charts.latency_chart(
            series, tz, f"Attempt duration p50 and p99 per {per} in the last {window}"
        ),
    }
