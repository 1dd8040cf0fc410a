"""The registry's Lua scripts, each a typed `Script` naming its keys and arguments. Keys
are made in Python (`dispatcher.keys`) but where a script reads the id or the scope that
names one inside Redis: `UpsertCallback` (a new callback's id is taken there), `match.Match`
(the ids it finds), `DISABLE`/`SetEnabled` (a callback's match set, by the scope and event
its hash holds: they run in the worker's write pipeline, where nothing can be read first),
`mark_ordered`'s conversion of an old flag and `failing.FAILING` (a project's failing set,
by the project its hash holds). Those get the prefixes and separators from
`dispatcher.keys` (`tests/service/test_keys.py` checks both sides agree).

Every script that changes what `match.Match` reads of a project's callbacks (a hash's
fields, a match set, an upsert hash) bumps the project's registry version
(`dispatcher:cb:version:`) in the same script: a worker's cached match of the project holds
while it stands (`registry.matches.Matches`).

The scripts of the callbacks' own changes (create or update, delete, rotate, enable or
disable) write nothing and answer `FROZEN` while the project's `callbacks_frozen` mark is
set: its mover sets it on the old shard before the move copies its callbacks
(`dispatcher.shards.move`), so that a change that passed the front end's check of the
placement before the freeze, and lands after the copy, is refused (503) rather than
answered and then removed with the old shard's copy. The worker's writes never read it:
a callback it disables there after the copy is disabled on the new shard by the mover
(`dispatcher.shards.disables`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher import keys
from dispatcher.failing import FAILING, failing_names
from dispatcher.lua import ArgList, Key, KeyList, Script

if TYPE_CHECKING:
    from dispatcher.keys import Keys

__all__ = [
    "DISABLE",
    "FROZEN",
    "DeleteCallback",
    "PutCallback",
    "RotateToken",
    "SetEnabled",
    "UpgradeMatchSet",
    "UpsertCallback",
]

FROZEN = -1  # a script's answer: the project's callbacks are frozen on this shard (a move)

# A Lua function: a project's ordered callbacks (`flag`, the set of their ids, which the
# enqueue script's EXISTS reads: an empty set has no key) with `id` in it when `ordered` is
# '1', out of it otherwise. A flag of the layout before (the string '1', never cleared) is
# made the set first, from the project's callbacks (`listing`) that have an `orderBy`.
ORDERED = """
local function mark_ordered(flag, listing, callback_prefix, id, ordered)
  if redis.call('TYPE', flag).ok == 'string' then
    redis.call('DEL', flag)
    for _, other in ipairs(redis.call('ZRANGE', listing, 0, -1)) do
      local by = redis.call('HGET', callback_prefix .. other, 'orderBy')
      if by and by ~= '' then redis.call('SADD', flag, other) end
    end
  end
  if ordered == '1' then redis.call('SADD', flag, id) else redis.call('SREM', flag, id) end
end
"""


@dataclass
class UpsertCallback(Script):
    """Creates the callback registered as `field` in its scope's `unique` hash (its id
    taken from `counter`, at least `id_floor`: see `dispatcher/shard.py`; it joins each of
    `listings`, its project's first, unless that already holds `limit` callbacks: 0 is
    no limit), or updates it: `values` holds `once` field/value pairs written when it is
    created, then the pairs every registration writes (`rows.Upsert`). Re-enables it,
    clears its failure count (and `failing` mark) and filter errors, and puts it in or out
    of its project's `ordered_flag` set (`ordered`); bumps the project's registry
    `version`. Returns {id, 1 when created}, or {0, 0} when the callback is new and its
    project is at its limit, {`FROZEN`, 0} while its project is `frozen` (nothing
    written)."""

    LUA = (
        ORDERED
        + FAILING
        + f"if redis.call('EXISTS', frozen) == 1 then return {{{FROZEN}, 0}} end"
        + """
local id = redis.call('HGET', unique, field)
local created = 0
if not id then
  local most = tonumber(limit)
  if most > 0 and redis.call('ZCARD', listings[1]) >= most then return {0, 0} end
  if tonumber(redis.call('GET', counter) or '0') < tonumber(id_floor) then
    redis.call('SET', counter, id_floor)
  end
  id = tostring(redis.call('INCR', counter))
  created = 1
  redis.call('HSET', unique, field, id)
  for _, listing in ipairs(listings) do redis.call('ZADD', listing, id, id) end
