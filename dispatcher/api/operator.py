"""Operator routes (DISPATCHER_OPERATOR_TOKEN): who has which role in a project."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from dispatcher.api.deps import Operator, ProjectPath, RouterDep
from dispatcher.auth import Role
from dispatcher.errors import NotFound
from dispatcher.models import Result

__all__ = ["router"]

router = APIRouter(prefix="/operator/roles/{projectId}", tags=["operations"])
UserPath = Annotated[str, Path(min_length=1, max_length=128)]


@router.get("", response_model=Result[dict[str, Role]])
async def list_roles(
    router: RouterDep, project_id: ProjectPath, _: Operator
) -> Result[dict[str, Role]]:
    """Who has which role in a project (`*`: every project)."""
    return Result[dict[str, Role]](data=await router.of(project_id).roles.list(project_id))


@router.put("/{user}", response_model=Result[bool])
async def grant_role(
    router: RouterDep,
    project_id: ProjectPath,
    _: Operator,
    user: UserPath,
    role: Annotated[Role, Query(alias="role")],
) -> Result[bool]:
    """Make `user` admin or member of a project."""
    await router.grant(project_id, user, role)
    return Result[bool](data=True)


@router.delete("/{user}", response_model=Result[bool])
async def revoke_role(
    router: RouterDep, project_id: ProjectPath, _: Operator, user: UserPath
) -> Result[bool]:
    """Take `user`'s role in a project away."""
    if not await router.revoke(project_id, user):
        raise NotFound(f"user {user!r} has no role in project {project_id!r}")
    return Result[bool](data=True)
