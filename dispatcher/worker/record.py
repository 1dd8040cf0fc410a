"""The history record of one attempt, shaped from the job, its callback and the result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatcher.delivery import Outcome, mask_headers
from dispatcher.history import truncate
from dispatcher.jobs import now_ms
from dispatcher.models import DeliveryStatus

if TYPE_CHECKING:
    from dispatcher.delivery import AttemptResult
    from dispatcher.jobs import DeliveryJob
    from dispatcher.registry import CallbackTarget
    from dispatcher.settings import Settings

__all__ = ["attempt_record"]


def attempt_record(
    job: DeliveryJob,
    target: CallbackTarget,
    number: int,
    headers: dict[str, str],
    result: AttemptResult,
    final: bool,
    settings: Settings,
) -> dict[str, Any]:
    """The seed's fields (camelCase, without the id the store assigns), then our extras.
    The request body as sent, up to `max_request_body`; secret headers masked."""
    body_text, body_truncated = truncate(
        job.body.decode(errors="replace"), settings.max_request_body
    )
    ok = result.outcome is Outcome.SUCCESS
    record = {
        "projectId": job.project_id,
        "callBackUrl": target.url,
        "events": job.event,
        "status": (DeliveryStatus.SUCCESS if ok else DeliveryStatus.FAILED).value,
        "errorMsg": result.error,
        "requestHeaders": mask_headers(headers, target.auth_header),
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
        record.update(job.trace.fields())
    if job.order_key is not None:  # delivered in its lane (see dispatcher.worker.lanes)
        record["orderKey"] = job.order_key
    if job.order_note is not None:  # its callback orders, this event went unordered: why
        record["orderNote"] = job.order_note
    return record
