"""Lua functions the lanes' scripts share (`lane_scripts.py`, `lane_release.py`; the
sweep's `Unblock`, in `duties.py`): whether a head's earlier events are all in their lanes
(`CLEAR`), whether an event's next chunks have an ordered delivery (`NONE_AFTER`), and a
lane's first delivery whose job is there, those before it whose job is gone passed over
as recorded drops (`FIRST_THERE`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dispatcher.bodies import LANE
from dispatcher.worker.record import KEEP_DROP_LUA

if TYPE_CHECKING:
    from dispatcher.keys import Keys

__all__ = ["CLEAR", "FIRST_THERE", "GONE", "NONE_AFTER", "first_there_names"]

GONE = "job data gone when its lane's turn came"

# Whether no event of the project numbered below `seq` may still add to a lane: none in
# its pending set (its last chunk not in its lanes yet) still queued (those gone from the
# queue are dropped on the way), its lanes not held (moving here: `dispatcher.shards.lanes`).
CLEAR = """
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

# Whether none of the ordered callbacks in `sets` (the project's and the platform's sets of
# them) that an event goes to (in one of its `levels`' match sets) comes after callback id
# `after`: the event's next chunks put nothing in a lane. Unknown (false) past 1,000 of
# them, or for a flag of a version before (not a set).
NONE_AFTER = """
local function none_after(sets, levels, after)
  for _, set in ipairs(sets) do
    local kind = redis.call('TYPE', set).ok
    if kind ~= 'none' and (kind ~= 'set' or redis.call('SCARD', set) > 1000) then
      return false
    end
    for _, id in ipairs(kind == 'set' and redis.call('SMEMBERS', set) or {}) do
      if tonumber(id) > after then
        for _, level in ipairs(levels) do
          if redis.call('ZSCORE', level, id) then return false end
        end
      end
    end
  end
  return true
end
"""

# `lane`'s first member ({id, score}) whose job is there, and what `read` (GET: its
# bytes; EXISTS) answered of it. A member before it whose job is gone (deleted, expired,
# ended as poison: its turn can never come) leaves the lane and the queue, on record in
# the drops of the project the lane is of (its deliveries' event's, as the engine files
# their drops: `DeliveryJob.event_project`) and in `dropped` (as `record.keep_drop`
# writes them), counted in `skipped`: marked done (a late copy of its `Enter` leaves it out),
# off its project's waiting set, its reference to its kept body given back
# (`bodies.GIVE_BACK`, which the script includes first). Unless it or its event's job
# (the fan-out, which attempts it: a delivery it attempts has no job of its own, and
# releases it) is alive: its job there, leased (a worker runs it: a claim does not extend
# a job's data, which may expire while its attempt runs) or in the queue (its claim ends
# it). Nothing (nil) when the lane is empty, its first member is such a one, or past 100
# gone in a row. Only a member whose job is gone costs more than the one read. `leave`:
# a member leaves its lane, counted off `lanes_parked` (the shard's deliveries parked
# behind a head: one joining a lane that holds one counts one more, `Enter`; one leaving
# a lane it does not empty, one fewer). Names the script declares: `queue`, `dropped`,
# `lanes_parked`, `job_prefix`, `lease_prefix`, `progress_prefix`, `progress_ttl`,
# `waiting_prefix`, `lane_body`, `dropped_prefix`, `lane_prefix`, `now_ms`.
FIRST_THERE = (
    f"local gone = {json.dumps(GONE)}\n"
    + KEEP_DROP_LUA
    + """
local skipped = 0
local function leave(lane, id)  -- one behind its head no more: a lane's parked, one fewer
  if redis.call('ZREM', lane, id) == 1 and redis.call('EXISTS', lane) == 1 then
    redis.call('DECR', lanes_parked)
  end
end
local function alive(id)
  return redis.call('EXISTS', job_prefix .. id, lease_prefix .. id) > 0
    or redis.call('ZSCORE', queue, id)
end
local function drop(lane, id)
  leave(lane, id)
  redis.call('ZREM', queue, id)
  redis.call('SET', progress_prefix .. id, 'done', 'EX', progress_ttl)
  redis.call('ZREM', waiting_prefix .. string.match(id, '^[^:]*'), id)
  give_back(lane_body .. string.gsub(id, '%.%d+@(%d+)$', '@%1'), id)  -- its body's key
  local entry = cjson.encode({jobId = id, reason = gone, at = tonumber(now_ms)})
  -- the lane's project ({prefix}{receiver}:{project}:{key}), not its id's first part:
  -- an id of a version before scoped ids is the event id, which may hold ':'
  keep_drop(string.match(string.sub(lane, #lane_prefix + 1), '^[^:]*:([^:]+):'), entry)
  skipped = skipped + 1
end
local function first_there(lane, read)
  for _ = 1, 100 do
    local first = redis.call('ZRANGE', lane, 0, 0, 'WITHSCORES')
    if #first == 0 then return nil end
    local id = first[1]
    local there = redis.call(read, job_prefix .. id)
    if there and there ~= 0 then return first, there end
    -- alive, or its event's job: the id without '.{callback id}@{emittedAt}'
    if alive(id) or alive(string.gsub(id, '%.%d+@?%d*$', '')) then return nil end
    drop(lane, id)
  end
  return nil
end
"""
)


def first_there_names(keys: Keys, progress_ttl: int) -> dict[str, Any]:
    """The prefixes and mark TTL `FIRST_THERE` reads, of the shard of `keys`: what each
    script that runs it declares besides `queue`, `dropped` and `now_ms`."""
    return {
        "job_prefix": keys.ARQ_JOB_PREFIX,
        "lease_prefix": keys.ARQ_IN_PROGRESS_PREFIX,
        "progress_prefix": keys.DELIVERY_PREFIX,
        "progress_ttl": progress_ttl,
        "waiting_prefix": keys.LANES_WAITING_PREFIX,
        "lane_body": keys.BODY_PREFIX + LANE,
        "dropped_prefix": keys.DROPPED_PREFIX,
        "lane_prefix": keys.LANE_PREFIX,
    }
