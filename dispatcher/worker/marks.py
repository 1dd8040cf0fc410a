"""What a fan-out's re-run reads of the runs before it: each delivery's progress mark, so
that what they handled is left to the job they queued (`Engine._first_attempts`).

A mark is one emission's, under the delivery's progress id `{delivery id}@{emittedAt}`
(`DeliveryJob.first`): an event id emitted again has marks of its own. The version before
emission-scoped ids kept marks, retry jobs and lane entries under the delivery id alone,
and an upgrade leaves fan-outs it started and did not finish to this one. So a re-run reads
there too, for a delivery it finds unmarked:

- a mark under the delivery id written since the event was emitted (when: from the mark's
  TTL, which every write sets again; a second's margin for the clocks) is this emission's;
  one written before is an emission's before (the event id emitted again), and counts as
  none (and is deleted, should the delivery go on under that id);
- an ordered delivery in its lane under the delivery id is one that version entered as its
  lane's head, to attempt at once, and did not finish.

Such a delivery is the one under its delivery id from then on (its retry job, its lane
entry, its release), so that it goes on where that version left it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispatcher.clock import now_ms
from dispatcher.lua import run_pipeline

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import DeliveryJob, EventJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget

__all__ = ["Marked", "Pending", "read_marks"]

Pending = tuple["DeliveryJob", "CallbackTarget"]  # a delivery and its callback
Marked = tuple["DeliveryJob", "CallbackTarget", bytes | None]  # with its progress mark
LaneOf = Callable[["DeliveryJob", "CallbackTarget"], str | None]  # its lane's key, if ordered
# A mark written this close after the emission, by the writer's clock against the
# producer's, may be an emission's before: it counts as none (a repeat, never a loss).
SKEW_MS = 1000


async def read_marks(
    redis: Redis, keys: Keys, event: EventJob, pending: list[Pending], ttl_s: int, lane_of: LaneOf
) -> list[Marked]:
    """`pending`'s deliveries of `event`, each with its progress mark (None: unhandled), as
    this emission's runs left them; `ttl_s`, the marks' TTL; `lane_of`, an ordered
    delivery's lane. One round trip; a second for those the version before may hold."""
    ids = [i for job, _ in pending for i in (job.progress_id, job.delivery_id)]
    found = await redis.mget([keys.delivery(i) for i in ids])
    marked: list[Marked] = []
    older: list[tuple[int, bytes | None, str | None]] = []  # unmarked, perhaps that version's
    for n, ((job, target), mine, old) in enumerate(
        zip(pending, found[::2], found[1::2], strict=True)
    ):
        marked.append((job, target, mine))
        if mine or job.progress_id == job.delivery_id:
            continue
        lane = lane_of(job, target)
        if old or lane:
            older.append((n, old, lane))
    if not older:
        return marked

    def ask(pipe: Pipeline) -> None:
        for n, _, lane in older:
            delivery_id = pending[n][0].delivery_id
            pipe.pttl(keys.delivery(delivery_id))  # -2: no such mark
            if lane is not None:
                pipe.zscore(lane, delivery_id)

    answers = iter(await run_pipeline(redis, ask))
    now, stale = now_ms(), []
    for n, old, lane in older:
        ttl_ms = next(answers)
        in_lane = lane is not None and next(answers) is not None
        written = now - (ttl_s * 1000 - ttl_ms)
        mark = old if old and ttl_ms > 0 and written >= event.emitted_at + SKEW_MS else None
        if mark or in_lane:
            job, target, _ = marked[n]
            job = dataclasses.replace(job, progress_id=job.delivery_id, body_of=None)
            marked[n] = (job, target, mark)
            if old and not mark:  # an emission's before, under the id it goes on with
                stale.append(keys.delivery(job.delivery_id))
    if stale:  # (else its lane's entry took it for entered, and a retry for ended)
        await redis.delete(*stale)
    return marked
