"""Callbacks' filters in the worker: at fan-out, the chunk's targets whose `filter` lets an
event through (`Filters.select`). The filter comes with the callback's row (the match
script's), so a chunk without filters costs nothing here; see `registry.filters` for what
a filter may spend on an event.

One delivery per URL: a target a broader level's callback to the same URL shadows (one
with a filter: without, the match leaves the target out) is dropped when that callback's
filter takes the event, and gets the event when none of its shadows' filters does. A
shadow in the chunk counts as its own filter decided; one in another chunk has its filter
run again here, on its own owner's budget (never the shadowed target's owner's: a project
could drain its own budget to make the operator's filter fail, or learn from its own
filters' failures what the operator's spent; its failure is counted where the callback is
a target, not here)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from dispatcher import metrics
from dispatcher.clock import now_ms
from dispatcher.health import FilterError
from dispatcher.registry.filters import FilterBudget, FilterFailed, filter_matches
from dispatcher.registry.match import NO_SHADOWS, Shadows

if TYPE_CHECKING:
    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget
    from dispatcher.registry.match import Shadow
    from dispatcher.worker.shares import Shares
    from dispatcher.worker.writer import Writer

__all__ = ["Filters"]

Envelope = Mapping[str, object]  # what a filter runs on: {"event", "projectId", "data"}

log = structlog.get_logger("dispatcher.worker")


class Filters:
    """The filters of one worker process: their failures counted through its `writer`,
    the time they take told to its `shares` (a project's pace)."""

    def __init__(self, keys: Keys, writer: Writer, shares: Shares | None = None) -> None:
        self.keys = keys
        self.writer = writer
        self.shares = shares  # told the loop's time filters take, per project (its pace)

    def select(
        self, event: EventJob, targets: list[CallbackTarget], shadows: Shadows = NO_SHADOWS
    ) -> list[CallbackTarget]:
        """The targets whose filter lets `event` through (those without one, all), less the
        shadowed ones whose shadow's filter takes it (`shadows`, by target id: see the
        module's doc). A filter that raises fails alone: counted for its callback, logged,
        the event not sent; so does one past what its owner's filters may spend on the
        event (`FilterBudget`). The time they take is the event's project's, against its
        pace (`Shares.filtered`)."""
        if not shadows and all(target.options.filter is None for target in targets):
            return targets
        envelope = {"event": event.event, "projectId": event.project_id, "data": event.data}
        started = time.perf_counter()
        budgets: dict[str, FilterBudget] = {}  # per owner: one's filters never spend another's
        taken: dict[int, bool] = {}  # by callback id: whether its own filter lets it through
        others: dict[int, bool] = {}  # the same, of shadows in other chunks
        # the shadowed last, the fewer shadows first: a target's shadows in the chunk
        # (broader, so with fewer shadows) are decided before it, each filter run once
        order = sorted(targets, key=lambda t: len(shadows.get(t.id, ()))) if shadows else targets
        try:
            for target in order:
                budget = budgets.setdefault(target.project_id, FilterBudget())
                over = shadows.get(target.id) if shadows else None
                if over is None or not _shadowed(over, envelope, budgets, taken, others):
                    taken[target.id] = self._lets_through(event, target, envelope, budget)
        finally:
            if self.shares is not None:  # the event's project pays, whoever owns the filters
                self.shares.filtered(event.project_id, time.perf_counter() - started)
        return [target for target in targets if taken.get(target.id)]

    def _lets_through(
        self, event: EventJob, target: CallbackTarget, envelope: Envelope,
        budget: FilterBudget,
    ) -> bool:  # fmt: skip
        expression = target.options.filter
        try:
            if expression is None or filter_matches(expression, envelope, budget):
                return True
            metrics.FILTERED.labels(result="skipped").inc()
        except FilterFailed as exc:
            self._filter_failed(event, target, str(exc))
        return False

    def _filter_failed(self, event: EventJob, target: CallbackTarget, error: str) -> None:
        metrics.FILTERED.labels(result="error").inc()
        log.warning(
            "delivery.filter_failed",
            event_id=event.id,
            callback_id=target.id,
            event_type=event.event,
            error=error,
        )
        count = FilterError(
            self.keys.filter_errors(target.id), self.keys.callback(target.id), error, now_ms()
        )
        self.writer.submit(count.queue_on)  # rides along with the next attempts' writes


def _shadowed(
    over: tuple[Shadow, ...], envelope: Envelope, budgets: dict[str, FilterBudget],
    taken: dict[int, bool], others: dict[int, bool],
) -> bool:  # fmt: skip
    """Whether one of a target's shadows (`over`, broadest first) takes the event: as its
    own filter decided in this chunk (`taken`), or, in another chunk, as its filter does
    run here on its owner's budget (`budgets`; `others` keeps the answer; a failure is no
    take)."""
    for shadow in over:
        took = taken.get(shadow.callback_id, others.get(shadow.callback_id))
        if took is None:
            try:
                budget = budgets.setdefault(shadow.owner, FilterBudget())
                took = filter_matches(shadow.filter, envelope, budget)
            except FilterFailed:
                took = False
            others[shadow.callback_id] = took
        if took:
            return True
    return False
