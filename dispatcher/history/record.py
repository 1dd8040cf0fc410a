"""The history record as it is written: one attempt, from the worker (or a test, or the
bench) to either store. The seed's fields, camelCase as stored and served, then ours;
`HistoryRecord` (models.py) is the same record as read back and validated."""

from __future__ import annotations

from typing import Required, TypedDict

__all__ = ["AttemptRecord", "HeaderRow"]


class HeaderRow(TypedDict):
    """One request header as stored (secret values masked)."""

    name: str
    value: str


class AttemptRecord(TypedDict, total=False):
    """One attempt's record. The stores read the required keys (and `id`, which
    `assign_ids` gives a record that has none); the rest is stored as it is."""

    id: int
    projectId: Required[str]
    callBackUrl: Required[str]
    events: Required[str]
    status: Required[str]
    errorMsg: str | None
    requestHeaders: list[HeaderRow]
    requestBody: str
    responseCode: int | None
    responseBody: str | None
    startTime: int
    endTime: int
    createdTime: Required[int]
    attempt: int
    deliveryId: str | None
    eventId: str | None
    callbackId: int | None
    durationMs: int | None
    final: bool
    requestBodyTruncated: bool
    redeliveryOf: int | None
    traceparent: str
    tracestate: str
    orderKey: str  # ordered delivery: its lane's key, a long one by its hash (`lane_ids.lane_id`)
    orderNote: str  # its callback orders, this event went unordered: why
    requestBodyOf: str  # its emission's body, which the Redis store keeps once (`kept`)