end
local key = callback_prefix .. id
local first = 2 * tonumber(once)
if created == 1 then
  local fields = {'id', id, 'createdTime', now_ms}
  for i = 1, first do fields[#fields + 1] = values[i] end
  redis.call('HSET', key, unpack(fields))
end
local fields = {'enabled', '1', 'disabledReason', '', 'failing', '0', 'updatedTime', now_ms}
for i = first + 1, #values do fields[#fields + 1] = values[i] end
redis.call('HSET', key, unpack(fields))
redis.call('ZADD', match, id, id)
redis.call('ZREM', disabled, id)
redis.call('DEL', health_prefix .. id, filter_errors_prefix .. id)
failing_off(redis.call('HGET', key, 'projectId'), id)
mark_ordered(ordered_flag, listings[1], callback_prefix, id, ordered)
redis.call('INCR', version)
return {tonumber(id), created}
"""
    )
    unique: Key
    counter: Key
    match: Key
    disabled: Key
    failing: Key
    failing_projects: Key
    ordered_flag: Key
    version: Key
    frozen: Key
    listings: KeyList
    field: str
    now_ms: int
    failing_prefix: str
    callback_prefix: str
    health_prefix: str
    filter_errors_prefix: str
    id_floor: int
    limit: int
    ordered: str
    once: int
    values: ArgList


# A Lua function, the disabling of a callback (also what `health.py` runs past the failure
# threshold): its hash says why and since when, it leaves its match zset and joins the
# disabled zset, its project's registry version is bumped. Arguments: the callback's hash
# key, the disabled zset, the reason, now ms, match prefix, key separator, registry version
# prefix. Returns 0 when the callback is missing.
DISABLE = """
local function disable(callback, disabled, reason, now, match_prefix, sep, version_prefix)
  local row = redis.call('HMGET', callback, 'projectId', 'event', 'id', 'pipelineId')
  if not row[1] then return 0 end
  local scope = row[1]
  if row[4] and row[4] ~= '' then scope = scope .. sep .. row[4] end
  redis.call('HSET', callback, 'enabled', '0', 'disabledReason', reason, 'updatedTime', now)
  redis.call('ZREM', match_prefix .. scope .. sep .. row[2], row[3])
  redis.call('ZADD', disabled, now, row[3])
  redis.call('INCR', version_prefix .. row[1])
  return 1
end
"""


@dataclass
class SetEnabled(Script):
    """Enables (`enabled` '1': its failure count, and its `failing` mark, start again) or
    disables the callback whose hash is `callback`, with `reason`, unless it is missing or
    not `project_id`'s ('' = any). Its match set is found by its hash's scope and event
    (`DISABLE`): this runs in the worker's write pipeline. Returns 0 when missing,
    `FROZEN` while its project's mark (`frozen_prefix` and its project: '' for none, the
    worker's, which reads nothing more) is set."""

    LUA = (
        DISABLE
        + FAILING
        + """
local row = redis.call('HMGET', callback, 'projectId', 'event', 'id', 'pipelineId')
if not row[1] or (project_id ~= '' and row[1] ~= project_id) then return 0 end
if frozen_prefix ~= '' and redis.call('EXISTS', frozen_prefix .. row[1]) == 1 then
  return """
        + str(FROZEN)
        + """
end
if enabled ~= '1' then
  return disable(callback, disabled, reason, now_ms, match_prefix, sep, version_prefix)
end
local scope = row[1]
if row[4] and row[4] ~= '' then scope = scope .. sep .. row[4] end
redis.call('HSET', callback, 'enabled', '1', 'disabledReason', '', 'failing', '0',
           'updatedTime', now_ms)
redis.call('ZADD', match_prefix .. scope .. sep .. row[2], row[3], row[3])
redis.call('ZREM', disabled, row[3])
redis.call('DEL', health)
failing_off(row[1], row[3])
redis.call('INCR', version_prefix .. row[1])
return 1
"""
    )
    callback: Key
    disabled: Key
    failing: Key
    failing_projects: Key
    health: Key
    failing_prefix: str
    enabled: str
    reason: str
    now_ms: int
    match_prefix: str
    sep: str
    project_id: str
    version_prefix: str
    frozen_prefix: str = ""


@dataclass
class DeleteCallback(Script):
    """Deletes the callback whose hash is `callback`, its id `callback_id`, unless it is
    no longer `project_id`'s: its hash, health and filter errors, its place in its scope's
    `unique` hash (`field`), its listings, match set, the disabled and failing sets, and
    its project's ordered set; bumps the project's registry `version`. The caller read its
    scope and event first (they never change). Returns 0 when it was gone, `FROZEN` while
    the project is `frozen` unless `mover` ('1': the move's own removal from its old
    shard)."""

    LUA = (
        FAILING
        + f"""
    if mover ~= '1' and redis.call('EXISTS', frozen) == 1 then return {FROZEN} end
    if redis.call('HGET', callback, 'projectId') ~= project_id then return 0 end
    redis.call('DEL', callback, health, filter_errors)
    redis.call('HDEL', unique, field)
    for _, listing in ipairs(listings) do redis.call('ZREM', listing, callback_id) end
    redis.call('ZREM', match, callback_id)
    redis.call('ZREM', disabled, callback_id)
    failing_off(project_id, callback_id)
    if redis.call('TYPE', ordered_flag).ok == 'set' then
      redis.call('SREM', ordered_flag, callback_id)
    end
    redis.call('INCR', version)
    return 1
    """
    )
    callback: Key
    health: Key
    filter_errors: Key
    unique: Key
    match: Key
    disabled: Key
    failing: Key
    failing_projects: Key
    ordered_flag: Key
    version: Key
    frozen: Key
    listings: KeyList
    project_id: str
    callback_id: int
    field: str
    failing_prefix: str
    mover: str = "0"

    @classmethod
    def of(
        cls, k: Keys, callback_id: int, project_id: str, pipeline_id: str, event: str, url: str
    ) -> DeleteCallback:
        """The delete of a callback whose hash said it is `project_id`'s (of `pipeline_id`,
        '' for none), for `event`, to `url`."""
        scope = keys.scope(project_id, pipeline_id or None)
        listings = [k.project_callbacks(project_id)]
        if pipeline_id:
            listings.append(k.pipeline_callbacks(project_id, pipeline_id))
        return cls(
            callback=k.callback(callback_id),
            health=k.health(callback_id),
            filter_errors=k.filter_errors(callback_id),
            unique=k.callback_unique(scope),
            match=k.match(scope, event),
            disabled=k.CALLBACKS_DISABLED,
            ordered_flag=k.lanes_ordered(project_id),
            version=k.registry_version(project_id),
            frozen=k.callbacks_frozen(project_id),
            listings=listings,
            project_id=project_id,
            callback_id=callback_id,
            field=keys.callback_unique_field(event, url),
            **failing_names(k),
        )


@dataclass
class RotateToken(Script):
    """Makes `token` (as stored) the callback's token, unless it is missing or not
    `project_id`'s (of `pipeline_id`, '' = any of the project's); the current one becomes
    the previous one, signing until `until_ms`, unless there is none or the overlap is over
    ('' or past `now_ms`); bumps the project's registry `version`. Returns 0 when missing
    or someone else's, `FROZEN` while the project is `frozen`."""

    LUA = f"""
    if redis.call('EXISTS', frozen) == 1 then return {FROZEN} end
    local row = redis.call('HMGET', callback, 'projectId', 'pipelineId', 'secretToken')
    if not row[1] or row[1] ~= project_id then return 0 end
    if pipeline_id ~= '' and (row[2] or '') ~= pipeline_id then return 0 end
    local previous, till = row[3] or '', until_ms
    if previous == '' or till == '' or tonumber(till) <= tonumber(now_ms) then
      previous, till = '', ''
    end
    redis.call('HSET', callback, 'secretToken', token, 'previousToken', previous,
               'previousTokenUntil', till, 'updatedTime', now_ms)
    redis.call('INCR', version)
    return 1
    """
    callback: Key
    version: Key
    frozen: Key
    project_id: str
    pipeline_id: str
    token: str
    until_ms: int | str
    now_ms: int


@dataclass
class UpgradeMatchSet(Script):
    """A match key of layout 1, where it was a SET, made a ZSET scored by id. Returns 1
    when it converted it."""

    LUA = """
    if redis.call('TYPE', match).ok ~= 'set' then return 0 end
    local ids = redis.call('SMEMBERS', match)
    redis.call('DEL', match)
    for _, id in ipairs(ids) do redis.call('ZADD', match, id, id) end
    return 1
    """
    match: Key


@dataclass
class PutCallback(Script):
    """Writes a callback exactly as another shard holds it, id included (a platform-wide
    callback's copy, a moved project's callback), less its `failing` mark: this shard's
    failures are its own, so the next success resets them. `values` holds its hash's
    field/value pairs; `listings` its project's listing, then its pipeline's (when it has
    one). `reset` ('1') starts its failure count again; `ordered` puts it in or out of its
    project's ordered set. Bumps the project's registry `version`. Returns 1."""

    LUA = (
        ORDERED
        + FAILING
        + """
redis.call('DEL', callback)
redis.call('HSET', callback, unpack(values))
redis.call('HDEL', callback, 'failing')
redis.call('HSET', unique, field, callback_id)
for _, listing in ipairs(listings) do redis.call('ZADD', listing, callback_id, callback_id) end
if enabled == '1' then
  redis.call('ZADD', match, callback_id, callback_id)
  redis.call('ZREM', disabled, callback_id)
else
  redis.call('ZREM', match, callback_id)
  redis.call('ZADD', disabled, updated_ms, callback_id)
end
if reset == '1' then
  redis.call('DEL', health)
  failing_off(redis.call('HGET', callback, 'projectId'), callback_id)
end
mark_ordered(ordered_flag, listings[1], callback_prefix, callback_id, ordered)
redis.call('INCR', version)
return 1
"""
    )
    callback: Key
    unique: Key
    match: Key
    disabled: Key
    failing: Key
    failing_projects: Key
    health: Key
    ordered_flag: Key
    version: Key
    listings: KeyList
    callback_id: str
    failing_prefix: str
    field: str
    enabled: str
    updated_ms: str
    reset: str
    ordered: str
    callback_prefix: str
    values: ArgList
