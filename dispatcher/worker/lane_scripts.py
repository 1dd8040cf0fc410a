"""The Lua scripts of ordered delivery (see `lanes.py`): `ENTER` at fan-out, `HEAD` before a
queued delivery's attempt, `RELEASE` with a delivery's end. Each states its keys and
arguments once, here, as a typed Python function; none spells a key (prefixes come from
`dispatcher.keys`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.lua import Lua

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = ["NEXT_TAG", "Release", "queue_enter", "queue_head", "queue_release"]

NEXT_TAG = b"lane:next"  # the first item of RELEASE's answer when it took the next delivery

# Whether no event of the project numbered below `seq` may still add to a lane: none in
# its pending set (events whose last chunk has not entered its lanes yet) still queued,
# and the project's lanes not held (it is moving here: see `dispatcher.shards.lanes`).
# Those that have left the queue are dropped on the way.
_CLEAR = """
local function clear(hold, pending, queue, seq)
  if redis.call('EXISTS', hold) == 1 then return false end
  for _ = 1, 100 do
    local low = redis.call('ZRANGE', pending, 0, 0, 'WITHSCORES')
    if #low == 0 or tonumber(low[2]) >= seq then return true end
    if redis.call('ZSCORE', queue, low[1]) then return false end
    redis.call('ZREM', pending, low[1])
  end
  return false
end

local function wake(hold, pending, queue, waiting, now)
  if redis.call('EXISTS', hold) == 1 then return 0 end
  local floor = '-inf'
  for _ = 1, 100 do
    local low = redis.call('ZRANGE', pending, 0, 0, 'WITHSCORES')
    if #low == 0 then floor = '+inf' break end
    if redis.call('ZSCORE', queue, low[1]) then floor = low[2] break end
    redis.call('ZREM', pending, low[1])
  end
  local ids = redis.call('ZRANGEBYSCORE', waiting, '-inf', floor, 'LIMIT', 0, 100)
  for _, id in ipairs(ids) do redis.call('ZADD', queue, 'LT', now, id) end
  if #ids > 0 then redis.call('ZREM', waiting, unpack(ids)) end
  return #ids
end
"""

_ENTER = Lua(
    _CLEAR
    + """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then
  seq = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if not seq then return false end
elseif ARGV[6] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[3], seq, ARGV[1])
end
seq = tonumber(seq)
local free = clear(KEYS[5], KEYS[1], KEYS[2], seq)
local out = {}
for i = 6, #KEYS do
  local a = 8 + 2 * (i - 6)
  local id = ARGV[a]
  local before = redis.call('ZRANGE', KEYS[i], 0, 0)[1]
  redis.call('ZADD', KEYS[i], 'NX', seq, id)
  local head = redis.call('ZRANGE', KEYS[i], 0, 0)[1]
  if before and before ~= head then  -- a head that waited is one no more: parked again
    redis.call('ZREM', KEYS[2], before)
    redis.call('ZREM', KEYS[4], before)
  end
  if head == id and free then
    out[#out + 1] = 1
  else
    redis.call('SET', ARGV[2] .. id, ARGV[a + 1], 'NX')
    redis.call('SET', ARGV[3] .. id, 0, 'NX', 'EX', ARGV[4])
    if head == id then
      redis.call('ZADD', KEYS[2], 'NX', ARGV[5], id)
      redis.call('ZADD', KEYS[4], seq, id)
      out[#out + 1] = 2
    else
      out[#out + 1] = 0
    end
  end
end
local woken = 0
if ARGV[6] == '1' then woken = wake(KEYS[5], KEYS[1], KEYS[2], KEYS[4], ARGV[7]) end
out[#out + 1] = woken
return out
"""
)


def queue_enter(
    pipe: Pipeline,
    keys: Keys,
    *,
    project_id: str,
    event_job_id: str,
    lanes: Sequence[str],
    parked: Sequence[tuple[str, bytes]],
    progress_ttl: int,
    now_ms: int,
    recheck_ms: int,
    last: bool,
) -> None:
    """An event's ordered deliveries join their lanes (`parked`: each one's id and the job
    it is parked as, in the order of `lanes`). The event's number is its entry in the
    project's pending set; on its `last` chunk it moves to the ready set, and the heads
    that waited for it (and no earlier event) are due at `now_ms`. Answers false when the
    event has no number (queued before the callback was ordered), else per delivery: 1
    attempt it now, 0 parked behind its lane's head (its job stored out of the queue, its
    progress marked), 2 a head waiting for its earlier events (its job due at `recheck_ms`
    unless woken before); then how many waiting heads it woke."""
    args: list[str | bytes | int] = [
        event_job_id,
        keys.ARQ_JOB_PREFIX,
        keys.DELIVERY_PREFIX,
        progress_ttl,
        recheck_ms,
        "1" if last else "0",
        now_ms,
    ]
    for delivery_id, job in parked:
        args += (delivery_id, job)
    sets = [
        keys.lanes_pending(project_id),
        keys.QUEUE,
        keys.lanes_ready(project_id),
        keys.lanes_waiting(project_id),
        keys.lanes_hold(project_id),
    ]
    _ENTER.queue(pipe, [*sets, *lanes], args)


_HEAD = Lua(
    _CLEAR
    + """
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seq then return 1 end
if redis.call('ZRANGE', KEYS[1], 0, 0)[1] ~= ARGV[1] then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4], KEYS[5])
  redis.call('ZREM', KEYS[6], ARGV[1])
  return 0
