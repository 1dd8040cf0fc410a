"""Callbacks' filters in the worker: at fan-out, the chunk's targets whose `filter` lets an
event through (`Filters.select`). The filter comes with the callback's row (the match
script's), so a chunk without filters costs nothing here; see `registry.filters` for what
a filter may spend on an event."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from dispatcher import metrics
from dispatcher.clock import now_ms
from dispatcher.registry.filters import FilterBudget, FilterFailed, filter_matches

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget
    from dispatcher.worker.shares import Shares
    from dispatcher.worker.writer import Writer

__all__ = ["Filters"]

log = structlog.get_logger("dispatcher.worker")


class Filters:
    """The filters of one worker process: their failures counted through its `writer`,
    the time they take told to its `shares` (a project's pace)."""

    def __init__(self, keys: Keys, writer: Writer, shares: Shares | None = None) -> None:
        self.keys = keys
        self.writer = writer
        self.shares = shares  # told the loop's time filters take, per project (its pace)

    def select(self, event: EventJob, targets: list[CallbackTarget]) -> list[CallbackTarget]:
        """The targets whose filter lets `event` through (those without one, all). A filter
        that raises fails alone: counted for its callback, logged, the event not sent; so
        does one past what its owner's filters may spend on the event (`FilterBudget`).
        The time they take is the event's project's, against its pace (`Shares.filtered`)."""
        if all(target.options.filter is None for target in targets):
            return targets
        envelope = {"event": event.event, "projectId": event.project_id, "data": event.data}
        kept, started = [], time.perf_counter()
        budgets: dict[str, FilterBudget] = {}  # per owner: one's filters never spend another's
        try:
            for target in targets:
                expression = target.options.filter
                budget = budgets.setdefault(target.project_id, FilterBudget())
                try:
                    if expression is None or filter_matches(expression, envelope, budget):
                        kept.append(target)
                    else:
                        metrics.FILTERED.labels(result="skipped").inc()
                except FilterFailed as exc:
                    self._filter_failed(event, target, str(exc))
        finally:
            if self.shares is not None:  # the event's project pays, whoever owns the filters
                self.shares.filtered(event.project_id, time.perf_counter() - started)
        return kept

    def _filter_failed(self, event: EventJob, target: CallbackTarget, error: str) -> None:
        metrics.FILTERED.labels(result="error").inc()
        log.warning(
            "delivery.filter_failed",
            event_id=event.id,
            callback_id=target.id,
            event_type=event.event,
            error=error,
        )
        key = self.keys.filter_errors(target.id)

        def count(pipe: Pipeline) -> None:
            pipe.hincrby(key, "n", 1)
            pipe.hset(key, mapping={"lastError": error, "lastAt": now_ms()})

        self.writer.submit(count)  # rides along with the next attempts' writes
