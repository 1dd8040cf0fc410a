"""The event catalogue: the 18 events, where a callback can subscribe to each, what emits
it and when, and an example of its `data` with the fields bk-ci sends (`projectId`,
`pipelineId`, `buildId`, `buildNo`, stage, job and task ids, `status`, times in epoch ms).
Served by `GET /{apigwType}/v4/callbacks/events` and the console's events page."""

from __future__ import annotations

from typing import Any

from dispatcher.models import PIPELINELESS_EVENTS, Event, EventInfo, Level

__all__ = ["CATALOGUE"]

_START, _END = 1_717_000_000_000, 1_717_000_095_000
_PIPELINE = {"projectId": "demo", "pipelineId": "p-1a2b3c", "pipelineName": "build-and-test"}
_BUILD = {
    **_PIPELINE,
    "buildId": "b-9f8e7d",
    "buildNo": 42,
    "userId": "alice",
    "triggerUser": "alice",
    "trigger": "MANUAL",
    "startTime": _START,
    "endTime": _END,
}
_PROJECT = {"projectId": "demo", "projectName": "Demo", "enable": True, "userId": "alice"}


def _build(status: str, ended: bool = True, **ids: Any) -> dict[str, Any]:
    return {**_BUILD, **ids, "status": status, "endTime": _END if ended else 0}


# event -> (who emits it and when, an example of its data)
_EVENTS: dict[Event, tuple[str, dict[str, Any]]] = {
    Event.DELETE_PIPELINE: (
        "the pipeline service, when a pipeline is deleted",
        {**_PIPELINE, "userId": "alice", "updateTime": _END},
    ),
    Event.CREATE_PIPELINE: (
        "the pipeline service, when a pipeline is created",
        {**_PIPELINE, "userId": "alice", "updateTime": _START},
    ),
    Event.UPDATE_PIPELINE: (
        "the pipeline service, when a pipeline's model or settings change",
        {**_PIPELINE, "userId": "alice", "updateTime": _END},
    ),
    Event.STREAM_ENABLED: (
        "the Stream (CI as code) service, when CI is turned on or off for a Git project",
        {
            "projectId": "demo",
            "userId": "alice",
            "gitProjectId": 1234,
            "gitProjectUrl": "https://git.example.com/demo/app.git",
            "enable": True,
        },
    ),
    Event.RESTORE_PIPELINE: (
        "the pipeline service, when a deleted pipeline is restored",
        {**_PIPELINE, "userId": "alice", "updateTime": _END},
    ),
    Event.BUILD_START: (
        "the build engine, when a build starts (not while it is queued)",
        _build("RUNNING", ended=False),
    ),
    Event.BUILD_END: ("the build engine, when a build ends", _build("FAILED")),
    Event.BUILD_STAGE_START: (
        "the build engine, when a stage starts",
        _build("RUNNING", ended=False, stageId="stage-2"),
    ),
    Event.BUILD_STAGE_END: (
        "the build engine, when a stage ends",
        _build("SUCCEED", stageId="stage-2"),
    ),
    Event.BUILD_JOB_START: (
        "the build engine, when a job starts (not a skipped job, nor one without tasks)",
        _build("RUNNING", ended=False, stageId="stage-2", jobId="job-unit"),
    ),
    Event.BUILD_JOB_END: (
        "the build engine, when a job ends (a skipped one too)",
        _build("SUCCEED", stageId="stage-2", jobId="job-unit"),
    ),
    Event.BUILD_TASK_START: (
        "the build engine, when a task (a plugin step) starts",
        _build("RUNNING", ended=False, stageId="stage-2", jobId="job-unit", taskId="e-5c1d"),
    ),
    Event.BUILD_TASK_END: (
        "the build engine, when a task ends",
        _build("FAILED", stageId="stage-2", jobId="job-unit", taskId="e-5c1d"),
    ),
    Event.BUILD_TASK_PAUSE: (
        "the build engine, when a task pauses before it runs, or waits for a manual review",
        _build("REVIEWING", ended=False, stageId="stage-3", jobId="job-deploy", taskId="e-7a2f"),
    ),
    Event.PROJECT_CREATE: ("the project service, when a project is created", _PROJECT),
    Event.PROJECT_UPDATE: (
        "the project service, when a project's name or settings change",
        {**_PROJECT, "projectName": "Demo (renamed)"},
    ),
    Event.PROJECT_ENABLE: ("the project service, when a project is enabled", _PROJECT),
    Event.PROJECT_DISABLE: (
        "the project service, when a project is disabled",
        {**_PROJECT, "enable": False},
    ),
}


def _levels(event: Event) -> list[Level]:
    """Where a callback may subscribe to `event`: project events name no pipeline."""
    if event in PIPELINELESS_EVENTS:
        return [Level.PLATFORM, Level.PROJECT]
    return [Level.PLATFORM, Level.PROJECT, Level.PIPELINE]


CATALOGUE: list[EventInfo] = [
    EventInfo(
        event=event,
        levels=_levels(event),
        about="project" if event in PIPELINELESS_EVENTS else "pipeline",
        emitted_by=_EVENTS[event][0],
        example=_EVENTS[event][1],
    )
    for event in Event
]
