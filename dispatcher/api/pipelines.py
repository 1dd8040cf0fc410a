"""Callbacks of one pipeline: register (one event or a batch), list and delete, with the
seed's query parameters and envelope; events whose `data.pipelineId` names the pipeline
reach them on top of the project's own callbacks."""

from __future__ import annotations

from fastapi import Depends

from dispatcher.api.callbacks import V4, callback_routes
from dispatcher.api.deps import Admin, Member, PipelinePath, ProjectPath, Scope, apigw

__all__ = ["router"]


async def pipeline_scope(project_id: ProjectPath, pipeline_id: PipelinePath) -> Scope:
    return Scope(project_id, pipeline_id)


async def _admin(uid: Admin) -> str:
    return uid


async def _member(uid: Member) -> str:
    return uid


router = callback_routes(
    f"{V4}/pipelines/{{pipelineId}}/callbacks", "pipeline callbacks", pipeline_scope, _admin,
    _member, switches=False, dependencies=[Depends(apigw)],
)  # fmt: skip
