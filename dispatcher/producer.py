"""Producers: `emit()` an event, and it is queued for fan-out at once (never waits for
delivery). Python API here; the CLI and the HTTP route call the same functions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dispatcher.errors import InvalidInput
from dispatcher.lua import run_pipeline
from dispatcher.queue import DELIVER, FAN_OUT, Queue
from dispatcher.redis import connect
from dispatcher.registry import parse_event

if TYPE_CHECKING:
    from types import TracebackType

    from arq.connections import ArqRedis
    from redis.asyncio.client import Pipeline

    from dispatcher.models import HistoryRecord
    from dispatcher.settings import Settings

__all__ = ["Producer", "emit"]


def new_event_id() -> str:
    return "evt_" + uuid.uuid4().hex


def _event_payload(
    project_id: str, event: str, data: Mapping[str, Any], event_id: str | None
) -> dict[str, Any]:
    if not project_id:
        raise InvalidInput("projectId is required", param="projectId")
    if not isinstance(data, Mapping):
        raise InvalidInput("data must be a JSON object", param="data")
    return {
        "id": event_id or new_event_id(),
        "projectId": project_id,
        "event": parse_event(event).value,
        "data": dict(data),
        "emittedAt": time.time_ns() // 1_000_000,
    }


class Producer:
    """Emits events through one Redis pool. Use as an async context manager, or pass an
    existing connection (the API does)."""

    def __init__(self, settings: Settings, redis: ArqRedis | None = None) -> None:
        self.settings = settings
        self._redis = redis
        self._owns_redis = redis is None
        self._queue: Queue | None = None

    async def __aenter__(self) -> Producer:
        if self._redis is None:
            self._redis = await connect(self.settings)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def queue(self) -> Queue:
        if self._redis is None:
            raise RuntimeError("Producer is not connected: use `async with Producer(...)`")
        if self._queue is None:
            self._queue = Queue(self._redis, self.settings.queue_name)
        return self._queue

    async def emit(
        self,
        project_id: str,
        event: str,
        data: Mapping[str, Any] | None = None,
        *,
        event_id: str | None = None,
    ) -> str:
        """Queue one event for every matching callback; returns its event id.

        An `event_id` of your own makes the call idempotent while that event is queued.
        """
        payload = _event_payload(project_id, event, data or {}, event_id)
        await self.queue.enqueue(FAN_OUT, payload, job_id=payload["id"])
        return str(payload["id"])

    async def emit_many(self, events: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
        """Queue many `(project_id, event, data)` in one round trip; returns their ids.
        Every event is checked before any is queued."""
        payloads = [_event_payload(p, e, d, None) for p, e, d in events]
        queue = self.queue

        def push_all(pipe: Pipeline) -> None:
            for payload in payloads:
                queue.push(pipe, FAN_OUT, payload, job_id=payload["id"])

        await run_pipeline(queue.redis, push_all)
        return [str(p["id"]) for p in payloads]

    async def redeliver(self, record: HistoryRecord) -> str:
        """Send a recorded request again as a new delivery (same delivery id for the
        receiver's de-duplication, current token, new history records)."""
        if record.callback_id is None or record.delivery_id is None:
            raise InvalidInput(f"history record {record.id} cannot be redelivered: no callback")
        if record.request_body_truncated:
            raise InvalidInput(
                f"history record {record.id} cannot be redelivered: its stored body was "
                "truncated (raise DISPATCHER_MAX_REQUEST_BODY)"
            )
        job_id = f"{record.delivery_id}:redeliver:{uuid.uuid4().hex[:12]}"
        await self.queue.enqueue(
            DELIVER,
            {
                "deliveryId": record.delivery_id,
                "callbackId": record.callback_id,
                "eventId": record.event_id,
                "projectId": record.project_id,
                "event": record.events,
                "body": record.request_body,
                "redeliveryOf": record.id,
            },
            job_id=job_id,
        )
        return job_id


async def emit(
    project_id: str,
    event: str,
    data: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    event_id: str | None = None,
) -> str:
    """Emit one event with a short-lived connection. For many, keep a `Producer` open."""
    from dispatcher.settings import Settings

    async with Producer(settings or Settings()) as producer:
        return await producer.emit(project_id, event, data, event_id=event_id)
