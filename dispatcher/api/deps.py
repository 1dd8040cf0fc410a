"""What routes declare: the services, the caller, the role a route needs, the operator
token, who may manage a level's callbacks, and the parameter types the seeds fix."""

from __future__ import annotations

import hmac
from typing import Annotated, NamedTuple

from fastapi import Depends, Header, Path, Query, Request

import dispatcher.path_ids  # noqa: F401  # the `id` path convertor, before the routes
from dispatcher.auth import Role
from dispatcher.errors import Forbidden, Unauthenticated
from dispatcher.headers import MAX_AUTH_HEADER_NAME, MAX_AUTH_HEADER_VALUE, AuthHeader
from dispatcher.models import PLATFORM_PROJECT, ApigwType, Region
from dispatcher.registry import MAX_URL_LENGTH, Options, Registration
from dispatcher.registry.options import MAX_FILTER_LENGTH, MAX_IN_FLIGHT, MAX_PER_SECOND
from dispatcher.services import Services
from dispatcher.shards.router import Router

__all__ = [
    "Access",
    "Admin",
    "AuthHeaderQuery",
    "Caller",
    "HistoryUrlQuery",
    "Member",
    "Operator",
    "OptionsQuery",
    "PageQuery",
    "PageSizeQuery",
    "PipelinePath",
    "ProjectPath",
    "RegionQuery",
    "RegistrationQuery",
    "RouterDep",
    "Scope",
    "Target",
    "TokenQuery",
    "UrlQuery",
    "apigw",
    "pipeline_admin",
    "pipeline_member",
    "platform_operator",
    "project_admin",
    "project_member",
]


# Bounded so that the offset, (page - 1) * pageSize, fits Redis' 64-bit integers.
MAX_PAGE = 1_000_000_000

ProjectPath = Annotated[str, Path(alias="projectId", min_length=1, max_length=128)]
UrlQuery = Annotated[str, Query(alias="url", description="The callback URL")]
# A URL history is asked for: longer than any callback's can be (no version took more than
# 2,048 characters), it can match nothing, and is a 400 rather than a read.
HistoryUrlQuery = Annotated[
    str, Query(alias="url", max_length=MAX_URL_LENGTH, description="The callback URL")
]
RegionQuery = Annotated[Region, Query(alias="region")]
TokenQuery = Annotated[
    str | None,
    Query(alias="secretToken", description="Sent back in X-DEVOPS-WEBHOOK-TOKEN; never shown"),
]
PipelinePath = Annotated[str, Path(alias="pipelineId", min_length=1, max_length=128)]
PageQuery = Annotated[
    int, Query(alias="page", ge=1, le=MAX_PAGE, description="Page number, from 1")
]
PageSizeQuery = Annotated[
    int, Query(alias="pageSize", ge=1, description="Page size, capped at 100")
]


class Scope(NamedTuple):
    """Whose callbacks a route manages: a project's, one pipeline's, or the platform's."""

    project_id: str
    pipeline_id: str | None = None


async def auth_header(
    name: Annotated[
        str | None,
        Query(
            alias="authHeaderName",
            max_length=MAX_AUTH_HEADER_NAME,
            description="A header of the receiver's choosing sent with every delivery, e.g. "
            "Authorization (with authHeaderValue; never shown, masked in history)",
        ),
    ] = None,
    value: Annotated[
        str | None,
        Query(
            alias="authHeaderValue",
            max_length=MAX_AUTH_HEADER_VALUE,
            description="The value of authHeaderName (never shown, masked in history)",
        ),
    ] = None,
) -> AuthHeader | None:
    """The custom auth header of a registration, when it has one."""
    return Services.auth_header(name, value)


AuthHeaderQuery = Annotated[AuthHeader | None, Depends(auth_header)]


async def options(
    max_per_second: Annotated[
        int | None,
        Query(
            alias="maxPerSecond",
            ge=1,
            le=MAX_PER_SECOND,
            description="Deliveries to this callback start at most this often per second, "
            "fleet-wide; the excess waits in the queue (no attempt spent)",
        ),
    ] = None,
    max_in_flight: Annotated[
        int | None,
        Query(
            alias="maxInFlight",
            ge=1,
            le=MAX_IN_FLIGHT,
            description="At most this many requests to this callback at once, fleet-wide",
        ),
    ] = None,
    filter_: Annotated[
        str | None,
        Query(
            alias="filter",
            max_length=MAX_FILTER_LENGTH,
            description="A JMESPath expression over {event, projectId, data}; the event is "
            "delivered only when it is truthy, e.g. data.status == 'FAILED'",
        ),
    ] = None,
    order_by: Annotated[
        str | None,
        Query(
            alias="orderBy",
            description="Ordered delivery: a dotted path into the event's data (buildId, "
            "build.id) or * (one lane); the events of one value reach this callback one after "
            "another, in the order they were emitted",
        ),
    ] = None,
) -> Options:
    """A registration's receiver controls (checked when registered)."""
    return Options(max_per_second, max_in_flight, filter_, order_by)


