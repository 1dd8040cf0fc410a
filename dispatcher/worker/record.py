"""The history record of one attempt, shaped from the job, its callback and the attempt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.delivery import Outcome
from dispatcher.history import truncate
from dispatcher.jobs import now_ms
from dispatcher.models import DeliveryStatus

if TYPE_CHECKING:
    from dispatcher.delivery import Attempted
    from dispatcher.history.record import AttemptRecord
    from dispatcher.jobs import DeliveryJob
    from dispatcher.registry import CallbackTarget
    from dispatcher.settings import Settings

__all__ = ["attempt_record"]


def attempt_record(
    job: DeliveryJob,
    target: CallbackTarget,
    number: int,
    done: Attempted,
    final: bool,
    settings: Settings,
) -> AttemptRecord:
    """The seed's fields (camelCase, without the id the store assigns), then our extras.
    The request body as sent (the job's bytes), up to `max_request_body`; the headers as
    `attempt` masked them."""
    body_text, body_truncated = truncate(
        job.body.decode(errors="replace"), settings.max_request_body
    )
    result = done.result
    ok = result.outcome is Outcome.SUCCESS
    record: AttemptRecord = {
        "projectId": job.project_id,
        "callBackUrl": target.url,
        "events": job.event,
        "status": (DeliveryStatus.SUCCESS if ok else DeliveryStatus.FAILED).value,
        "errorMsg": result.error,
        "requestHeaders": done.headers,
        "requestBody": body_text,
        "responseCode": result.status_code,
        "responseBody": result.response_body,
        "startTime": result.started_ms,
        "endTime": result.ended_ms,
        "createdTime": now_ms(),
        "attempt": number,
        "deliveryId": job.delivery_id,
        "eventId": job.event_id,
        "callbackId": target.id,
        "durationMs": result.duration_ms,
        "final": final,
        "requestBodyTruncated": body_truncated,
        "redeliveryOf": job.redelivery_of,
    }
    if job.trace is not None:  # what a redelivery of this record continues
        record.update(job.trace.fields())  # type: ignore[typeddict-item]
    return record
