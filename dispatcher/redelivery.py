"""A window's redelivery: every delivery of a history window that finally failed, sent
again once, and a count of what was left out and why (`RedeliveryResult`).

A delivery is sent again as its newest failure of the window, once, and only while its
newest attempt anywhere is a final failure: not one redelivered since that succeeded or is
retried. Each call used to send every failure of the window again, a redelivery's own
failure included: twice as many each time (review). A delivery's redelivery after its
newest attempt has one job id, queued once (`Queue.push_many`): calls at once, or one that
reads a history not yet shipped to PostgreSQL, send it once; the next is queued once its
own attempt shows in the history. Left out, and counted:

- a record whose request body was not kept whole (cut at `DISPATCHER_MAX_REQUEST_BODY`, or
  its kept body lost): it cannot be sent as it was;
- a delivery whose callback is disabled or deleted: its redelivery would be dropped, with
  no attempt to show, and hold its place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.models import DeliveryStatus, RedeliveryResult

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from dispatcher.history import HistoryStore
    from dispatcher.jobs import DeliveryJob
    from dispatcher.models import HistoryRecord
    from dispatcher.producer import Producer
    from dispatcher.registry import Registry

__all__ = ["redeliver_window"]

BATCH = 100  # redeliveries queued per round trip


async def redeliver_window(
    history: HistoryStore,
    registry: Registry,
    producer: Producer,
    project_id: str,
    failures: AsyncIterator[HistoryRecord],
    on_queued: Callable[[int], None] | None = None,
) -> RedeliveryResult:
    """Queue the redelivery of each delivery of `failures` (a window's final failures,
    newest first) that may be sent again; `on_queued` hears each batch's count."""
    result = RedeliveryResult(queued=0)
    batch: list[DeliveryJob] = []

    async def flush() -> None:
        sent = await producer.requeue(batch, once=True)
        result.queued += sent
        result.already_queued += len(batch) - sent
        if on_queued is not None:
            on_queued(sent)
        batch.clear()

    async for job in _redeliveries(history, registry, producer, project_id, failures, result):
        batch.append(job)
        if len(batch) >= BATCH:
            await flush()
    if batch:
        await flush()
    return result


async def _redeliveries(
    history: HistoryStore,
    registry: Registry,
    producer: Producer,
    project_id: str,
    failures: AsyncIterator[HistoryRecord],
    result: RedeliveryResult,
) -> AsyncIterator[DeliveryJob]:
    """The redelivery of each delivery of `failures` that is sent again, once; what is left
    out is counted in `result`."""
    seen: set[str] = set()  # deliveries looked at (the window's newest failure first)
    cut: set[str] = set()  # deliveries with a record not kept whole (an older one may be)
    live: dict[int, bool] = {}  # callbacks enabled or not, each read once
    async for record in failures:
        callback_id, delivery_id = record.callback_id, record.delivery_id
        if callback_id is None or delivery_id is None:
            continue  # not a delivery's record: nothing to send it again as
        if record.request_body_truncated:
            cut.add(delivery_id)
            continue
        if delivery_id in seen:
            continue
        seen.add(delivery_id)
        if callback_id not in live:  # disabled or deleted: its redelivery would drop
            live[callback_id] = await registry.target(callback_id) is not None
        if not live[callback_id]:
            result.callback_gone += 1
            continue
        newest = await history.attempts(delivery_id, project_id, limit=1)
        if newest and not (newest[0].final and newest[0].status is DeliveryStatus.FAILED):
            continue
        yield producer.redelivery_job(record, after=newest[0].id if newest else record.id)
    result.body_not_kept = len(cut - seen)
