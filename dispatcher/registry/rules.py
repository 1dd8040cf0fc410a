"""What a registration must satisfy before it is stored: the URL, the project and pipeline
ids, the token, which events a level takes. Pure checks, no Redis."""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import urlsplit

from dispatcher.addresses import connect_target, host_port
from dispatcher.errors import InvalidEvent, InvalidInput, InvalidUrl, Unavailable
from dispatcher.headers import check_header_value
from dispatcher.models import (
    PIPELINELESS_EVENTS,
    PLATFORM_PROJECT,
    PROJECT_EVENTS,
    PROJECT_ID,
    Event,
    Level,
)
from dispatcher.redaction import redacted

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MAX_URL_BYTES",
    "MAX_URL_LENGTH",
    "TEXT_CONTROL",
    "Destination",
    "check_event",
    "check_scope",
    "check_token",
    "checked_reason",
    "checked_text",
    "destination",
    "is_pipeline_id",
    "level_of",
    "moving",
    "url_problem",
    "validate_url",
]

# A URL registered now has at most 2,048 bytes of UTF-8, so that what is keyed or indexed
# by it stays small (a PostgreSQL btree entry holds 2,704 bytes). Versions before counted
# characters: no callback's URL has more than 2,048 of them.
MAX_URL_BYTES = 2048
MAX_URL_LENGTH = 2048
MAX_TOKEN_LENGTH = 1024
MAX_ID_LENGTH = 128


def validate_url(url: str) -> str:
    """Check that `url` is an absolute http(s) URL with a host, no credentials and no
    control characters; returns it trimmed. Messages quote the URL only once it holds
    neither (both would reach logs and screens as they are)."""
    url = url.strip()
    if not url:
        raise InvalidUrl("url is required", param="url")
    if len(url.encode(errors="surrogatepass")) > MAX_URL_BYTES:
        raise InvalidUrl(f"url is longer than {MAX_URL_BYTES} bytes (UTF-8)", param="url")
    if (problem := url_problem(url)) is not None:
        raise InvalidUrl(problem, param="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUrl(f"url {url!r} is malformed: {exc}", param="url") from exc
    if parts.scheme not in {"http", "https"}:
        raise InvalidUrl(f"url must start with http:// or https://, got {url!r}", param="url")
    if not parts.hostname:
        raise InvalidUrl(f"url {url!r} has no host", param="url")
    if "%" in parts.hostname:
        raise InvalidUrl(f"url {url!r} has a percent-encoded host", param="url")
    if port == 0:
        raise InvalidUrl(f"url {url!r} has port 0", param="url")
    if any(ch.isspace() for ch in url):
        raise InvalidUrl("url must not contain white space", param="url")
    return url


# C0 controls, DEL, C1 controls, Unicode format characters (bidi overrides, zero-width),
# and the percent-encoded C0, DEL and C1 (UTF-8: %C2%80-%C2%9F).
_RAW_CONTROL = (
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]"
)
_CONTROL = re.compile(_RAW_CONTROL + "|%(?:[01][0-9A-Fa-f]|7[Ff]|[Cc]2%[89][0-9A-Fa-f])")
TEXT_CONTROL = re.compile(_RAW_CONTROL)  # what people are shown as it is must not hold
CREDENTIALS_REFUSED = (
    "url must not hold credentials (user:password@host): a URL is stored in clear and shown "
    "to every member of the project and in logs; send them in a header instead "
    "(authHeaderName=Authorization&authHeaderValue=...)"
)


def checked_reason(reason: str | None) -> str | None:
    """A disabled reason as given, refused when it holds control characters (CR, LF,
    ESC, NUL, bidi overrides, …): it is shown to the project's members and operators in
    the console, the CLI and logs, as it is."""
    return reason if reason is None else checked_text(reason, "reason")


def checked_text(text: str, param: str) -> str:
    """`text` a project chose and people are shown as it is (a reason, a pipeline id, a
    filter), refused when it holds control characters: ESC in a pipeline id or a filter
    cleared the operator's screen or retitled the terminal in `dispatcher callbacks list`
    (review)."""
    if TEXT_CONTROL.search(text):
        raise InvalidInput(
            f"{param} must not hold control characters (CR, LF, ESC, NUL, bidi overrides, …): "
            "it is shown as it is in the console, the CLI and logs",
            param=param,
        )
    return text


def url_problem(url: str) -> str | None:
    """Why `url` must be neither stored nor sent, whatever its shape: control characters
    (raw or percent-encoded: `%1B`, `%00`, `%0D%0A`), or credentials in it. Never quotes it.
    Registration refuses such a URL; a delivery to one stored by an older version fails."""
    if _CONTROL.search(url):
        return (
            "url must not hold control characters (raw or percent-encoded, such as %1B, %00 "
            "or %0D%0A): they would reach logs, screens and receivers as they are"
        )
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # malformed: the shape's checks say so
        return None
    return CREDENTIALS_REFUSED if "@" in netloc else None


