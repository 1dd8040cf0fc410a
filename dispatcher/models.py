"""The HTTP contract: the seeds' models with their exact camelCase JSON names, and enums."""

from __future__ import annotations

import enum
import re
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from dispatcher.errors import InvalidEvent, InvalidInput

__all__ = [
    "EVENT_ID",
    "EVENT_ID_PATTERN",
    "MASK",
    "PIPELINELESS_EVENTS",
    "PLATFORM_PROJECT",
    "PROJECT_EVENTS",
    "PROJECT_ID",
    "SECRET_HEADERS",
    "ApigwType",
    "CallBackHeader",
    "Callback",
    "CallbackPage",
    "CreateCallBackResult",
    "DeliveryStatus",
    "EmitBatchResult",
    "EmitOutcome",
    "EmitRequest",
    "EmitResult",
    "Event",
    "EventInfo",
    "HistoryPage",
    "HistoryRecord",
    "Level",
    "RedeliveryResult",
    "Region",
    "Result",
    "check_project_id",
    "parse_event",
    "parse_events",
    "parse_status",
]

T = TypeVar("T")
# An event id of the producer's own (its idempotency key): what it may hold, matched whole
# (`fullmatch`: with `re.match`, `$` let a trailing newline through). The anchored pattern
# is for pydantic and the OpenAPI document (pydantic's regex engine has no multiline `$`).
EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
EVENT_ID_PATTERN = rf"^{EVENT_ID.pattern}$"
# What can name a project in a key, a job and a delivery's header: 1-128 visible ASCII
# characters, no ':'.
PROJECT_ID = re.compile(r"[\x21-\x39\x3b-\x7e]{1,128}")

MASK = "******"
# Request headers whose values history never shows (lower case): the token, credentials,
# and the signature (with id, timestamp and body, it lets anyone test guesses of the token
# offline). A callback's custom auth header is masked too, by its name.
SECRET_HEADERS = frozenset(
    {"x-devops-webhook-token", "webhook-signature", "authorization", "proxy-authorization"}
)


class Event(enum.StrEnum):
    """The 18 events of the seed, in its order."""

    DELETE_PIPELINE = "DELETE_PIPELINE"
    CREATE_PIPELINE = "CREATE_PIPELINE"
    UPDATE_PIPELINE = "UPDATE_PIPELINE"
    STREAM_ENABLED = "STREAM_ENABLED"
    RESTORE_PIPELINE = "RESTORE_PIPELINE"
    BUILD_START = "BUILD_START"
    BUILD_END = "BUILD_END"
    BUILD_STAGE_START = "BUILD_STAGE_START"
    BUILD_STAGE_END = "BUILD_STAGE_END"
    BUILD_JOB_START = "BUILD_JOB_START"
    BUILD_JOB_END = "BUILD_JOB_END"
    BUILD_TASK_START = "BUILD_TASK_START"
    BUILD_TASK_END = "BUILD_TASK_END"
    BUILD_TASK_PAUSE = "BUILD_TASK_PAUSE"
    PROJECT_CREATE = "PROJECT_CREATE"
    PROJECT_UPDATE = "PROJECT_UPDATE"
    PROJECT_ENABLE = "PROJECT_ENABLE"
    PROJECT_DISABLE = "PROJECT_DISABLE"


# The reserved project id of platform-wide callbacks (the reference's name): managed with the
# operator token only, matched for every project's events.
PLATFORM_PROJECT = "DEVOPS_ALL_PROJECT"

PROJECT_EVENTS = frozenset(
    {Event.PROJECT_CREATE, Event.PROJECT_UPDATE, Event.PROJECT_ENABLE, Event.PROJECT_DISABLE}
)
# Events whose data names no pipeline (`data.pipelineId`), so no pipeline's callback gets
# them: the project events, and STREAM_ENABLED (CI turned on or off for a Git project).
PIPELINELESS_EVENTS = PROJECT_EVENTS | {Event.STREAM_ENABLED}


