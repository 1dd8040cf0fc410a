"""Ordered delivery: the deliveries of one lane start one after another, in event order.

A callback registered with `orderBy` (see `registry.options`) has one *lane* per value of
that path in its events' data (per emitting project; `*`: one lane per project). A lane is
a sorted set of delivery ids scored by their event's sequence number, which Redis gave the
event when it queued it (`dispatcher.sequence`). Its lowest member, the *head*, is the one
delivery of the lane that may be attempted; the others wait, their `deliver` jobs parked
(stored, out of the queue). Three scripts keep it:

- `ENTER`, at fan-out, before any attempt (one call per chunk of the event's callbacks):
  each ordered delivery joins its lane; a head is attempted at once, inside the fan-out,
  as any delivery is; the others are parked. A head waits (its job due again shortly) while
  an event of its project numbered lower may still add a delivery to a lane: one whose
  fan-out job is still in the queue (the project's *pending* set).
- `HEAD`, before a `deliver` job's attempt: a job that is no longer its lane's head (a
  lower-numbered delivery joined after it was queued) is parked again; one whose earlier
  events are still being fanned out waits shortly.
- `RELEASE`, queued on the pipeline that writes the delivery's end (its SUCCESS record,
  its final FAILED record, or its recorded drop), after them: the head leaves its lane and
  the next one's job is queued, due now. A crash can therefore not release a lane without
  its record; a record written without its release (a crash mid-pipeline) is released
  again by the job's next run, which finds the delivery done.

Retries and deferrals of the head hold its lane (its job waits in the queue as any other):
the lane is then *blocked*, listed in `LANES_BLOCKED` by when, until the head ends. A
delivery run twice (its worker killed mid-attempt) repeats the head of its lane, never a
delivery behind it. An event whose data has no value at the path is delivered unordered,
and its records say so (`orderNote`), as are events queued before the callback was ordered.
Redeliveries of past records bypass lanes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dispatcher.jobs import DeliveryJob, encode, now_ms
from dispatcher.lua import Lua
from dispatcher.registry.options import order_key

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget
    from dispatcher.worker.engine import Then
    from dispatcher.worker.writer import Writer

__all__ = ["ENTER", "HEAD", "RELEASE", "Lanes"]

RECHECK_S = 0.05  # a head whose earlier events are still being fanned out: looked at again
NO_KEY = "unordered: the event's data has no value at orderBy {path!r}"
NOT_NUMBERED = "unordered: the event was queued before its callback was ordered"

# Whether no event of the project numbered below `seq` may still add to a lane: each one
# below it has left the queue, or is marked ' ready' (its last chunk entered its lanes).
# Those that have left the queue are dropped on the way.
_CLEAR = """
local function clear(pending, queue, seq)
  local offset = 0
  while offset < 200 do
    local low = redis.call('ZRANGE', pending, offset, offset, 'WITHSCORES')
    if #low == 0 or tonumber(low[2]) >= seq then return true end
    local id, entered = low[1], false
    if string.sub(id, -6) == ' ready' then id, entered = string.sub(id, 1, -7), true end
    if not redis.call('ZSCORE', queue, id) then
      redis.call('ZREM', pending, low[1])
    elseif entered then
      offset = offset + 1
    else
      return false
    end
  end
  return false
end
"""
# KEYS: the project's pending set, the queue, then each delivery's lane. ARGV: the event's
# job id, the job prefix, the progress prefix, progress ttl s, due ms of a waiting head,
# '1' when this is the event's last chunk (its pending entry is then marked ' ready'), then
# per delivery its id and its parked job's bytes. Returns false when the event has no
# number (queued before the callback was ordered), else per delivery: 1 attempt it now,
# 0 parked behind its lane's head, 2 a head waiting for its earlier events.
ENTER = Lua(
    _CLEAR
    + """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then
  seq = redis.call('ZSCORE', KEYS[1], ARGV[1] .. ' ready')
  if not seq then return false end
elseif ARGV[6] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[1], seq, ARGV[1] .. ' ready')
end
seq = tonumber(seq)
local free = clear(KEYS[1], KEYS[2], seq)
local out = {}
for i = 3, #KEYS do
  local a = 7 + 2 * (i - 3)
  local id = ARGV[a]
  redis.call('ZADD', KEYS[i], 'NX', seq, id)
  local head = redis.call('ZRANGE', KEYS[i], 0, 0)[1]
  if head == id and free then
    out[#out + 1] = 1
  else
    redis.call('SET', ARGV[2] .. id, ARGV[a + 1], 'NX')
    redis.call('SET', ARGV[3] .. id, 0, 'NX', 'EX', ARGV[4])
    if head == id then
      redis.call('ZADD', KEYS[2], 'NX', ARGV[5], id)
      out[#out + 1] = 2
    else
      out[#out + 1] = 0
    end
  end
end
return out
"""
)

# KEYS: the delivery's lane, its project's pending set, the queue, its job's lease, its
# job's claim count. ARGV: its id. Returns 1 when it may be attempted (the head, its
# earlier events all fanned out; or no longer in its lane: ended already), 0 when it was
# parked (out of the queue, lease and claim count gone), 2 when it must wait shortly.
HEAD = Lua(
    _CLEAR
    + """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then return 1 end
if redis.call('ZRANGE', KEYS[1], 0, 0)[1] ~= ARGV[1] then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4], KEYS[5])
  return 0
end
if clear(KEYS[2], KEYS[3], tonumber(seq)) then return 1 end
return 2
"""
)

# KEYS: the delivery's lane, the queue, the blocked lanes. ARGV: its id, the job prefix,
# now ms. The delivery leaves its lane; the next one's parked job is queued, due now (one
# queued for later, waiting for its earlier events, is due now too). Safe to run again.
RELEASE = Lua("""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], KEYS[1])
local next = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if next and redis.call('EXISTS', ARGV[2] .. next) == 1 then
  redis.call('ZADD', KEYS[2], 'LT', ARGV[3], next)
  return 1
