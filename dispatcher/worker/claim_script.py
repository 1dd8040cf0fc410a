"""The claim script: how far a claim looks into the queue, and for whom (`Claim`).

A claim reads the due range oldest first, passing over the jobs of projects at their
share, and stops once no project it looks for can take more. It looks for a busy
project with room through the whole budget, for a project new to the worker a page deep,
and for a busy project with room that a claim before found with nothing due (`quiet`)
only where a job comes due: in what came due since the claim before, read whole (within
the budget), so a burst of another's jobs coming due together (up to that) cannot hide
its job. And now and then (a wide look) it also looks a step further than the budget, a
step further each time, so a job deep in another's backlog is found before that backlog
drains. `dispatcher.worker.served.Served` decides the budget, the scout, the sweep and who
is quiet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dispatcher.lua import IN_SLICES, REDIS_NOW_MS, ArgList, Key, Script
from dispatcher.worker.record import KEEP_DROP_LUA

__all__ = ["DATA_GONE", "JUST_DUE_SLACK_MS", "SWEEP_ENTRIES", "Claim"]

JUST_DUE_SLACK_MS = 1000  # a claim's look at what just came due starts this long before
SWEEP_ENTRIES = 500  # how much further past its budget each sweeping claim looks
DATA_GONE = "job data expired before it ran"  # a claimed id's data was gone (arq's rule)


@dataclass
class Claim(Script):
    """Up to `want` due jobs (due by Redis's clock, as the leases lapse by it) without a
    live lease, oldest first, in one round trip: each one's lease set for `token` (NX: a
    live one is left alone), its score moved to the lease's end (out of the due range
    while it runs: every claimed job's in one `ZADD` as the claim ends, so its looks see
    the range as it began), its data read, its claim counted (the first claim creates the
    count with its ttl). The ids in `mine` (newline-separated) are passed over, and so is a job
    of a project that has taken its share: `newcomer` jobs for a project not named (-1:
    any), `shares` pairs of a project and how many more it may take (a job's project is
    its id up to `sep`).

    The look stops (checked a page at a time) past `budget` entries passed over, or past
    `scout` once no project it looks for has room (one named with room, or one taken here
    with room left): past that only a project new to this worker could take a job. The
    `quiet` ones (named with room, found with nothing due by a claim before) are looked
    for only in what just came due (but by a claim with no claim before, `since_ms` 0,
    which looks for them as for any busy one). Stopped short of the range's end with
    fewer than `want`, the claim looks last at the jobs due from `slack_ms` before
    `since_ms` on (this worker's last claim, by Redis's clock; due times are the writers'
    clocks and reach Redis a little later), where a new or quiet project's jobs come due
    behind any backlog: while a quiet project has room, all of them, oldest first, within
    what is left of the budget; then, unless that read reached their end, their newest
    page, oldest of it first.

    A claim with a `sweep` (an offset into the due range; -1: none) that the budget
    stopped short of the range's end looks `sweep_size` entries further, for any project
    with room: from just past `sweep_after` (the entry the sweep before passed over last)
    while that is still due, else from that offset, and never before where the budget
    stopped it. One after another, such claims sweep the range past the budget, so no job
    there waits for the backlog ahead of it to drain. It returns where the next one starts:
    an offset and the entry it passed over last (0 and '' once it reached the range's
    end).

    A due id whose data is gone leaves the queue with its lease and redelivery mark, and
    comes back with `false` data and a count of 1 once its drop is on record here, in the
    same step (an id of ours: ASCII); 0 leaves the record to the worker (another client's
    id, which may not be UTF-8). (The worker recorded every such drop after the claim's
    answer: one it never read, stopped or killed, left no trace.) A claimed job comes
    with the registry version its event would be matched at (`registry.matches.Matches`):
    the `platform` project's and its own (0 when none), space-separated, read once per
    project; false when its id names no project. Returns Redis's time (ms), the {id, data,
    claims, version} rows (the keys are made here, from the prefixes given) and where the
    next sweep starts (two values)."""

    LUA = (
        REDIS_NOW_MS
        + IN_SLICES
        + KEEP_DROP_LUA
        + f"local data_gone = {json.dumps(DATA_GONE)}\n"
        + """
    local want, limit, new = tonumber(want), tonumber(budget), tonumber(newcomer)
    local held, left, looked_for, open = {}, {}, {}, 0  -- open: projects looked on for
    local near_of, near = {}, 0  -- near: quiet projects with room, looked for in the new
    for id in string.gmatch(mine, '[^\\n]+') do held[id] = true end
    local function look_for(project)  -- past the scout while it may take more
      local more = left[project] > 0
      if more ~= (looked_for[project] or false) then open = open + (more and 1 or -1) end
      looked_for[project] = more
    end
    local since = tonumber(since_ms)  -- 0: no claim before, no look at what came due
    if since > 0 then  -- else the quiet are looked for as any busy project
      for project in string.gmatch(quiet, '[^\\n]+') do near_of[project] = false end
    end
    for i = 1, #shares, 2 do
      local project = shares[i]
      left[project] = tonumber(shares[i + 1])
      if near_of[project] == nil then look_for(project)
      elseif left[project] > 0 then near_of[project] = true; near = near + 1 end
    end
    local of_project = '^([^' .. sep .. ']+)' .. sep
    local now_ms = redis_now_ms()
    local leased_until = now_ms + tonumber(lease_ms)
    local versions, platform_version = {}, nil
    local function version_of(project)
      if not project then return false end
      if not versions[project] then
        platform_version = platform_version or redis.call('GET', version_prefix .. platform) or '0'
        versions[project] = platform_version .. ' '
          .. (redis.call('GET', version_prefix .. project) or '0')
      end
      return versions[project]
    end
    local out, took = {}, {}  -- took: the ids claimed here (or gone), by id
    local function claim(id)  -- true when `id` left the due range (claimed, or gone)
      local project = not held[id] and string.match(id, of_project)
      local share = new >= 0 and project and (left[project] or new)
      -- running here (its lease given up: a next chunk, attempt), or its project full here
      if held[id] or (share and share <= 0) then return false end
      if not redis.call('SET', lease_prefix .. id, token, 'PX', lease_ms, 'NX') then return end
      if share then
        if near_of[project] then near_of[project] = false; near = near - 1 end
        left[project] = share - 1
        look_for(project)
      end
      local data, claims = redis.call('GET', job_prefix .. id), 1
      if not data then
        redis.call('DEL', lease_prefix .. id, pushed_prefix .. id)
        claims = 0
        if not string.find(id, '[\\128-\\255]') then  -- a retry's id names its project
          local entry = cjson.encode({jobId = id, reason = data_gone, at = now_ms})
          keep_drop(string.match(id, '^([^:]+):.+%.%d+@%d+$'), entry)
          claims = 1
        end
      else
        if not redis.call('SET', claims_prefix .. id, 1, 'EX', claims_ttl_s, 'NX') then
          claims = redis.call('INCR', claims_prefix .. id)  -- claimed before: ttl runs on
        end
      end
      out[#out + 1] = {id, data, claims, data and version_of(project)}
      took[id] = true
      return true
    end
    local function leave_range(rows, until_ms)  -- the claimed out of the due range, the gone out
      local leased, gone = {}, {}
      for _, row in ipairs(rows) do
        if row[2] then leased[#leased + 1] = until_ms; leased[#leased + 1] = row[1]
        else gone[#gone + 1] = row[1] end
      end
      in_slices({'ZADD', queue, 'XX'}, leased)
      in_slices({'ZREM', queue}, gone)
    end
    local looked = 0  -- entries passed over, in every look
    local PAGE = 100  -- entries a page reads (but a look's first: `want`)
    local due, ranks = nil, {['-inf'] = 0}  -- counted once a look goes deep
    local function due_count()  -- the due range's length now
      due = due or redis.call('ZCOUNT', queue, '-inf', now_ms)
      return due
    end
    local function page(from, offset, size)  -- `size` due entries, `offset` in from `from`
      if offset < 5 * PAGE then  -- near the start, walking to the offset costs little
        return redis.call('ZRANGEBYSCORE', queue, from, now_ms, 'LIMIT', offset, size)
      end
      due_count()  -- deeper, go by rank
      -- (what a look takes leaves for after now: the entries before `from` stay as counted)
      ranks[from] = ranks[from] or redis.call('ZCOUNT', queue, '-inf', '(' .. from)
      local first = ranks[from] + offset
      local last = math.min(first + size, due) - 1
      return first <= last and redis.call('ZRANGE', queue, first, last) or {}
    end
    local passed  -- the last entry a look passed over (left in the due range)
    local function page_through(from, offset, page_size, more)
      -- pages on from `offset` while fewer than `want` and more(); returns whether it
      -- reached the range's end, and the offset it stopped at
      while #out < want and more() do
        local ids = page(from, offset, page_size)
        local seen, taken = 0, 0  -- entries this page looked at; those it took (or took before)
        for _, id in ipairs(ids) do
          seen = seen + 1
          if took[id] or claim(id) then taken = taken + 1 else passed = id end
          if #out >= want then break end
        end
        offset, looked = offset + seen, looked + seen - taken
        if #ids < page_size then return #out < want, offset end
        page_size = math.max(want, PAGE)  -- fewer, longer pages past the jobs left alone
      end
      return false, offset
    end
    local scout_limit = new < 0 and limit or tonumber(scout)
    local ended, at = page_through('-inf', 0, want, function()
      return looked < limit and (open > 0 or looked < scout_limit)
    end)
    local swept, anchor = tonumber(sweep), sweep_after  -- where the sweep starts (-1: none)
    if ended then
      swept, anchor = math.min(swept, 0), ''
    elseif swept >= 0 and #out < want then  -- past the budget, a step further each time
      if sweep_after ~= '' then  -- on from the entry the sweep before passed over last
        local rank = redis.call('ZRANK', queue, sweep_after)
        if rank and rank < due_count() then swept = rank + 1 end  -- still due: where it is now
      end
      local start, till = math.max(swept, at), looked + tonumber(sweep_size)
      local reached
      passed = nil
      reached, swept = page_through('-inf', start, PAGE, function() return looked < till end)
      swept = swept - #out  -- where it stopped once what this claim took left the range
      if reached then swept, ended, anchor = 0, start == at, '' else anchor = passed or anchor end
    end
    if #out < want and not ended and since > 0 then  -- what just came due
      local from = math.min(since, now_ms) - tonumber(slack_ms)
      local whole = near > 0 and page_through(from, 0, PAGE, function()
        return looked < limit and near + open > 0
      end)
      if #out < want and not whole then  -- its newest page, oldest of it first
        local page = redis.call('ZREVRANGEBYSCORE', queue, now_ms, from, 'LIMIT', 0, PAGE)
        for i = #page, 1, -1 do
          if not took[page[i]] and claim(page[i]) and #out >= want then break end
        end
      end
    end
    leave_range(out, leased_until)
    return {now_ms, out, swept, anchor}
    """
    )
    queue: Key
    dropped: Key
    want: int
    lease_ms: int
    token: str
    lease_prefix: str
    job_prefix: str
    claims_prefix: str
    claims_ttl_s: int
    budget: int
    scout: int
    sweep: int
    sweep_after: bytes
    sweep_size: int
    quiet: str
    since_ms: int
    slack_ms: int
    sep: str
    newcomer: int
    mine: str
    version_prefix: str
    platform: str
    dropped_prefix: str
    pushed_prefix: str
    shares: ArgList