OptionsQuery = Annotated[Options, Depends(options)]


class Target(NamedTuple):
    """Where a registration sends an event and with what: the seed's query parameters, and
    the receiver controls."""

    url: str
    region: Region
    secret_token: str | None
    auth_header: AuthHeader | None
    options: Options

    def of(self, access: Access) -> Registration:
        """The registration of this target on `access`'s level, by its caller."""
        project_id, pipeline_id = access.scope
        return Registration(
            project_id,
            self.url,
            self.region,
            access.uid,
            self.secret_token,
            pipeline_id,
            self.auth_header,
            self.options,
        )


async def registration(
    url: UrlQuery,
    region: RegionQuery,
    auth_header: AuthHeaderQuery,
    options: OptionsQuery,
    secret_token: TokenQuery = None,
) -> Target:
    return Target(url, region, secret_token, auth_header, options)


RegistrationQuery = Annotated[Target, Depends(registration)]


async def get_router(request: Request) -> Router:
    """The process's router over the shards' services (async: FastAPI runs a plain `def`
    dependency in a thread pool, which cost a thread hop on every request)."""
    router: Router = request.app.state.router
    return router


RouterDep = Annotated[Router, Depends(get_router)]


async def apigw(
    apigw_type: Annotated[
        ApigwType, Path(alias="apigwType", description="apigw-user, apigw-app or apigw")
    ],
) -> None:
    """The gateway prefix of every v4 route (checked, not used)."""


async def caller(
    uid: Annotated[str | None, Header(alias="X-DEVOPS-UID", description="User name")] = None,
) -> str:
    """The calling user, from the gateway's X-DEVOPS-UID header (401 when absent)."""
    if not uid or not uid.strip():
        raise Unauthenticated("header X-DEVOPS-UID is required (the calling user's name)")
    return uid.strip()


Caller = Annotated[str, Depends(caller)]


async def member(project_id: ProjectPath, uid: Caller, router: RouterDep) -> str:
    """The caller, once known to be a member (or admin) of the path's project."""
    await router.of(project_id).roles.require(project_id, uid, Role.MEMBER)
    return uid


async def admin(project_id: ProjectPath, uid: Caller, router: RouterDep) -> str:
    """The caller, once known to be an admin of the path's project."""
    await router.of(project_id).roles.require(project_id, uid, Role.ADMIN)
    return uid


Member = Annotated[str, Depends(member)]
Admin = Annotated[str, Depends(admin)]


OPERATOR = "operator"


async def operator(
    router: RouterDep,
    token: Annotated[
        str | None, Header(alias="X-DEVOPS-OPERATOR-TOKEN", description="Operator token")
    ] = None,
    uid: Annotated[str | None, Header(alias="X-DEVOPS-UID", description="User name")] = None,
) -> str:
    """Operator routes: DISPATCHER_OPERATOR_TOKEN, compared in constant time. A caller
    known by X-DEVOPS-UID without the token (a project admin) is refused with 403; no
    credential or a wrong token is a 401. Returns who acts (their X-DEVOPS-UID, else
    "operator")."""
    expected = router.settings.operator_token
    if expected is None:
        raise Forbidden("operator routes are off: set DISPATCHER_OPERATOR_TOKEN")
    name = uid.strip() if uid and uid.strip() else None
    if not token and name is not None:
        raise Forbidden(f"user {name!r} is not an operator: this needs X-DEVOPS-OPERATOR-TOKEN")
    if not token or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Unauthenticated("missing or wrong X-DEVOPS-OPERATOR-TOKEN")
    return name or OPERATOR


Operator = Annotated[str, Depends(operator)]


class Access(NamedTuple):
    """Whose callbacks a route manages, and who asks (allowed to)."""

    scope: Scope
    uid: str


async def project_admin(project_id: ProjectPath, uid: Admin) -> Access:
    """A project's callbacks, changed by one of its admins."""
    return Access(Scope(project_id), uid)


async def project_member(project_id: ProjectPath, uid: Member) -> Access:
    """A project's callbacks, seen by one of its members."""
    return Access(Scope(project_id), uid)


async def pipeline_admin(project_id: ProjectPath, pipeline_id: PipelinePath, uid: Admin) -> Access:
    """A pipeline's callbacks, changed by an admin of its project."""
    return Access(Scope(project_id, pipeline_id), uid)


async def pipeline_member(
    project_id: ProjectPath, pipeline_id: PipelinePath, uid: Member
) -> Access:
    """A pipeline's callbacks, seen by a member of its project."""
    return Access(Scope(project_id, pipeline_id), uid)


async def platform_operator(name: Operator) -> Access:
    """The platform-wide callbacks, changed or seen by an operator."""
    return Access(Scope(PLATFORM_PROJECT), name)
