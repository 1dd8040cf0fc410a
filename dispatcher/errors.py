"""The exception tree. The API maps each class to the envelope and an HTTP code in one place.

::

    DispatcherError                 status / HTTP code
    ├── InvalidInput                400  bad parameter, body or setting value
    │   ├── InvalidEvent
    │   ├── InvalidUrl
    │   ├── InvalidTime
    │   └── InvalidSetting          a DISPATCHER_* setting that cannot work (at start-up)
    ├── Unauthenticated             401  no X-DEVOPS-UID, or a wrong gateway/operator token
    ├── Forbidden                   403  authenticated but not allowed
    ├── NotFound                    404  unknown callback or history record
    ├── LimitReached                409  a project at its limit of callbacks
    ├── PayloadTooLarge             413  request body beyond the limit
    └── Unavailable                 503  Redis unreachable; try again
        └── NotReplicated           fewer replicas than DISPATCHER_REDIS_MIN_REPLICAS
                                    confirmed a write in time

    OSError
    └── AddressRefused              a delivery's resolved address is against the policy
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

__all__ = [
    "AddressRefused",
    "DispatcherError",
    "Forbidden",
    "InvalidEvent",
    "InvalidInput",
    "InvalidSetting",
    "InvalidTime",
    "InvalidUrl",
    "LimitReached",
    "NotFound",
    "NotReplicated",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unauthenticated",
    "Unavailable",
    "Unplaced",
    "describe",
]


class DispatcherError(Exception):
    """Base of every error the service raises on purpose; `message` is meant for a person."""

    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(DispatcherError):
    """A parameter, body or value is malformed; the message names it."""

    http_status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidEvent(InvalidInput):
    """An event name that is not one of the 18 known events."""


class InvalidUrl(InvalidInput):
    """A callback URL that is malformed, not http(s), or points somewhere refused."""


class InvalidTime(InvalidInput):
    """A startTime / endTime not in `yyyy-MM-dd HH:mm:ss`, or an inverted window."""


class InvalidSetting(InvalidInput):
    """A setting that cannot work with the servers it names (an unknown sentinel master, no
    sentinel answering, fewer replicas than asked for); `param` is its variable's name.
    Found when a process starts: it stops with this message."""


class Unauthenticated(DispatcherError):
    """No caller identity, or a missing/wrong gateway token."""

    http_status = 401


class Forbidden(DispatcherError):
    """The caller is known but lacks the role the action needs."""

    http_status = 403


class NotFound(DispatcherError):
    """The callback or history record does not exist (in this project)."""

    http_status = 404


class LimitReached(DispatcherError):
    """A new callback past its project's limit (`DISPATCHER_MAX_CALLBACKS_PER_PROJECT`): a
    conflict with what the project already has, undone by deleting one."""

    http_status = 409


class CallbackGone(DispatcherError):
    """A redelivery of a record whose callback is disabled or deleted: it would be dropped
    unsent, with no attempt to show (a disabled one's can be once it is enabled; a deleted
    one's cannot: a URL registered again is a new callback, which they do not name)."""

    http_status = 409


class PayloadTooLarge(DispatcherError):
    """A request body beyond the configured limit."""

    http_status = 413


class TooManyRequests(DispatcherError):
    """A project past its share of a rate (its emits' bytes); `retry_after`: the seconds
    until the request would be taken."""

    http_status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        """What its answer says (the API's and the console's): when to send it again."""
        return {"Retry-After": str(math.ceil(self.retry_after))}


class Unavailable(DispatcherError):
    """A dependency (Redis) cannot be reached; the request may be retried."""

    http_status = 503


class Unplaced(Unavailable):
    """A project's shard cannot be chosen now (it moves, or it was moved past this
    process's list, or shard 0 has not said): refused before anything was done."""


class NotReplicated(Unavailable):
    """Redis took a write, but fewer replicas than `DISPATCHER_REDIS_MIN_REPLICAS` confirmed
    it within the wait: it would be lost if the master failed now."""

    def __init__(self, message: str, *, confirmed: int, wanted: int) -> None:
        super().__init__(message)
        self.confirmed = confirmed
        self.wanted = wanted


class AddressRefused(OSError):
    """Raised inside the HTTP client's resolver: the address is against the region's policy.
    An OSError so that the client treats it as a connection failure; the delivery treats it
    as final (retrying cannot help)."""


def describe(exc: BaseException, *, trusted: tuple[type[BaseException], ...] = ()) -> str:
    """`exc` for a log line or a record: its type, its message only when the message is
    ours (a `DispatcherError`) or of a kind in `trusted` and made of strings and numbers
    only, else where it was raised. Other code's messages may quote the value they choked
    on (a header holding a secret token, say), so they never reach a log line; `repr(exc)`
    never does either, nor the repr of an object a trusted error holds (aiohttp's
    `ServerDisconnectedError` holds the answer's head it had parsed)."""
    name = type(exc).__name__
    if isinstance(exc, DispatcherError) or (
        isinstance(exc, trusted) and all(isinstance(arg, str | int) for arg in exc.args)
    ):
        return f"{name}: {exc}" if str(exc) else name
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{name} at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else name