class Level(enum.StrEnum):
    """Where a callback is registered: on a project, on one of its pipelines, or on the
    platform (`DEVOPS_ALL_PROJECT`, every project's events)."""

    PROJECT = "project"
    PIPELINE = "pipeline"
    PLATFORM = "platform"


def check_project_id(project_id: str) -> None:
    """Raise `InvalidInput` (param `projectId`) unless `project_id` can name a project that
    emits events: `PROJECT_ID`, and not the platform's own."""
    if not project_id:
        raise InvalidInput("projectId is required", param="projectId")
    if not PROJECT_ID.fullmatch(project_id):
        raise InvalidInput(
            "projectId must be 1-128 visible ASCII characters without ':'", param="projectId"
        )
    if project_id == PLATFORM_PROJECT:
        raise InvalidInput(
            f"{PLATFORM_PROJECT} is not a project that has events: it holds the platform-wide "
            "callbacks, which every project's events reach",
            param="projectId",
        )


def parse_event(name: str) -> Event:
    try:
        return Event(name.strip())
    except ValueError:
        raise InvalidEvent(
            f"unknown event {name.strip()!r}; expected one of: {', '.join(e.value for e in Event)}",
            param="event",
        ) from None


def parse_events(spec: str) -> tuple[list[Event], dict[str, str]]:
    """Split a batch's comma-separated `event`: the valid ones (deduplicated, in order) and
    the refused ones with their reason."""
    valid: list[Event] = []
    failed: dict[str, str] = {}
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        try:
            event = parse_event(name)
        except InvalidEvent as exc:
            failed[name] = exc.message
            continue
        if event not in valid:
            valid.append(event)
    return valid, failed


class Region(enum.StrEnum):
    """The network a callback URL lives in; each has its own egress and address policy."""

    DEVNET = "DEVNET"
    OSS = "OSS"
    IDC = "IDC"


class ApigwType(enum.StrEnum):
    """The gateway prefix of every v4 route."""

    APIGW_USER = "apigw-user"
    APIGW_APP = "apigw-app"
    APIGW = "apigw"


class DeliveryStatus(enum.StrEnum):
    """`status` of a history record."""

    SUCCESS = "SUCCESS"
    FAILED = "FAILED"


def parse_status(name: str) -> DeliveryStatus:
    """A record's status as people type it (any case); a 400 naming `status` otherwise."""
    try:
        return DeliveryStatus(name.strip().upper())
    except ValueError:
        raise InvalidInput(
            f"status must be SUCCESS or FAILED, got {name.strip()!r}", param="status"
        ) from None


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True
    )


class Result(_Model, Generic[T]):
    """The seeds' envelope: `status` 0 on success, a non-zero code and a message otherwise."""

    data: T | None = None
    message: str | None = None
    status: int = 0


class CreateCallBackResult(_Model):
    """Batch creation outcome: which events were saved, which were refused and why."""

    failure_events: dict[str, str] = Field(default_factory=dict)
    success_events: list[str] = Field(default_factory=list)


class CallBackHeader(_Model):
    """One request header as stored in history (secret values masked)."""

    name: str
    value: str


class HistoryRecord(_Model):
    """One delivery attempt. The seed's fields first, then our extras."""

    id: int
    project_id: str
    call_back_url: str
    events: str
    status: DeliveryStatus
    error_msg: str | None = None
    request_headers: list[CallBackHeader] = Field(default_factory=list)
    request_body: str = ""
    response_code: int | None = None
    response_body: str | None = None
    start_time: int
    end_time: int
    created_time: int
    # Extras (the seed allows more fields to follow).
    attempt: int = 1
    delivery_id: str | None = None
    event_id: str | None = None
    callback_id: int | None = None
    duration_ms: int | None = None
    final: bool = False
    request_body_truncated: bool = False
    redelivery_of: int | None = None
    # the W3C trace context the delivery continues (its event's, or the fan-out's span)
    traceparent: str | None = None
    tracestate: str | None = None
    # ordered delivery: the lane's key (the value of its callback's orderBy; past 200
    # characters, `#` and its hash, as the lane names it: `lane_ids.lane_id`), or, for an
    # ordered callback's delivery that went unordered, why
    order_key: str | None = None
    order_note: str | None = None

    @field_validator("request_headers")
    @classmethod
    def _masked(cls, headers: list[CallBackHeader]) -> list[CallBackHeader]:
        """Secrets stay masked whoever stored the record (older versions kept the
        signature in clear)."""
        for header in headers:
            if header.value != MASK and header.name.lower() in SECRET_HEADERS:
                header.value = MASK
        return headers


