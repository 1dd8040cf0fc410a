"""Callbacks of one pipeline: register (one event or a batch), list and delete, with the
seed's query parameters and envelope; events whose `data.pipelineId` names the pipeline
reach them on top of the project's own callbacks."""

from __future__ import annotations

from fastapi import Depends

from dispatcher.api.callbacks import V4, callback_routes
from dispatcher.api.deps import apigw, pipeline_admin, pipeline_member

__all__ = ["router"]

router = callback_routes(
    f"{V4}/pipelines/{{pipelineId}}/callbacks",
    "pipeline callbacks",
    pipeline_admin,
    pipeline_member,
    switches=False,
    dependencies=[Depends(apigw)],
)
