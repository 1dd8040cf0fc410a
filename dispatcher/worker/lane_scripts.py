"""The Lua scripts of ordered delivery (see `lanes.py`): `Enter` at fan-out, `Head` before a
queued delivery's attempt, `Release` with a delivery's end (the sweep's `Unblock` is in
`duties.py`). Each is a typed `Script` that names its keys and arguments once, its keys
made by `dispatcher.keys`, but those of a delivery found inside Lua (the next one, a head
parked again), made there from the prefixes given."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.bodies import GIVE_BACK, LANE
from dispatcher.ending import END_JOB, NO_JOB
from dispatcher.lua import ArgList, Key, KeyList, Script
from dispatcher.worker.lane_lua import CLEAR, FIRST_THERE, first_there_names

if TYPE_CHECKING:
    from dispatcher.ending import JobEnd
    from dispatcher.keys import Keys

__all__ = ["NEXT_TAG", "SKIPPED_TAG", "Enter", "Head", "Release"]

NEXT_TAG = b"lane:next"  # the first item of RELEASE's answer when it took the next delivery
SKIPPED_TAG = b"lane:skipped"  # ... when it took none, but dropped some whose job was gone


@dataclass
class Enter(Script):
    """An event's ordered deliveries join their lanes (`deliveries`: each one's lane, job
    key and progress mark's; `parked`: each one's id and job bytes). The event's number is
    its entry in the project's pending set; on its `last` chunk ('1') it moves to the ready
    set, and the heads that waited for it (and no earlier event) are due at `now_ms`. With
    a `job_id` (the fan-out job, whose last chunk this is and holds nothing but these
    deliveries), that job ends here when none is attempted now (`dispatcher.ending`). A
    head that waited and heads its lane no more is parked again: kept for ever, as `Head`
    parks. Answers false when the event has no number (queued before the callback was
    ordered), else per delivery: 1 attempt it now, 0 parked behind its lane's head (its job
    stored out of the queue, its progress marked "0"), 2 a head waiting for its earlier
    events (due at `recheck_ms` unless woken before), 3 left alone: it has a progress mark,
    so it entered before (this write sent again late, after its delivery was attempted,
    perhaps ended and released; or another run's); then how many waiting heads it woke,
    then 1 if the job ended. Runs together (a batch's fan-outs' entries, one call)."""

    TOGETHER = True
    LUA = (
        CLEAR
        + END_JOB
        + """
local seq = redis.call('ZSCORE', pending, event_id)
if not seq then
  seq = redis.call('ZSCORE', ready, event_id)
  if not seq then return false end
elseif last == '1' then
  redis.call('ZREM', pending, event_id)
  redis.call('ZADD', ready, seq, event_id)
end
seq = tonumber(seq)
local free = clear(hold, pending, queue, seq)
local out = {}
for i = 1, #parked / 3 do
  local lane, job, progress = deliveries[3 * i - 2], deliveries[3 * i - 1], deliveries[3 * i]
  local id = parked[3 * i - 2]
  if redis.call('EXISTS', progress) == 1 then
    out[#out + 1] = 3  -- entered before: this write sent again late, or another run's
  else
    local before = redis.call('ZRANGE', lane, 0, 0)[1]
    redis.call('ZADD', lane, 'NX', seq, id)
    local head = redis.call('ZRANGE', lane, 0, 0)[1]
    if before and before ~= head then  -- a head that waited is one no more: parked again
      redis.call('ZREM', queue, before)
      redis.call('ZREM', waiting, before)
      redis.call('PERSIST', job_prefix .. before)  -- kept for ever (put back: a day to live)
      local kept = lane_body .. string.gsub(before, '%.%d+@(%d+)$', '@%1')  -- its body's key
      if redis.call('HEXISTS', kept, before) == 1 then redis.call('PERSIST', kept) end
    end
    if head == id and free then
      out[#out + 1] = 1
    else
      redis.call('SET', job, parked[3 * i - 1], 'NX')
      if parked[3 * i] == '1' then  -- the event's body, kept once for its parked jobs, for ever
        redis.call('HSETNX', body, 'body', shared)
        redis.call('HSET', body, id, 1)
        redis.call('PERSIST', body)
      end
      redis.call('SET', progress, 0, 'NX', 'EX', progress_ttl)
      if head == id then
        redis.call('ZADD', queue, 'NX', recheck_ms, id)
        redis.call('ZADD', waiting, seq, id)
        out[#out + 1] = 2
      else
        out[#out + 1] = 0
      end
    end
  end
end
local woken = 0
if last == '1' then woken = wake(hold, pending, queue, waiting, now_ms) end
local ended = 0
if job_id ~= '' then
  ended = 1
  for i = 1, #out do
    if out[i] == 1 then ended = 0 end
  end
  if ended == 1 then ended = end_job() end
end
out[#out + 1] = woken
out[#out + 1] = ended
return out
"""
    )
    pending: Key
    queue: Key
    ready: Key
    waiting: Key
    hold: Key
    lease: Key
    job: Key
    claims: Key
    body: Key
    deliveries: KeyList
    event_id: str
    progress_ttl: int
    recheck_ms: int
    last: str
    now_ms: int
    token: str
    job_id: str
    shared: bytes
    job_prefix: str  # (a head parked again: its job's key, and its kept body's)
    lane_body: str
    parked: ArgList

    @classmethod
    def of(
        cls,
        keys: Keys,
        project_id: str,
        event_job_id: str,
        parked: Sequence[tuple[str, str, bytes]],
        *,
        progress_ttl: int,
        now_ms: int,
        recheck_ms: int,
        last: bool,
        end: JobEnd | None = None,
        body: tuple[str, bytes] | None = None,
        refers: Collection[str] = (),
    ) -> Enter:
        """`event_job_id`'s deliveries joining their lanes (`parked`: each one's lane, id,
        job bytes); `end`, its fan-out job's end; `body`, its kept body's key and bytes."""
        end = end or NO_JOB
        pending = keys.lanes_pending(project_id)
        kept, shared = body or (pending, b"")
        return cls(
            pending=pending,
            queue=keys.QUEUE,
            ready=keys.lanes_ready(project_id),
            waiting=keys.lanes_waiting(project_id),
            hold=keys.lanes_hold(project_id),
            lease=end.lease or pending,  # (no job: keys the script leaves alone)
            job=end.job or pending,
            claims=end.claims or pending,
            body=kept,
            deliveries=[
                key
                for lane, delivery_id, _ in parked
                for key in (lane, keys.arq_job(delivery_id), keys.delivery(delivery_id))
            ],
            event_id=event_job_id,
            progress_ttl=progress_ttl,
            recheck_ms=recheck_ms,
            last="1" if last else "0",
            now_ms=now_ms,
            token=end.token,
            job_id=end.job_id,
            shared=shared,
            job_prefix=keys.ARQ_JOB_PREFIX,
            lane_body=keys.BODY_PREFIX + LANE,
            parked=[x for _, d, j in parked for x in (d, j, "1" if d in refers else "0")],
        )


@dataclass
class Head(Script):
    """Whether a queued delivery's turn has come. Answers 1 when it may be attempted (its
    lane's head, its earlier events all in their lanes; or no longer in its lane: ended
    already), 0 when it was parked (out of the queue, its lease and claim count gone), 2
    when it waits shortly for its earlier events (due again at `recheck_ms`), 3 when it
    waits for the project's move to end, its lanes on the old shard (due at `held_ms`); a
    job that waits is back in the queue, its lease and claim count gone, kept for ever."""

    LUA = (
        CLEAR
        + """
local seq = redis.call('ZSCORE', lane, job_id)
if not seq then return 1 end
local parked = redis.call('ZRANGE', lane, 0, 0)[1] ~= job_id
if not parked and clear(hold, pending, queue, tonumber(seq)) then
  redis.call('ZREM', waiting, job_id)
  return 1
end
-- it waits: kept for ever, as `Enter` parks, and its body (a failed run's put-back: a day)
redis.call('PERSIST', job)
if body ~= job then redis.call('PERSIST', body) end
redis.call('DEL', lease, claims)
if parked then
  redis.call('ZREM', queue, job_id)
  redis.call('ZREM', waiting, job_id)
  return 0
end
redis.call('ZADD', waiting, seq, job_id)
local held = redis.call('EXISTS', hold) == 1
redis.call('ZADD', queue, held and held_ms or recheck_ms, job_id)
if held then return 3 end
return 2
"""
    )
    lane: Key
    pending: Key
    queue: Key
    lease: Key
    claims: Key
    waiting: Key
    hold: Key
    job: Key
    body: Key
    job_id: str
    recheck_ms: int
    held_ms: int

    @classmethod
    def of(
        cls,
        keys: Keys,
        lane: str,
        project_id: str,
        job_id: str,
        recheck_ms: int,
        held_ms: int,
        body: str | None = None,
    ) -> Head:
        """The check of `job_id`, of `project_id`'s events in `lane` (`body`: its body's)."""
        job = keys.arq_job(job_id)
        return cls(
            lane=lane,
            pending=keys.lanes_pending(project_id),
            queue=keys.QUEUE,
            lease=keys.ARQ_IN_PROGRESS_PREFIX + job_id,
            claims=keys.ARQ_RETRY_PREFIX + job_id,
            waiting=keys.lanes_waiting(project_id),
            hold=keys.lanes_hold(project_id),
            job=job,
            body=body or job,
            job_id=job_id,
            recheck_ms=recheck_ms,
            held_ms=held_ms,
        )


@dataclass
class Release(Script):
    """One delivery's end in its lane: it leaves its lane, its job ends unless another
    worker holds it (`job_id`: the delivery's own, if it is one, or the fan-out job whose
    only first attempt it was: that one only when its lease is `token`'s, as
    `dispatcher.ending` ends a job), and the lane's next delivery, when its earlier events
    are all in their lanes, is taken by `token`'s worker ('' leaves it to the queue, due
    now): queued under its lease, answered as `[NEXT_TAG, id, job bytes, progress, its
    callback's hash as HGETALL answers, skipped]` (the callback its id ends with, its
    `failing` mark its failures on record; its keys made inside). Those ahead of it whose
    job is gone leave the lane as recorded drops (`lane_lua.FIRST_THERE`): `skipped` of
    them; a release that takes none answers 0, or `[SKIPPED_TAG, skipped]` when it
    dropped some. Safe to run again."""

    LUA = (
        CLEAR
        + GIVE_BACK
        + FIRST_THERE
        + """
local function none() return skipped > 0 and {'lane:skipped', skipped} or 0 end
redis.call('ZREM', lane, delivery_id)
redis.call('ZREM', blocked, lane)
local owner = redis.call('GET', lease)
if owner == token or (not owner and job_id == delivery_id) then
  redis.call('DEL', job, lease, claims)
  redis.call('ZREM', queue, job_id)
  if body ~= lane then give_back(body, job_id) end  -- its reference to its event's body
end
local nxt, data = first_there(lane, 'GET')
if not nxt then return none() end
local id = nxt[1]
if redis.call('EXISTS', lease_prefix .. id) == 1 then
  -- leased: its holder runs it, or (killed) lets it go when the lease lapses: it must be
  -- in the queue then (a head put aside while leased is not)
  redis.call('ZADD', queue, 'NX', now_ms, id)
  return none()
end
if not clear(hold, pending, queue, tonumber(nxt[2])) then
  redis.call('ZADD', queue, 'LT', recheck_ms, id)
  redis.call('ZADD', waiting, nxt[2], id)
  return none()
end
if token == '' then
  redis.call('ZADD', queue, 'LT', now_ms, id)
  return none()
end
redis.call('ZADD', queue, now_ms, id)
redis.call('SET', lease_prefix .. id, token, 'PX', lease_ms)
local callback = string.match(id, '%.(%d+)@?%d*$')  -- {delivery id}@{emittedAt}
return {'lane:next', id, data, redis.call('GET', progress_prefix .. id) or '',
        redis.call('HGETALL', callback_prefix .. callback), skipped}
"""
    )
    TOGETHER = True  # a worker's batch of releases is one call (`Writer`)
    lane: Key
    queue: Key
    blocked: Key
    pending: Key
    job: Key
    lease: Key
    claims: Key
    waiting: Key
    hold: Key
    body: Key
    dropped: Key
    delivery_id: str
    job_id: str
    token: str
    lease_ms: int
    now_ms: int
    recheck_ms: int
    job_prefix: str
    lease_prefix: str
    progress_prefix: str
    progress_ttl: int
    waiting_prefix: str
    lane_body: str
    dropped_prefix: str
    lane_prefix: str
    callback_prefix: str

    @classmethod
    def of(
        cls,
        keys: Keys,
        lane: str,
        project_id: str,
        delivery_id: str,
        *,
        token: str,
        lease_ms: int,
        now_ms: int,
        recheck_ms: int,
        progress_ttl: int,
        end: JobEnd | None = None,
        body: str | None = None,
    ) -> Release:
        """`delivery_id`'s release from `lane` (of `project_id`'s events), with its job's
        end, or that of the job `end` names (its fan-out's), and its reference to `body`."""
        job_id = delivery_id if end is None else end.job_id
        return cls(
            lane=lane,
            queue=keys.QUEUE,
            blocked=keys.LANES_BLOCKED,
            pending=keys.lanes_pending(project_id),
            job=keys.arq_job(job_id) if end is None else end.job,
            lease=keys.ARQ_IN_PROGRESS_PREFIX + job_id if end is None else end.lease,
            claims=keys.ARQ_RETRY_PREFIX + job_id if end is None else end.claims,
            waiting=keys.lanes_waiting(project_id),
            hold=keys.lanes_hold(project_id),
            body=body or lane,
            dropped=keys.DROPPED,
            delivery_id=delivery_id,
            job_id=job_id,
            token=token,
            lease_ms=lease_ms,
            now_ms=now_ms,
            recheck_ms=recheck_ms,
            callback_prefix=keys.CALLBACK_PREFIX,
            **first_there_names(keys, progress_ttl),
        )