end
return 0
""")

Attempt = tuple[DeliveryJob, "CallbackTarget", "Then"]


class Lanes:
    """The lanes of one shard, as one worker process keeps them (its writer writes)."""

    def __init__(self, keys: Keys, writer: Writer, progress_ttl: int) -> None:
        self.keys = keys
        self.writer = writer
        self.progress_ttl = progress_ttl
        self.released = 0  # releases queued: the loop looks for a next head at once

    def lane(self, job: DeliveryJob) -> str:
        assert job.order_key is not None
        return self.keys.lane(job.callback_id, job.emitter or job.project_id, job.order_key)

    async def enter(
        self,
        event: EventJob,
        pending: list[tuple[DeliveryJob, CallbackTarget]],
        then_of: Callable[[DeliveryJob], Then],
        *,
        last: bool = True,
    ) -> list[Attempt]:
        """The first attempts of a fan-out's chunk to make now: every unordered delivery,
        and each ordered one that heads its lane (the others are parked, in one write).
        `last`: the event's last chunk (no more of its deliveries will join a lane)."""
        now: list[Attempt] = []
        ordered: list[tuple[DeliveryJob, CallbackTarget]] = []
        for job, target in pending:
            path = target.options.order_by
            key = None if path is None else order_key(path, event.data)
            if path is None:
                now.append((job, target, then_of(job)))
            elif key is None:
                job = dataclasses.replace(job, order_note=NO_KEY.format(path=path))
                now.append((job, target, then_of(job)))
            else:
                ordered.append((dataclasses.replace(job, order_key=key), target))
        if ordered:
            now += await self._enter(event, ordered, then_of, last)
        return now

    async def _enter(
        self,
        event: EventJob,
        ordered: list[tuple[DeliveryJob, CallbackTarget]],
        then_of: Callable[[DeliveryJob], Then],
        last: bool,
    ) -> list[Attempt]:
        k = self.keys
        stamp = now_ms()
        args: list[str | bytes | int] = [
            event.job_id, k.ARQ_JOB_PREFIX, k.DELIVERY_PREFIX, self.progress_ttl,
            stamp + int(RECHECK_S * 1000), "1" if last else "0",
        ]  # fmt: skip
        for job, _ in ordered:
            args += (job.job_id, encode(job, stamp))
        lanes = [self.lane(job) for job, _ in ordered]
        keys = [k.lanes_pending(event.project_id), k.QUEUE, *lanes]
        (answer,) = await self.writer.commit(lambda pipe: ENTER.queue(pipe, keys, args))
        if answer is None:  # queued before the callback was ordered: no number
            return [
                (note, target, then_of(note))
                for job, target in ordered
                for note in [dataclasses.replace(job, order_key=None, order_note=NOT_NUMBERED)]
            ]
        return [
            (job, target, self.releasing(job, then_of(job)))
            for (job, target), verdict in zip(ordered, answer, strict=True)
            if verdict == 1
        ]

    async def claimed(self, job: DeliveryJob, then: Then) -> Then | None:
        """Before a `deliver` job's attempt: its next step, releasing its lane when it ends;
        None when it is not its turn (it was parked, or waits shortly: `then` queued)."""
        k = self.keys
        keys = [
            self.lane(job), k.lanes_pending(job.emitter or job.project_id), k.QUEUE,
            k.ARQ_IN_PROGRESS_PREFIX + job.job_id, k.ARQ_RETRY_PREFIX + job.job_id,
        ]  # fmt: skip
        (verdict,) = await self.writer.commit(lambda pipe: HEAD.queue(pipe, keys, [job.job_id]))
        if verdict == 0:
            return None
        if verdict == 2:
            await self.writer.commit(lambda pipe: then(pipe, RECHECK_S))
            return None
        return self.releasing(job, then)

    def releasing(self, job: DeliveryJob, then: Then) -> Then:
        """`then`, and the lane's release when the delivery ends (queued before the job's
        own end, after its record); a head put back marks its lane blocked."""
        lane = self.lane(job)

        def step(pipe: Pipeline, delay: float | None) -> None:
            if delay is None:
                self.release(pipe, lane, job.job_id)
            else:
                pipe.zadd(self.keys.LANES_BLOCKED, {lane: now_ms()}, nx=True)
            then(pipe, delay)

        return step

    def release(self, pipe: Pipeline, lane: str, delivery_id: str) -> None:
        """Queue the end of `delivery_id`'s turn in `lane`."""
        self.released += 1
        RELEASE.queue(
            pipe,
            [lane, self.keys.QUEUE, self.keys.LANES_BLOCKED],
            [delivery_id, self.keys.ARQ_JOB_PREFIX, now_ms()],
        )

    def ended_before(
        self,
        event: EventJob,
        pending: list[tuple[DeliveryJob, CallbackTarget]],
        marks: list[bytes | None],
    ) -> None:
        """A fan-out run again: the ordered deliveries that ended in the run before (their
        progress done) release their lanes again, in case that run wrote their records but
        not their releases (it died mid-pipeline)."""
        for (job, target), mark in zip(pending, marks, strict=True):
            path = target.options.order_by
            key = None if path is None or mark != b"done" else order_key(path, event.data)
            if key is not None:
                self.writer.submit(self._releaser(dataclasses.replace(job, order_key=key)))

    def _releaser(self, job: DeliveryJob) -> Callable[[Pipeline], None]:
        lane = self.lane(job)
        return lambda pipe: self.release(pipe, lane, job.job_id)
