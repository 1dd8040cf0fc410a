"""callback-dispatcher: deliver CI/CD events to registered callback URLs, with retries and
a queryable history.

    >>> from dispatcher import Producer, Settings
    >>> async def notify() -> None:
    ...     async with Producer(Settings(redis_url="redis://127.0.0.1:6379/0")) as producer:
    ...         await producer.emit("my-project", "BUILD_END", {"buildId": "b-1"})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher import lazy

if TYPE_CHECKING:
    from dispatcher.errors import (
        DispatcherError,
        Forbidden,
        InvalidEvent,
        InvalidInput,
        InvalidTime,
        InvalidUrl,
        NotFound,
        PayloadTooLarge,
        Unauthenticated,
        Unavailable,
    )
    from dispatcher.models import (
        Callback,
        CallBackHeader,
        CreateCallBackResult,
        DeliveryStatus,
        Event,
        HistoryPage,
        HistoryRecord,
        Level,
        Region,
        Result,
    )
    from dispatcher.producer import Producer, emit
    from dispatcher.settings import Settings

__version__ = "0.2.0"

__all__ = [
    "CallBackHeader",
    "Callback",
    "CreateCallBackResult",
    "DeliveryStatus",
    "DispatcherError",
    "Event",
    "Forbidden",
    "HistoryPage",
    "HistoryRecord",
    "InvalidEvent",
    "InvalidInput",
    "InvalidTime",
    "InvalidUrl",
    "Level",
    "NotFound",
    "PayloadTooLarge",
    "Producer",
    "Region",
    "Result",
    "Settings",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "emit",
]

# Where each name is defined, imported on first use (`dispatcher.lazy`).
_MODULES = {
    "dispatcher.errors": "DispatcherError Forbidden InvalidEvent InvalidInput InvalidTime "
    "InvalidUrl NotFound PayloadTooLarge Unauthenticated Unavailable",
    "dispatcher.models": "Callback CallBackHeader CreateCallBackResult DeliveryStatus Event "
    "HistoryPage HistoryRecord Level Region Result",
    "dispatcher.producer": "Producer emit",
    "dispatcher.settings": "Settings",
}
_HOME = {name: module for module, names in _MODULES.items() for name in names.split()}


if not TYPE_CHECKING:  # (for type checkers, the imports above: a misspelt name is an error)
    __getattr__, __dir__ = lazy.exports(__name__, _HOME)