end
if clear(KEYS[7], KEYS[2], KEYS[3], tonumber(seq)) then
  redis.call('ZREM', KEYS[6], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[6], seq, ARGV[1])
local held = redis.call('EXISTS', KEYS[7]) == 1
redis.call('ZADD', KEYS[3], held and ARGV[3] or ARGV[2], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5])
if held then return 3 end
return 2
"""
)


def queue_head(
    pipe: Pipeline,
    keys: Keys,
    *,
    lane: str,
    project_id: str,
    job_id: str,
    recheck_ms: int,
    held_ms: int,
) -> None:
    """Whether a queued delivery's turn has come. Answers 1 when it may be attempted (its
    lane's head, its earlier events all in their lanes; or no longer in its lane: ended
    already), 0 when it was parked (out of the queue, its lease and claim count gone), 2
    when it waits shortly for its earlier events (due again at `recheck_ms`), 3 when it
    waits for the project's move to end, its lanes on the old shard (due at `held_ms`);
    a job that waits is back in the queue, its lease and claim count gone."""
    _HEAD.queue(
        pipe,
        [
            lane,
            keys.lanes_pending(project_id),
            keys.QUEUE,
            keys.ARQ_IN_PROGRESS_PREFIX + job_id,
            keys.ARQ_RETRY_PREFIX + job_id,
            keys.lanes_waiting(project_id),
            keys.lanes_hold(project_id),
        ],
        [job_id, recheck_ms, held_ms],
    )


_RELEASE = Lua(
    _CLEAR
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], KEYS[1])
local owner = redis.call('GET', KEYS[6])
if not owner or owner == ARGV[6] then
  redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return 0 end
local id = nxt[1]
local job = redis.call('GET', ARGV[2] .. id)
if not job then return 0 end
if redis.call('EXISTS', ARGV[3] .. id) == 1 then
  -- leased: its holder runs it, or (killed) lets it go when the lease lapses: it must be
  -- in the queue then (a head put aside while leased is not)
  redis.call('ZADD', KEYS[2], 'NX', ARGV[5], id)
  return 0
end
if not clear(KEYS[9], KEYS[4], KEYS[2], tonumber(nxt[2])) then
  redis.call('ZADD', KEYS[2], 'LT', ARGV[8], id)
  redis.call('ZADD', KEYS[8], nxt[2], id)
  return 0
end
if ARGV[6] == '' then
  redis.call('ZADD', KEYS[2], 'LT', ARGV[5], id)
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[5], id)
redis.call('SET', ARGV[3] .. id, ARGV[6], 'PX', ARGV[7])
local callback = string.match(id, '%.(%d+)$')
return {'lane:next', id, job, redis.call('GET', ARGV[4] .. id) or '',
        redis.call('HGETALL', ARGV[9] .. callback)}
"""
)


@dataclass(frozen=True, slots=True)
class Release:
    """One delivery's end in its lane. `token`: the worker's lease token, which takes the
    lane's next delivery for that worker ('' leaves it to the queue, due now)."""

    lane: str
    project_id: str
    delivery_id: str
    token: str
    lease_ms: int
    now_ms: int
    recheck_ms: int


def queue_release(pipe: Pipeline, keys: Keys, release: Release) -> None:
    """The delivery leaves its lane, its job (if it is one) ends unless another worker holds
    it, and the lane's next delivery, when its earlier events are all in their lanes, is
    taken by `release.token`'s worker: queued under its lease, answered as `[NEXT_TAG, id,
    job bytes, progress, its callback's hash as HGETALL answers]` (its callback is the one
    its delivery id ends with; its `failing` mark says whether it has failures on record).
    Safe to run again."""
    r, job_id = release, release.delivery_id
    _RELEASE.queue(
        pipe,
        [
            r.lane,
            keys.QUEUE,
            keys.LANES_BLOCKED,
            keys.lanes_pending(r.project_id),
            keys.arq_job(job_id),
            keys.ARQ_IN_PROGRESS_PREFIX + job_id,
            keys.ARQ_RETRY_PREFIX + job_id,
            keys.lanes_waiting(r.project_id),
            keys.lanes_hold(r.project_id),
        ],
        [
            job_id,
            keys.ARQ_JOB_PREFIX,
            keys.ARQ_IN_PROGRESS_PREFIX,
            keys.DELIVERY_PREFIX,
            r.now_ms,
            r.token,
            r.lease_ms,
            r.recheck_ms,
            keys.CALLBACK_PREFIX,
        ],
    )
