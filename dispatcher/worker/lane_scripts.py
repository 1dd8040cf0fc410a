"""The Lua scripts of ordered delivery (see `lanes.py`): `Enter` at fan-out, `Head` before a
queued delivery's attempt (`Release`, with a delivery's end, is in `lane_release.py`; the
sweep's `Unblock` in `duties.py`). Each is a typed `Script` that names its keys and
arguments once, its keys made by `dispatcher.keys`, but those of a delivery found inside
Lua (a head parked again), made there from the prefixes given."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher import clock
from dispatcher.bodies import LANE
from dispatcher.ending import END_JOB, END_JOBS, ENDS, NO_JOB
from dispatcher.lua import ArgList, Key, KeyList, Script
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.worker.lane_lua import CLEAR, NONE_AFTER

if TYPE_CHECKING:
    from dispatcher.ending import JobEnd
    from dispatcher.jobs import DeliveryJob
    from dispatcher.keys import Keys

__all__ = ["LATE", "RECHECK_MAX_S", "RECHECK_S", "Enter", "Head", "recheck_at"]

LATE = 4  # ENTER's answer for a delivery whose callback was ordered after its event's lanes
RECHECK_S = 0.05  # a head whose earlier events are still being fanned out: looked at again
RECHECK_MAX_S = 5.0  # ... after half its event's age, this at most (`recheck_at`)


@dataclass
class Enter(Script):
    """An event's ordered deliveries join their lanes (`deliveries`: each one's lane, job
    key and progress mark's; `parked`: each one's id and job bytes). The event's number is
    its entry in the project's pending set; on its `last` chunk ('1'), or one `after` which
    none of its event's levels (`level1`..3) has an ordered callback (`NONE_AFTER`), it
    moves to the ready set, and the heads that waited for it (and no earlier event) are due
    at `now_ms` (a chunk with no ordered delivery enters none: it does only that). With
    a `job_id` (the fan-out job, whose last chunk this is and holds nothing but these
    deliveries), that job ends here when none is attempted now (`dispatcher.ending`). A
    head that waited and heads its lane no more is parked again: kept for ever, as `Head`
    parks. Answers false when the event has no number (queued before the callback was
    ordered), else per delivery: 1 attempt it now, 0 parked behind its lane's head (its job
    stored out of the queue, its progress marked "0"), 2 a head waiting for its earlier
    events (due at `recheck_ms` unless woken before), 3 left alone: it has a progress mark,
    so it entered before (this write sent again late, after its delivery was attempted,
    perhaps ended and released; or another run's), `LATE` attempt it now, unordered: the
    event was in the ready set already and it is not in its lane (its callback was ordered
    since the event let its lanes go); then how many waiting heads it woke, then 1 if the
    job ended. Runs together (a batch's fan-outs' entries, one call)."""

    TOGETHER = True
    BEFORE, AFTER = ENDS, END_JOBS  # its jobs end once every call ran
    LUA = (
        CLEAR
        + END_JOB
        + NONE_AFTER
        + """
local seq, late = redis.call('ZSCORE', pending, event_id), false
if not seq then
  seq, late = redis.call('ZSCORE', ready, event_id), true
  if not seq then return false end
elseif last == '1' or (after ~= '' and none_after({ordered, platform_ordered},
                                                   {level1, level2, level3}, tonumber(after))) then
  last = '1'
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
  elseif late and not redis.call('ZSCORE', lane, id) then
    out[#out + 1] = 4  -- never entered, the lanes let go: ordered since
  else
    local before = redis.call('ZRANGE', lane, 0, 0)[1]
    if redis.call('ZADD', lane, 'NX', seq, id) == 1 and before then  -- behind another
      redis.call('INCR', lanes_parked)  -- (`lane_lua.FIRST_THERE`)
    end
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
        redis.call('ZADD', blocked, 'NX', now_ms, lane)  -- held: listed from its first wait
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
    if out[i] == 1 or out[i] == 4 then ended = 0 end
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
    blocked: Key
    lease: Key
    job: Key
    claims: Key
    body: Key
    ordered: Key
    platform_ordered: Key
    level1: Key
    level2: Key
    level3: Key
    lanes_parked: Key
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
    after: str
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
        beyond: tuple[Sequence[str], int] | None = None,
    ) -> Enter:
        """`event_job_id`'s deliveries joining their lanes (`parked`: lane, id, job bytes each);
        `end`: its fan-out job's end; `body`: its kept body's key and bytes; `beyond`: `_beyond`."""
        end, pending = end or NO_JOB, keys.lanes_pending(project_id)
        kept, shared = body or (pending, b"")
        return cls(
            pending=pending,
            queue=keys.QUEUE,
            ready=keys.lanes_ready(project_id),
            waiting=keys.lanes_waiting(project_id),
            hold=keys.lanes_hold(project_id),
            blocked=keys.LANES_BLOCKED,
            lanes_parked=keys.LANES_PARKED,
            lease=end.lease or pending,  # (no job: keys the script leaves alone)
            job=end.job or pending,
            claims=end.claims or pending,
            body=kept,
            **_beyond(keys, project_id, beyond),
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


def _beyond(
    keys: Keys, project_id: str, beyond: tuple[Sequence[str], int] | None
) -> dict[str, Any]:
    """What `Enter` reads of the ordered callbacks after a chunk (`beyond`: its event's
    match sets, and where the next chunk starts; None for the last chunk)."""
    levels, after = beyond or ([keys.lanes_pending(project_id)], "")
    level1, level2, level3 = [*levels, levels[-1], levels[-1]][:3]  # (fewer: one read again)
    return {
        "ordered": keys.lanes_ordered(project_id),
        "platform_ordered": keys.lanes_ordered(PLATFORM_PROJECT),
        "level1": level1,
        "level2": level2,
        "level3": level3,
        "after": str(after),
    }


@dataclass
class Head(Script):
    """Whether a queued delivery's turn has come. Answers 1 when it may be attempted (its
    lane's head, its earlier events all in their lanes; or no longer in its lane: ended
    already), 0 when it was parked (out of the queue, its lease and claim count gone), 2
    when it waits for its earlier events (due again at `recheck_ms`, unless the event it
    waits for wakes it before), 3 when it waits for the project's move to end, its lanes
    on the old shard (due at `held_ms`); a job that waits is back in the queue, its lease
    and claim count gone, kept for ever. A head that may go wakes the next 100 of its
    project's waiting heads whose earlier events are in their lanes (`wake`: numbered up
    to the lowest event still pending, due at `now_ms`), so woken heads wake the rest in
    turn; it woke only those numbered no higher than itself, and heads of more than 100
    events behind one slow event waited for their own look, up to 5 s (review)."""

    LUA = (
        CLEAR
        + """
local seq = redis.call('ZSCORE', lane, job_id)
if not seq then return 1 end
local parked = redis.call('ZRANGE', lane, 0, 0)[1] ~= job_id
if not parked and clear(hold, pending, queue, tonumber(seq)) then
  redis.call('ZREM', waiting, job_id)
  wake(hold, pending, queue, waiting, now_ms)
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
redis.call('ZADD', blocked, 'NX', now_ms, lane)  -- held: listed from its first wait
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
    blocked: Key
    job: Key
    body: Key
    job_id: str
    recheck_ms: int
    held_ms: int
    now_ms: int

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
        now_ms: int | None = None,
    ) -> Head:
        """The check of `job_id`, of `project_id`'s events in `lane` (`body`: its body's;
        `now_ms`, by default the clock's)."""
        job = keys.arq_job(job_id)
        return cls(
            lane=lane,
            pending=keys.lanes_pending(project_id),
            queue=keys.QUEUE,
            lease=keys.ARQ_IN_PROGRESS_PREFIX + job_id,
            claims=keys.ARQ_RETRY_PREFIX + job_id,
            waiting=keys.lanes_waiting(project_id),
            hold=keys.lanes_hold(project_id),
            blocked=keys.LANES_BLOCKED,
            job=job,
            body=body or job,
            job_id=job_id,
            recheck_ms=recheck_ms,
            held_ms=held_ms,
            now_ms=clock.now_ms() if now_ms is None else now_ms,
        )


def recheck_at(job: DeliveryJob, now: int) -> int:
    """When a queued head that waits for its earlier events looks again, unless one wakes
    it first (`Enter` as the event it waits for enters its lanes, `Head` as a head that
    waited for the same goes on): after half its event's age (its progress id's
    `@{emittedAt}`), `RECHECK_S` at least, `RECHECK_MAX_S` at most. A backoff without
    state, for a head nothing wakes (the event it waits for was dropped): a head held 8 s
    looks 13 times, not 160 (every 50 ms)."""
    _, at, emitted = job.progress_id.rpartition("@")
    age = now - int(emitted) if at and emitted.isdigit() else 0
    return now + min(max(age // 2, int(RECHECK_S * 1000)), int(RECHECK_MAX_S * 1000))
