"""The registry's Lua scripts. None spells a key or a separator: each gets its keys in
KEYS, and the prefixes and separators it needs to build one from a value read inside Redis
in ARGV, from `dispatcher.keys` (`tests/service/test_keys.py` checks both sides agree)."""

from __future__ import annotations

from dispatcher.lua import Lua

__all__ = ["DELETE", "DISABLE", "MATCH", "PUT", "ROTATE", "SET_ENABLED", "UPGRADE", "UPSERT"]

# KEYS: upsert hash, id counter, match zset, disabled zset, failing zset, then the listing
# zsets the callback joins when created (its project's; its pipeline's too).
# ARGV: upsert field, now, callback prefix, health prefix, filter errors prefix, the number
# n of field/value pairs written only when the callback is created, the first id of the
# shard's range (see `dispatcher/shard.py`), those n pairs, then the pairs written by every
# registration (see `store.Upsert.argv`). Re-enables the callback
# and clears its failure count (and its `failing` mark) and filter errors. Returns {id, 1
# when created}.
UPSERT = Lua("""
local id = redis.call('HGET', KEYS[1], ARGV[1])
local created = 0
if not id then
  if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[7]) then
    redis.call('SET', KEYS[2], ARGV[7])
  end
  id = tostring(redis.call('INCR', KEYS[2]))
  created = 1
  redis.call('HSET', KEYS[1], ARGV[1], id)
  for i = 6, #KEYS do redis.call('ZADD', KEYS[i], id, id) end
end
local key = ARGV[3] .. id
local once = 8 + 2 * tonumber(ARGV[6])
if created == 1 then
  local fields = {'id', id, 'createdTime', ARGV[2]}
  for i = 8, once - 1 do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', key, unpack(fields))
end
local fields = {'enabled', '1', 'disabledReason', '', 'failing', '0', 'updatedTime', ARGV[2]}
for i = once, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
redis.call('ZADD', KEYS[3], id, id)
redis.call('ZREM', KEYS[4], id)
redis.call('DEL', ARGV[4] .. id, ARGV[5] .. id)
redis.call('ZREM', KEYS[5], id)
return {tonumber(id), created}
""")

# KEYS: the match zsets of an event's levels, broadest first (platform, project, pipeline),
# then the upsert hashes of the same levels. ARGV: cursor (a callback id), chunk size,
# callback prefix, upsert field prefix ("{event} "), then the names of the hash fields a
# delivery needs (`match.TARGET_FIELDS`: 'url' and 'enabled' first).
# The chunk is the `size` smallest ids after the cursor over all levels, less the disabled
# ones and those whose URL a broader level sends the same event to (one delivery per URL;
# a level without callbacks is not asked, and is known to have none at cursor 0 when its
# range is empty, or else by one EXISTS a chunk).
# Returns {next cursor ('' when nothing follows), rows}; a row is {id, level index, then
# the values of the named fields}.
MATCH = Lua("""
local n = #KEYS / 2
local size = tonumber(ARGV[2])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local found = {}
local more = false
local empty = {}  -- levels without callbacks: no URL of theirs to give way to
for lvl = 1, n do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[lvl], '(' .. ARGV[1], '+inf', 'LIMIT', 0, size)
  if #ids == size then more = true end
  empty[lvl] = #ids == 0 and (ARGV[1] == '0' or redis.call('EXISTS', KEYS[lvl]) == 0)
  for _, id in ipairs(ids) do found[#found + 1] = {tonumber(id), id, lvl} end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
if #found > size then more = true end
local taken = math.min(#found, size)
local rows = {}
for i = 1, taken do
  local id, lvl = found[i][2], found[i][3]
  local values = redis.call('HMGET', ARGV[3] .. id, unpack(fields))
  local keep = values[1] and values[2] == '1'
  for broader = 1, lvl - 1 do
    if keep and not empty[broader] then
      local other = redis.call('HGET', KEYS[n + broader], ARGV[4] .. values[1])
      if other and redis.call('ZSCORE', KEYS[broader], other) then keep = false end
    end
  end
  if keep then
    local row = {id, lvl}
    for j = 1, #fields do row[j + 2] = values[j] end
    rows[#rows + 1] = row
  end
end
local after = ''
if more and taken > 0 then after = found[taken][2] end
return {after, rows}
""")

# A Lua function, the disabling of a callback (also what `health.py` runs past the failure
# threshold): its hash says why and since when, it leaves its match zset and joins the
# disabled zset. Arguments: the callback's hash key, the disabled zset, the reason, now ms,
# match prefix, key separator. Returns 0 when the callback is missing.
DISABLE = """
local function disable(callback, disabled, reason, now, match_prefix, sep)
  local row = redis.call('HMGET', callback, 'projectId', 'event', 'id', 'pipelineId')
  if not row[1] then return 0 end
  local scope = row[1]
  if row[4] and row[4] ~= '' then scope = scope .. sep .. row[4] end
  redis.call('HSET', callback, 'enabled', '0', 'disabledReason', reason, 'updatedTime', now)
  redis.call('ZREM', match_prefix .. scope .. sep .. row[2], row[3])
  redis.call('ZADD', disabled, now, row[3])
  return 1
end
"""