class Destination(NamedTuple):
    """What an attempt needs of a callback's URL, read once per callback (not per
    attempt): why nothing may be sent to it (`url_problem`, or a URL that cannot be
    parsed), its `host` (the key of its host's share and circuit: the host and port it
    connects to, as the client pools its connections, however the URL spells them; its
    netloc when it cannot be parsed), the host name and port the egress policy checks,
    and the URL as a log line shows it (`redaction.redacted`; '' when it cannot be
    parsed)."""

    problem: str | None
    host: str
    hostname: str
    port: int
    shown: str = ""


def destination(url: str) -> Destination:
    """`url`'s `Destination`, in one parse."""
    problem = url_problem(url)
    try:  # stored by an older version, a malformed URL fails its deliveries alone
        parts = urlsplit(url)
    except ValueError as exc:
        return Destination(problem or f"url is malformed: {exc}", "", "", 0)
    netloc, hostname, shown = parts.netloc, parts.hostname or "", redacted(parts)
    try:
        hostname, port = connect_target(url)  # what the policy must check: what aiohttp uses
    except ValueError as exc:
        return Destination(problem or f"url is malformed: {exc}", netloc, hostname, 0, shown)
    if not hostname:
        problem = problem or "url has no host"
    return Destination(problem, host_port(hostname, port), hostname, port, shown)


def _is_id(value: str) -> bool:
    """An id that can be part of a key: 1-128 characters, no white space and no ':'."""
    return 0 < len(value) <= MAX_ID_LENGTH and not any(c.isspace() or c == ":" for c in value)


def is_pipeline_id(value: object) -> bool:
    """Whether an event's `data.pipelineId` can name a pipeline's callbacks."""
    return isinstance(value, str) and _is_id(value)


def level_of(project_id: str, pipeline_id: str | None) -> Level:
    if project_id == PLATFORM_PROJECT:
        return Level.PLATFORM
    return Level.PIPELINE if pipeline_id else Level.PROJECT


def check_scope(project_id: str, pipeline_id: str | None) -> Level:
    """The level of (project, pipeline), once both ids can be stored, and the project's
    can emit (emit's rule, `models.PROJECT_ID`: no callback no event can reach). Only a
    registration checks it: what an older version stored under another id is still read
    and deleted."""
    if not PROJECT_ID.fullmatch(project_id):
        raise InvalidInput(
            "projectId must be 1-128 visible ASCII characters without ':'", param="projectId"
        )
    if pipeline_id is not None and not _is_id(pipeline_id):
        raise InvalidInput(
            "pipelineId must be 1-128 characters without spaces or ':'", param="pipelineId"
        )
    if pipeline_id is not None:
        checked_text(pipeline_id, "pipelineId")
    if pipeline_id is not None and project_id == PLATFORM_PROJECT:
        raise InvalidInput(
            f"platform-wide callbacks ({PLATFORM_PROJECT}) cannot be pipeline callbacks",
            param="pipelineId",
        )
    return level_of(project_id, pipeline_id)


def check_event(event: Event, level: Level) -> Event:
    """Events whose data names no pipeline (`PIPELINELESS_EVENTS`): a pipeline's callbacks
    do not get them, so none registers them (STREAM_ENABLED was taken; sent only if an
    emitter put a `pipelineId` in its data)."""
    if level is Level.PIPELINE and event in PIPELINELESS_EVENTS:
        what = "a project event" if event in PROJECT_EVENTS else "about a Git project"
        raise InvalidEvent(
            f"{event.value} is {what}, its data names no pipeline: register it on the "
            "project, not a pipeline",
            param="event",
        )
    return event


def check_token(token: str | None) -> str:
    """A secret token as registered: none, or visible ASCII (it goes out as a header)."""
    token = token or ""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidInput(
            f"secretToken is longer than {MAX_TOKEN_LENGTH} characters", param="secretToken"
        )
    return check_header_value(token, "secretToken", MAX_TOKEN_LENGTH) if token else token


def moving(project_id: str) -> Unavailable:
    """The refusal of a change of a project's callbacks or roles while it moves off this
    shard."""
    return Unavailable(
        f"project {project_id!r} is moving to another shard: its callbacks and roles cannot "
        "change until the move ends, in a minute or so; try again (events are delivered "
        "meanwhile). A move that stopped holds them until it is run again: `dispatcher "
        "shards list` names it"
    )
