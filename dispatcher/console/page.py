"""What every console page shares: the templates (autoescaped), the caller and their role,
the CSRF token, the security headers, and errors shown as pages.

The caller is the API's: `X-DEVOPS-UID` as the gateway sets it, the same role store. Only
under `open_access` (`dispatcher run`) may a browser without the header act, as
`anonymous`, since a person cannot set a header from the address bar.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import structlog
from fastapi import Depends, Form, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.responses import HTMLResponse, RedirectResponse, Response

import dispatcher.path_ids  # noqa: F401  # the `id` path convertor, before the routes
from dispatcher.auth import ALL_PROJECTS, Role
from dispatcher.console.csrf import FIELD, Csrf
from dispatcher.errors import DispatcherError, TooManyRequests, Unauthenticated
from dispatcher.history import format_ms
from dispatcher.services import Services
from dispatcher.shards.router import Router
from dispatcher.stats import duration

__all__ = [
    "ANONYMOUS",
    "AdminForm",
    "AnyPage",
    "ConsoleRoute",
    "EveryProjectPage",
    "MemberPage",
    "Page",
    "ProjectPath",
    "Templates",
    "redirect",
]

log = structlog.get_logger("dispatcher.console")

ANONYMOUS = "anonymous"
PREFIX = "/console"
ProjectPath = Annotated[str, Path(alias="projectId", min_length=1, max_length=128)]
SECURITY_HEADERS = {
    # no script at all; styles and images from the app only; forms post to the app only
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# What a redirect after a form may announce: fixed texts, so a link cannot make the page
# say anything else.
NOTICES = {
    "enabled": "Callback enabled; its failure count starts again.",
    "disabled": "Callback disabled.",
    "redelivered": "Redelivery queued: the new attempt is listed under this delivery's "
    "attempts once a worker has sent it.",
    "queued": "{n} failed deliveries of this window were queued again.",
    "none-queued": "No delivery of this window had finally failed: nothing was queued.",
    "window": "{n} failed deliveries of this window were queued again; {again} already "
    "queued by an earlier call, not again; left out: {cut} whose request body was not kept "
    "whole (cut, or lost), {gone} whose callback is disabled or deleted.",
    "registered": "Registered for {n} event(s).",
    "rotated": "Secret rotated: the new token is in use; see the list for how long the old "
    "one still signs.",
}

_COUNTS = ("n", "again", "cut", "gone")  # the numbers a notice may show (digits only)

# what the layout shows of the caller when a page knows nothing of them (an error page)
_NOBODY = {
    "uid": None,
    "project": None,
    "role": None,
    "is_admin": False,
    "open_access": False,
    "sees_status": False,
    "notice": None,
    "section": None,
    "timezone": "",
}


class Templates:
    """The Jinja environment of one app: autoescaping on, undefined names an error, and
    the filters the pages use."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.env = Environment(
            loader=PackageLoader("dispatcher.console", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = lambda ms: "" if ms is None else format_ms(ms, tz)
        self.env.filters["duration"] = duration
        self.env.filters["seg"] = lambda value: quote(str(value), safe="")
        self.env.filters["query"] = lambda params: urlencode(
            {k: v for k, v in params.items() if v not in (None, "")}
        )

    def render(
        self, request: Request, name: str, context: Mapping[str, Any], status_code: int = 200
    ) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        html = self.env.get_template(name).render(
            {
                **_NOBODY,
                "root": root,
                "base": root + PREFIX,
                "static": f"{root}{PREFIX}/static",
                **context,
            }
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def _templates(request: Request) -> Templates:
    templates: Templates = request.app.state.console_templates
    return templates


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


RouterDep = Annotated[Router, Depends(_router)]


async def _caller(
    router: RouterDep,
    uid: Annotated[str | None, Header(alias="X-DEVOPS-UID")] = None,
) -> str:
    if uid and uid.strip():
        return uid.strip()
    if router.settings.open_access:
        return ANONYMOUS
    raise Unauthenticated(
        "no X-DEVOPS-UID header: open the console through the gateway, which names you"
    )


Caller = Annotated[str, Depends(_caller)]


@dataclass
class Page:
    """One request of a console page: who asks, their role in the page's project (if
    any), and how the page is rendered."""

    request: Request
    router: Router
    uid: str
    project_id: str | None = None
    role: Role | None = None

    @property
    def services(self) -> Services:
        """The services of the page's project's shard (the home shard's, for none)."""
        return self.router.of(self.project_id) if self.project_id else self.router.home

    @property
    def writing(self) -> Services:
        """`services`, to change the project's callbacks (refused while it moves)."""
        return self.router.writing(self.project_id or "")

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def _notice(self) -> str | None:
        params = self.request.query_params
        text = NOTICES.get(params.get("notice", ""))
        if not text:
            return None
        counts = {name: params.get(name, "") for name in _COUNTS}
        return text.format(
            **{
                k: v if v.isascii() and v.isdigit() and len(v) < 10 else "Some"
                for k, v in counts.items()
            }
        )

    async def render(
        self, name: str, title: str, section: str | None = None, **context: Any
    ) -> HTMLResponse:
        """The template with the page's common context; `title` names where the user is."""
        home = self.router.home
        csrf = Csrf(self.request, home.redis, home.keys, self.uid)
        notice = self._notice()
        response = _templates(self.request).render(
            self.request,
            name,
            {
                "title": title,
                "section": section,
                "uid": self.uid,
                "project": self.project_id,
                "role": self.role.value if self.role else None,
                "is_admin": self.is_admin,
                "open_access": self.services.settings.open_access,
                # the status page's link, for those it lets in (`EveryProjectPage`)
                "sees_status": await home.roles.effective(ALL_PROJECTS, self.uid) is not None,
                "csrf_field": FIELD,
                "csrf_token": await csrf.token(),
                "notice": notice,
                "timezone": self.services.settings.timezone,
                **context,
            },
        )
        csrf.set_cookie(response, self.request.scope.get("root_path", "") + PREFIX)
        return response


async def _any_page(request: Request, router: RouterDep, uid: Caller) -> Page:
    return Page(request, router, uid)


async def _every_project_page(request: Request, router: RouterDep, uid: Caller) -> Page:
    """A page of the whole service (every project's lanes, failing callbacks, workers): for
    a member of every project (a role on `*`), as the operator's views are."""
    await router.home.roles.require(ALL_PROJECTS, uid, Role.MEMBER)
    return Page(request, router, uid)


async def _member_page(
    request: Request, router: RouterDep, uid: Caller, project_id: ProjectPath
) -> Page:
    role = await router.of(project_id).roles.require(project_id, uid, Role.MEMBER)
    return Page(request, router, uid, project_id, role)


async def _admin_form(
    request: Request,
    router: RouterDep,
    uid: Caller,
    project_id: ProjectPath,
    token: Annotated[str, Form(alias=FIELD)] = "",
) -> Page:
    """A state-changing form: its CSRF token first, then the admin role."""
    await Csrf(request, router.home.redis, router.home.keys, uid).check(token)
    role = await router.of(project_id).roles.require(project_id, uid, Role.ADMIN)
    return Page(request, router, uid, project_id, role)


AnyPage = Annotated[Page, Depends(_any_page)]
EveryProjectPage = Annotated[Page, Depends(_every_project_page)]
MemberPage = Annotated[Page, Depends(_member_page)]
AdminForm = Annotated[Page, Depends(_admin_form)]


def redirect(page: Page, path: str, **params: str | int | None) -> RedirectResponse:
    """303 to a console page (after a form), with its query."""
    root = page.request.scope.get("root_path", "")
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return RedirectResponse(f"{root}{PREFIX}{path}" + (f"?{query}" if query else ""), 303)


def _problem(exc: RequestValidationError) -> str:
    parts = [f"'{error['loc'][-1]}': {error['msg']}" for error in exc.errors() if error["loc"]]
    return "bad parameter " + "; ".join(parts) if parts else "invalid request"


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    titles = {
        400: "Bad request",
        401: "Who are you?",
        403: "Not allowed",
        404: "Not found",
        429: "Too many requests",
        503: "Storage unreachable",
    }
    context = {"title": titles.get(status, "Error"), "status": status, "message": message}
    return _templates(request).render(request, "error.html", context, status)


class ConsoleRoute(APIRoute):
    """A console route: the service's errors become pages with the same HTTP code and
    message as the API's envelope, not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def as_page(request: Request) -> Response:
            try:
                return await handler(request)
            except DispatcherError as exc:
                page = error_page(request, exc.http_status, exc.message)
                if isinstance(exc, TooManyRequests):  # when to send it again, as the API's
                    page.headers.update(exc.headers)
                return page
            except RequestValidationError as exc:
                return error_page(request, 400, _problem(exc))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("console.redis_unavailable", path=request.url.path, error=str(exc))
                return error_page(request, 503, "storage (Redis) is unreachable; retry soon")

        return as_page
