"""What an attempt leaves behind: its history record (shaped from the job, its callback
and the attempt), its metrics and its one log line; and the entry a job or a delivery
ended without an attempt leaves in an operator's list (poison jobs, drops: those kept per
project, so that one project's drops never push another's out)."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from dispatcher import metrics
from dispatcher.clock import now_ms
from dispatcher.delivery import Outcome
from dispatcher.history import truncate
from dispatcher.models import PLATFORM_PROJECT, DeliveryStatus

if TYPE_CHECKING:
    from prometheus_client import Counter
    from redis.asyncio.client import Pipeline

    from dispatcher.delivery import Attempted, AttemptResult
    from dispatcher.history.record import AttemptRecord
    from dispatcher.jobs import DeliveryJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget
    from dispatcher.settings import Settings

__all__ = ["KEEP_DROP_LUA", "attempt_record", "disabled", "keep_drop", "keep_entry", "observe"]

KEPT_ENTRIES = 1000  # newest entries kept in the poison and dropped lists (each project's)
DROPS_KEPT_S = 30 * 86_400  # a project's list of drops lasts this long after its latest

# `keep_drop` in a script: `keep_drop(project, entry)` (`project` false: the shard's list
# alone), reading the shard's list at `dropped` and the projects' at `dropped_prefix`.
KEEP_DROP_LUA = f"""
local function keep_drop(project, entry)
  local lists = project and {{dropped_prefix .. project, dropped}} or {{dropped}}
  for _, list in ipairs(lists) do
    redis.call('LPUSH', list, entry)
    redis.call('LTRIM', list, 0, {KEPT_ENTRIES - 1})
  end
  if project then redis.call('EXPIRE', lists[1], {DROPS_KEPT_S}) end
end
"""

log = structlog.get_logger("dispatcher.worker")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:[/\\]*).*@", re.DOTALL)  # after its scheme


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
    # What a redelivery of this record continues; but not the emitter's in a platform-wide
    # callback's record: its attempt is in a trace of its own (`tracing.spans.attempt`), as
    # its request headers show, and the emitter's context is the emitter's (review)
    if job.trace is not None and target.project_id != PLATFORM_PROJECT:
        record.update(job.trace.fields())  # type: ignore[typeddict-item]
    if job.order_key is not None:  # delivered in its lane (see dispatcher.worker.lanes)
        record["orderKey"] = job.order_key
    if job.order_note is not None:  # its callback orders, this event went unordered: why
        record["orderNote"] = job.order_note
    if job.body_of is not None and body_text:  # its emission's body, kept once (`kept`)
        record["requestBodyOf"] = f"{job.body_of}#{len(body_text)}"
    return record


def _loggable(target: CallbackTarget) -> str:
    """The callback's URL for a log line, as its attempt's span shows it (`redacted_url`:
    query values and credentials replaced); credentials and control characters in a URL
    stored by an older version (parsed or not) cut out or escaped too."""
    url = target.destination.shown or target.url
    if target.destination.problem is None:
        return url
    if "@" in url:  # up to its last '@', whatever the URL's shape: too much rather than less
        masked = _USERINFO.sub(r"\1***@", url, count=1)
        url = masked if masked != url else "***@" + url.rpartition("@")[2]
    return url.encode("unicode_escape").decode("ascii")


@functools.lru_cache(maxsize=1024)  # outcomes x events: the labelled counter, made once
def _delivered(outcome: str, event: str) -> Counter:
    return metrics.DELIVERIES.labels(outcome=outcome, event=event)


def disabled(callback_id: int, why: str, reason: str) -> None:
    metrics.CALLBACKS_DISABLED.labels(reason=why).inc()
    log.warning("callback.disabled", callback_id=callback_id, reason=reason)


def observe(
    job: DeliveryJob,
    target: CallbackTarget,
    number: int,
    result: AttemptResult,
    delay: float | None,
    *,
    timed: bool = True,
) -> None:
    """The attempt's metrics and its one canonical log line (`timed`: its duration is an
    attempt's, not that of one given up unsent)."""
    _delivered(result.outcome.value, job.event).inc()
    if timed:
        metrics.ATTEMPT_SECONDS.observe(result.duration_ms / 1000)
    metrics.HISTORY_RECORDS.inc()
    if delay is not None:
        metrics.RETRIES.inc()
    elif result.outcome is not Outcome.SUCCESS:
        metrics.DEAD_LETTERS.inc()
    log.info(
        "delivery.attempt",
        event_id=job.event_id,
        delivery_id=job.delivery_id,
        callback_id=target.id,
        callback_url=_loggable(target),
        project_id=job.project_id,
        event_type=job.event,
        attempt=number,
        outcome=result.outcome.value,
        status_code=result.status_code,
        duration_ms=result.duration_ms,
        error=result.error,
        retry_in_s=None if delay is None else round(delay, 3),
        trace_id=None if job.trace is None else job.trace.trace_id,
    )


def keep_entry(pipe: Pipeline, key: str, entry: dict[str, Any]) -> None:
    """Queue `entry` at the head of a bounded operator list (poison jobs; drops: `keep_drop`)."""
    pipe.lpush(key, orjson.dumps({**entry, "at": now_ms()}))
    pipe.ltrim(key, 0, KEPT_ENTRIES - 1)


def keep_drop(pipe: Pipeline, keys: Keys, project_id: str | None, entry: dict[str, Any]) -> None:
    """Queue a drop's entry at the head of its project's list, the record of its drops,
    where no other project's drops push it out (`project_id`: the project whose event it
    was, `DeliveryJob.event_project`; None: no project for sure, a job unread whose id
    may be a version before's: `jobs.retry_project`), and of the shard's list of every
    project's, best-effort: a project whose retries are dropped by the thousand (its
    callback deleted) pushes the others' out of that one. As `FIRST_THERE`
    (`lane_lua.py`) writes it. A drop costs three commands more than its entry in one
    list did; a delivery that is attempted, none."""
    raw = orjson.dumps({**entry, "at": now_ms()})
    if project_id:
        own = keys.dropped(project_id)
        pipe.lpush(own, raw)
        pipe.ltrim(own, 0, KEPT_ENTRIES - 1)
        pipe.expire(own, DROPS_KEPT_S)
    pipe.lpush(keys.DROPPED, raw)
    pipe.ltrim(keys.DROPPED, 0, KEPT_ENTRIES - 1)
