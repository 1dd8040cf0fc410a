"""The public Python API is exactly what the README documents."""

from __future__ import annotations

import dispatcher


def test_all_is_the_documented_api() -> None:
    assert dispatcher.__all__ == [
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
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name) is not None