class HistoryPage(_Model):
    """A page of history, newest first; `count` and `totalPages` are exact."""

    records: list[HistoryRecord]
    count: int
    total_pages: int
    page_size: int
    page: int


class Callback(_Model):
    """A registered callback as the API shows it. Its secrets (the token, the custom auth
    header) are never included, only whether it has them."""

    id: int
    project_id: str
    url: str
    event: Event
    region: Region
    level: Level = Level.PROJECT
    pipeline_id: str | None = None
    enabled: bool = True
    disabled_reason: str | None = None
    has_secret_token: bool = False
    has_auth_header: bool = False
    created_time: int
    updated_time: int
    creator: str | None = None
    # Receiver controls (see the README's "Receiver controls"); None when not set.
    max_per_second: int | None = None
    max_in_flight: int | None = None
    filter: str | None = None
    order_by: str | None = Field(
        default=None,
        description="Ordered delivery: the path into the event's data whose value names "
        "its lane (* for one lane), absent when deliveries are unordered.",
    )
    rotation_end_time: int | None = Field(
        default=None,
        description="While a secret rotation is in progress: when the previous token stops "
        "signing (epoch ms).",
    )
    filter_errors: int = Field(
        default=0, description="Events the filter failed on (not delivered) since registered."
    )
    filter_last_error: str | None = None


class EventInfo(_Model):
    """One event of the catalogue: where a callback may subscribe to it, what it is about
    (a project, or a pipeline and its builds), what emits it, an example of its `data`."""

    event: Event
    levels: list[Level]
    about: str
    emitted_by: str
    example: dict[str, Any]


class CallbackPage(_Model):
    """A page of callbacks, oldest first."""

    records: list[Callback]
    count: int
    total_pages: int
    page_size: int
    page: int


class EmitRequest(_Model):
    """Body of the emit route: the event name and the producer's data, passed on untouched."""

    event: Event
    data: dict[str, Any] = Field(default_factory=dict)
    event_id: str | None = Field(
        default=None,
        max_length=128,
        pattern=EVENT_ID_PATTERN,
        description="Optional idempotency key; generated when absent.",
    )


class RedeliveryResult(_Model):
    """What redelivering a window queued, and the window's final failures it did not."""

    queued: int
    already_queued: int = Field(
        default=0,
        description="Deliveries whose redelivery an earlier call queued (its attempt not in "
        "the history yet): not queued again.",
    )
    body_not_kept: int = Field(
        default=0,
        description="Deliveries left out: no record of theirs in the window keeps the "
        "request body whole (cut at the recording limit, or lost), so none can be sent as "
        "it was (an older one outside the window may).",
    )
    callback_gone: int = Field(
        default=0, description="Deliveries left out: their callback is disabled or deleted."
    )

    def __add__(self, other: RedeliveryResult) -> RedeliveryResult:
        return RedeliveryResult(
            queued=self.queued + other.queued,
            already_queued=self.already_queued + other.already_queued,
            body_not_kept=self.body_not_kept + other.body_not_kept,
            callback_gone=self.callback_gone + other.callback_gone,
        )


class EmitResult(_Model):
    """What emitting returns at once: the event id (delivery happens later)."""

    event_id: str
    queued: bool


class EmitOutcome(_Model):
    """One event of a batch: its id once queued, or why it was refused (the others were
    queued all the same)."""

    event_id: str | None = None
    error: str | None = None


class EmitBatchResult(_Model):
    """What a batch emit queued: how many events were accepted and refused, and one outcome
    per event, in the order sent."""

    accepted: int
    failed: int
    results: list[EmitOutcome]
