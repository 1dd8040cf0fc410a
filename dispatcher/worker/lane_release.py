"""The Lua script of a delivery's end in its lane (see `lanes.py`): `Release`, queued with
the delivery's record; it hands the lane's next delivery to the releasing worker. A typed
`Script` as those of `lane_scripts.py`, the keys of the next delivery made inside Lua from
the prefixes given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.bodies import GIVE_BACK
from dispatcher.lua import Key, Script
from dispatcher.worker.lane_lua import CLEAR, FIRST_THERE, first_there_names

if TYPE_CHECKING:
    from dispatcher.ending import JobEnd
    from dispatcher.keys import Keys

__all__ = ["NEXT_TAG", "SKIPPED_TAG", "Release"]

NEXT_TAG = b"lane:next"  # the first item of RELEASE's answer when it took the next delivery
SKIPPED_TAG = b"lane:skipped"  # ... when it took none, but dropped some whose job was gone


@dataclass
class Release(Script):
    """One delivery's end in its lane: it leaves its lane, its job ends unless another
    worker holds it (`job_id`: the delivery's own, if it is one, or the fan-out job whose
    only first attempt it was: that one only when its lease is `token`'s, as
    `dispatcher.ending` ends a job), and the lane's next delivery, when its earlier events
    are all in their lanes, is taken by `token`'s worker ('' leaves it to the queue, due
    now): queued under its lease, answered as `[NEXT_TAG, id, job bytes, progress, its
    circuit state (`circuit.waiting_key`), its callback's hash as HGETALL answers,
    skipped]` (the callback its id ends with, its
    `failing` mark its failures on record; its keys made inside). Those ahead of it whose
    job is gone leave the lane as recorded drops (`lane_lua.FIRST_THERE`): `skipped` of
    them; a release that takes none answers 0, or `[SKIPPED_TAG, skipped]` when it
    dropped some. Safe to run again. A release with a `token` while another worker's lease
    holds the delivery, or the job its attempt ran `under` (this one was paused past it;
    that one attempts it now), leaves the lane and the jobs alone and answers 0: the
    holder releases it when its attempt ends (or, killed, its lease lapses and the
    delivery runs again, then releases)."""

    LUA = (
        CLEAR
        + GIVE_BACK
        + FIRST_THERE
        + """
local function none() return skipped > 0 and {'lane:skipped', skipped} or 0 end
for _, id in ipairs({delivery_id, under}) do  -- its job's lease, the attempt's job's
  local holder = token ~= '' and redis.call('GET', lease_prefix .. id)
  -- another worker's (this one was paused past its lease): the delivery is still the
  -- lane's head, in flight there; that worker releases it when its attempt ends
  if holder and holder ~= token then return 0 end
end
leave(lane, delivery_id)
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
local progress = progress_prefix .. id
return {'lane:next', id, data, redis.call('GET', progress) or '',
        redis.call('GET', progress .. ':w') or '',
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
    lanes_parked: Key
    delivery_id: str
    job_id: str
    under: str
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
        under: str | None = None,
    ) -> Release:
        """`delivery_id`'s release from `lane` (of `project_id`'s events), with its job's
        end, or that of the job `end` names (its fan-out's), and its reference to `body`;
        `under`: the job whose lease its attempt ran under (a fan-out's), if not its own."""
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
            lanes_parked=keys.LANES_PARKED,
            delivery_id=delivery_id,
            job_id=job_id,
            under=under or delivery_id,
            token=token,
            lease_ms=lease_ms,
            now_ms=now_ms,
            recheck_ms=recheck_ms,
            callback_prefix=keys.CALLBACK_PREFIX,
            **first_there_names(keys, progress_ttl),
        )