# KEYS: callback hash, disabled zset, failing zset. ARGV: enabled ('1'/'0'), reason, now,
# match prefix, key separator, expected project ('' = any), health prefix (enabling starts
# the failure count, and its `failing` mark, again). Returns 0 when missing or in another
# project.
SET_ENABLED = Lua(
    DISABLE
    + """
local row = redis.call('HMGET', KEYS[1], 'projectId', 'event', 'id', 'pipelineId')
if not row[1] or (ARGV[6] ~= '' and row[1] ~= ARGV[6]) then return 0 end
if ARGV[1] ~= '1' then return disable(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5]) end
local scope = row[1]
if row[4] and row[4] ~= '' then scope = scope .. ARGV[5] .. row[4] end
redis.call('HSET', KEYS[1], 'enabled', '1', 'disabledReason', '', 'failing', '0',
           'updatedTime', ARGV[3])
redis.call('ZADD', ARGV[4] .. scope .. ARGV[5] .. row[2], row[3], row[3])
redis.call('ZREM', KEYS[2], row[3])
redis.call('DEL', ARGV[7] .. row[3])
redis.call('ZREM', KEYS[3], row[3])
return 1
"""
)

# KEYS: callback hash, disabled zset, failing zset. ARGV: project, pipeline ('' = any of the
# project's), upsert prefix, project prefix, pipeline prefix, match prefix, health prefix,
# key separator, upsert field separator, filter errors prefix. Returns 0 when missing or
# someone else's.
DELETE = Lua("""
local row = redis.call('HMGET', KEYS[1], 'projectId', 'event', 'url', 'id', 'pipelineId')
if not row[1] or row[1] ~= ARGV[1] then return 0 end
local pipeline = row[5] or ''
if ARGV[2] ~= '' and pipeline ~= ARGV[2] then return 0 end
local scope = row[1]
if pipeline ~= '' then
  scope = scope .. ARGV[8] .. pipeline
  redis.call('ZREM', ARGV[5] .. scope, row[4])
end
redis.call('DEL', KEYS[1], ARGV[7] .. row[4], ARGV[10] .. row[4])
redis.call('HDEL', ARGV[3] .. scope, row[2] .. ARGV[9] .. row[3])
redis.call('ZREM', ARGV[4] .. row[1], row[4])
redis.call('ZREM', ARGV[6] .. scope .. ARGV[8] .. row[2], row[4])
redis.call('ZREM', KEYS[2], row[4])
redis.call('ZREM', KEYS[3], row[4])
return 1
""")

# KEYS: callback hash. ARGV: expected project, expected pipeline ('' = any of the
# project's), the new token (as stored), its predecessor's end (epoch ms; '' or 0: none),
# now. The current token becomes the previous one, signing until that end, unless there
# is none or the overlap is 0. Returns 0 when missing or someone else's.
ROTATE = Lua("""
local row = redis.call('HMGET', KEYS[1], 'projectId', 'pipelineId', 'secretToken')
if not row[1] or row[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and (row[2] or '') ~= ARGV[2] then return 0 end
local previous, till = row[3] or '', ARGV[4]
if previous == '' or till == '' or tonumber(till) <= tonumber(ARGV[5]) then
  previous, till = '', ''
end
redis.call('HSET', KEYS[1], 'secretToken', ARGV[3], 'previousToken', previous,
           'previousTokenUntil', till, 'updatedTime', ARGV[5])
return 1
""")

# KEYS: a match key of layout 1, where it was a SET. Makes it a ZSET scored by id.
# Returns 1 when it converted it.
UPGRADE = Lua("""
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then return 0 end
local ids = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], id, id) end
return 1
""")

# KEYS: callback hash, upsert hash of its scope, its project's listing, its match zset,
# disabled zset, failing zset, its health hash, then its pipeline's listing (when it has a
# pipeline). ARGV: id, upsert field, enabled ('1'/'0'), updatedTime, '1' to start its
# failure count again, then every field/value pair of its hash. Writes a callback exactly as
# another shard holds it, id included (a platform-wide callback's copy, a moved project's
# callback), less its `failing` mark: this shard's failures are its own, so the next
# success resets them. Returns 1.
PUT = Lua("""
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('HDEL', KEYS[1], 'failing')
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
if KEYS[8] then redis.call('ZADD', KEYS[8], ARGV[1], ARGV[1]) end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[1], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
else
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
if ARGV[5] == '1' then
  redis.call('DEL', KEYS[7])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
return 1
""")
