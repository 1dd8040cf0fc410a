"""The failing callbacks as operators see them (`dispatcher callbacks failing`, the count of
`dispatcher status` and of the console's status page): by project, so that no project's
failing callbacks crowd out another's, read in bounded work however many there are.

Each shard keeps, beside its set of every callback with failures on record
(`HEALTH_FAILING`, by first failure: the count, and what the version before reads), each
project's such callbacks by their consecutive failures (`failing_of`) and those projects by
their worst callback's failures (`HEALTH_FAILING_PROJECTS`), all three written by the same
scripts (`FAILING`). A listing reads the `PROJECTS_SHOWN` projects with the most failures
(and the platform's), the worst `SHOWN_PER_PROJECT` callbacks of each, and the counts: a
few hundred entries, whatever the sets hold. It read the 1,000 oldest entries of the set
and sorted those: one project's 1,000 callbacks disabled for good hid every other project's
failing callbacks, and the count stopped at 1,000 (review).

A worker of the version before (a rolling upgrade) writes the set alone: what it added is
indexed by the fleet's sweep (`sweep_page`, 10,000 entries every 5 minutes) and, until one
pass over the whole set is done, at each process's start (`index_start`); after that pass,
the sweep indexes only the entries first failing since the one before (`index_recent`:
what such a worker adds has its first failure then), and while it meets some the listings
say that not all may show; what such a worker removes leaves the project's set at the
listing that meets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.clock import now_ms
from dispatcher.lua import ArgList, Key, Script
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = [
    "FAILING",
    "ONE_PROJECT_MOST",
    "PROJECTS_SHOWN",
    "SHOWN_PER_PROJECT",
    "SWEEP_NAME",
    "Failing",
    "FailingGroup",
    "FailingView",
    "failing_names",
    "index_recent",
    "index_start",
    "merged",
    "read",
    "sweep_page",
]

PROJECTS_SHOWN = 50  # the projects a listing shows, those with the most failures first
SHOWN_PER_PROJECT = 5  # the callbacks shown of each, those with the most failures first
PLATFORM_READ = 1_000  # the platform's callbacks read on each shard (counted once over all)
ONE_PROJECT_MOST = 1_000  # the most a listing of one project shows
INDEX_PAGE = 500  # the entries of the set one page of `index_page` asks `ZSCAN` for
SWEEP_PAGES = 20  # the pages of it one sweep of the fleet's goes over (`sweep_page`)
SWEEP_NAME = "failing"  # the sweep's pass over the set, whose cursor a start goes on from
RECENT_MARGIN_MS = 600_000  # once indexed, how far before the last sweep the next looks
LATE_S = 900  # how long the listings say some may not show, after the sweep met such

# Lua functions: callback `id` of `project` has `failures` consecutive failures since
# `since` (`failing_on`), or none (`failing_off`; `project` false when unknown, its hash
# gone: its delete took it off its project's set). The project's place among the projects
# follows its worst callback. A script running them declares `failing`, `failing_projects`
# (keys) and `failing_prefix` (`failing_names`).
FAILING = """
local function failing_top(project)
  local top = redis.call('ZREVRANGE', failing_prefix .. project, 0, 0, 'WITHSCORES')
  if top[1] then
    redis.call('ZADD', failing_projects, top[2], project)
  else
    redis.call('ZREM', failing_projects, project)
  end
end
local function failing_on(project, id, failures, since)
  redis.call('ZADD', failing, since, id)
  redis.call('ZADD', failing_prefix .. project, failures, id)
  failing_top(project)
end
local function failing_off(project, id)
  redis.call('ZREM', failing, id)
  if project and redis.call('ZREM', failing_prefix .. project, id) == 1 then
    failing_top(project)
  end
end
"""


def failing_names(keys: Keys) -> dict[str, str]:
    """What a script running `FAILING` declares, of the shard of `keys`."""
    return {
        "failing": keys.HEALTH_FAILING,
        "failing_projects": keys.HEALTH_FAILING_PROJECTS,
        "failing_prefix": keys.HEALTH_FAILING_PREFIX,
    }


@dataclass(frozen=True, slots=True)
class Failing:
    """A callback with consecutive final failures (not yet disabled, or disabled)."""

    callback_id: int
    failures: int
    since_ms: int
    last_error: str
    project_id: str = ""


@dataclass(frozen=True, slots=True)
class FailingGroup:
    """One project's failing callbacks: how many, and the worst of them."""

    project_id: str
    count: int
    shown: tuple[Failing, ...]


@dataclass(frozen=True, slots=True)
class FailingView:
    """The failing callbacks: how many in all, of how many projects, and the worst of each
    project shown (the projects with the most failures first)."""

    total: int = 0
    projects: int = 0
    groups: tuple[FailingGroup, ...] = ()
    indexed: bool = True  # False while what a version before wrote or writes is indexed

    @property
    def shown(self) -> list[Failing]:
        """Every callback shown, project by project."""
        return [one for group in self.groups for one in group.shown]


@dataclass
class ListFailing(Script):
    """The failing callbacks of `only` (a project; '' for the `projects_shown` projects with
    the most failures, and `platform`), `per_project` of each (of the platform's, at least
    `platform_rows`: its callbacks fail on several shards, counted once by the ids read), the
    most failures first, as {id, failures, since, last error}, with each project's count,
    and the counts of callbacks and projects: {total, projects, {{project, count, rows}},
    1 once the set was indexed whole (`failing_indexed`) and no sweep met what a version
    before wrote lately (`failing_late`), else 0 or less}.
    An entry whose callback or health is gone is removed; one a version before took off the
    set leaves its project's set (each project read again, up to 3 times, when it had any)."""

    LUA = (
        FAILING
        + """
local function group(project, k)
  local key, rows = failing_prefix .. project, {}
  for _ = 1, 3 do
    local dropped = 0
    rows = {}
    for _, id in ipairs(redis.call('ZREVRANGE', key, 0, k - 1)) do
      local row = redis.call('HMGET', health_prefix .. id, 'failures', 'since', 'lastError')
      local owner = redis.call('HGET', callback_prefix .. id, 'projectId')
      local gone = not owner or not row[1]
      if gone or owner ~= project or not redis.call('ZSCORE', failing, id) then
        if gone then
          redis.call('DEL', health_prefix .. id)
          redis.call('ZREM', failing, id)
        end
        redis.call('ZREM', key, id)
        dropped = dropped + 1
      else
        rows[#rows + 1] = {id, row[1], row[2], row[3]}
      end
    end
    if dropped == 0 then break end
    failing_top(project)
  end
  return {project, redis.call('ZCARD', key), rows}
end
local groups, names = {}, {only}
if only == '' then
  names = redis.call('ZREVRANGE', failing_projects, 0, tonumber(projects_shown) - 1)
  local listed = false
  for _, name in ipairs(names) do listed = listed or name == platform end
  if not listed and redis.call('ZSCORE', failing_projects, platform) then
    names[#names + 1] = platform
  end
end
for _, name in ipairs(names) do
  local k = tonumber(per_project)
  if name == platform then k = math.max(k, tonumber(platform_rows)) end
  groups[#groups + 1] = group(name, k)
end
local indexed = redis.call('EXISTS', failing_indexed) - redis.call('EXISTS', failing_late)
return {redis.call('ZCARD', failing), redis.call('ZCARD', failing_projects), groups, indexed}
"""
    )
    failing: Key
    failing_projects: Key
    failing_indexed: Key
    failing_late: Key
    failing_prefix: str
    health_prefix: str
    callback_prefix: str
    only: str
    projects_shown: int
    per_project: int
    platform: str
    platform_rows: int


async def read(
    redis: Redis, keys: Keys, project_id: str | None = None, rows: int = SHOWN_PER_PROJECT
) -> FailingView:
    """One shard's failing callbacks as `ListFailing` reads them (one round trip): of
    `project_id` (`rows` of them), or of the projects with the most failures."""
    total, projects, groups, indexed = await ListFailing(
        **failing_names(keys),
        failing_indexed=keys.HEALTH_FAILING_INDEXED,
        failing_late=keys.HEALTH_FAILING_LATE,
        health_prefix=keys.HEALTH_PREFIX,
        callback_prefix=keys.CALLBACK_PREFIX,
        only=project_id or "",
        projects_shown=PROJECTS_SHOWN,
        per_project=rows,
        platform=PLATFORM_PROJECT,
        platform_rows=PLATFORM_READ,
    ).run(redis)
    found = (_group(*one) for one in groups)
    return FailingView(int(total), int(projects), tuple(g for g in found if g.count), indexed == 1)


def _group(project: bytes, count: int, rows: list[list[Any]]) -> FailingGroup:
    name = project.decode()
    shown = tuple(
        Failing(int(cid), int(n), int(since or 0), (error or b"").decode(), name)
        for cid, n, since, error in rows
    )
    return FailingGroup(name, int(count), shown)


def merged(
    found: Sequence[FailingView], rows: int = SHOWN_PER_PROJECT, projects: int = PROJECTS_SHOWN
) -> FailingView:
    """Shards' views as one, `rows` of each project and the `projects` with the most
    failures (and the platform's) shown: a callback read on several shards (a platform-wide
    one fails on each) shown and counted once, with its worst count."""
    best: dict[str, dict[int, Failing]] = {}
    counted: dict[str, int] = {}
    read_rows: dict[str, int] = {}
    again = 0  # projects read on more than one shard
    for group in (group for view in found for group in view.groups):
        name = group.project_id
        again += name in best
        of = best.setdefault(name, {})
        counted[name] = counted.get(name, 0) + group.count
        read_rows[name] = read_rows.get(name, 0) + len(group.shown)
        for one in group.shown:
            seen = of.get(one.callback_id)
            if seen is None or one.failures > seen.failures:
                of[one.callback_id] = one
    twice = {name: read_rows[name] - len(of) for name, of in best.items()}  # read again
    groups = [
        FailingGroup(name, counted[name] - twice[name], tuple(_worst(of.values())[:rows]))
        for name, of in best.items()
        if counted[name] - twice[name] > 0
    ]
    groups.sort(key=lambda g: (-max((f.failures for f in g.shown), default=0), g.project_id))
    kept = [g for i, g in enumerate(groups) if i < projects or g.project_id == PLATFORM_PROJECT]
    return FailingView(
        total=sum(v.total for v in found) - sum(twice.values()),
        projects=sum(v.projects for v in found) - again,
        groups=tuple(kept),
        indexed=all(v.indexed for v in found),
    )


def _worst(found: Iterable[Failing]) -> list[Failing]:
    return sorted(found, key=lambda f: (-f.failures, f.callback_id))


@dataclass
class Index(Script):
    """Each of `ids` (entries of the failing set) still there is put in its project's set
    with its failures on record (`FAILING`); one whose callback or health is gone leaves
    the set, its health removed. Returns {how many left, how many were in no project's set
    yet (a version before wrote them)}."""

    LUA = (
        FAILING
        + """
local removed, added = 0, 0
for _, id in ipairs(ids) do
  local since = redis.call('ZSCORE', failing, id)
  local project = redis.call('HGET', callback_prefix .. id, 'projectId')
  local failures = redis.call('HGET', health_prefix .. id, 'failures')
  if since and project and failures then
    if not redis.call('ZSCORE', failing_prefix .. project, id) then added = added + 1 end
    failing_on(project, id, failures, since)
  elseif since then
    redis.call('DEL', health_prefix .. id)
    failing_off(project, id)
    removed = removed + 1
  end
end
return {removed, added}
"""
    )
    failing: Key
    failing_projects: Key
    failing_prefix: str
    health_prefix: str
    callback_prefix: str
    ids: ArgList


async def _index(redis: Redis, keys: Keys, ids: Sequence[bytes]) -> tuple[int, int]:
    """`Index` of `ids`: how many left the set, how many a version before wrote."""
    if not ids:
        return 0, 0
    removed, added = await Index(
        **failing_names(keys),
        health_prefix=keys.HEALTH_PREFIX,
        callback_prefix=keys.CALLBACK_PREFIX,
        ids=ids,
    ).run(redis)
    return int(removed), int(added)


async def sweep_page(redis: Redis, keys: Keys, cursor: int) -> tuple[int, int]:
    """The fleet's sweep's share (`duties.paged`): until a pass over the whole set is done,
    up to `SWEEP_PAGES` `ZSCAN` pages of about `INDEX_PAGE` entries from `cursor` (10,000
    entries; a set of 1,000,000 gone over in ~8 hours) through `Index`; then
    `index_recent`. The next cursor, how many entries left the set."""
    if (since := await redis.get(keys.HEALTH_FAILING_INDEXED)) is not None:
        return 0, await index_recent(redis, keys, int(since))
    if cursor == 0:  # a pass begins: what is added from now on, it may not meet
        await redis.set(keys.HEALTH_FAILING_PASS, now_ms(), nx=True)
    removed = 0
    for _ in range(SWEEP_PAGES):
        cursor, found = await redis.zscan(keys.HEALTH_FAILING, cursor, count=INDEX_PAGE)
        removed += (await _index(redis, keys, [member for member, _ in found]))[0]
        if cursor == 0:
            began = int(await redis.get(keys.HEALTH_FAILING_PASS) or 0)
            await redis.set(keys.HEALTH_FAILING_INDEXED, max(0, began - RECENT_MARGIN_MS))
            await redis.delete(keys.HEALTH_FAILING_PASS)
            break
    return int(cursor), removed


async def index_recent(redis: Redis, keys: Keys, since_ms: int) -> int:
    """Once a pass over the whole set is done: `Index` of the entries whose first failure
    is `since_ms` or later (what was added since the last sweep, a margin for clocks apart
    included: 10,000 at most, the next sweep going on from there), and from where the next
    one looks (`HEALTH_FAILING_INDEXED`). An entry a worker of the version before wrote
    (in no project's set yet) marks the shard `HEALTH_FAILING_LATE` for `LATE_S`: the
    listings say some may not show yet. Returns how many entries left the set. The sweep
    went over the whole set each time, for ever: 20 `Index` calls of ~500 entries, 7-13 ms
    each, every 5 minutes, for a set of callbacks failing for good (review)."""
    now, most = now_ms(), SWEEP_PAGES * INDEX_PAGE
    found = await redis.zrangebyscore(
        keys.HEALTH_FAILING, since_ms, "+inf", start=0, num=most, withscores=True
    )
    removed = added = 0
    for at in range(0, len(found), INDEX_PAGE):
        left, new = await _index(redis, keys, [member for member, _ in found[at : at + INDEX_PAGE]])
        removed, added = removed + left, added + new
    if len(found) < most:
        since_ms = max(since_ms, now - RECENT_MARGIN_MS)
    else:  # more to go: from the last one read (past it, should 10,000 share one ms)
        since_ms = max(since_ms + 1, int(found[-1][1]))
    await redis.set(keys.HEALTH_FAILING_INDEXED, since_ms)
    if added:
        await redis.set(keys.HEALTH_FAILING_LATE, added, ex=LATE_S)
    return removed


async def index_start(redis: Redis, keys: Keys) -> int:
    """At a process's start, until a pass over the whole set is done: `sweep_page` from
    where the sweep is (a set of up to 10,000 entries is indexed whole by the first start;
    a larger one over starts and sweeps, about 0.5 s each), never more, so that a start is
    not held for long. Returns how many entries left the set. Safe to run by many
    processes at once."""
    if await redis.exists(keys.HEALTH_FAILING_INDEXED):
        return 0
    key = keys.sweep_cursor(SWEEP_NAME)
    cursor, removed = await sweep_page(redis, keys, int(await redis.get(key) or 0))
    await redis.set(key, cursor, ex=86_400)  # as the sweep keeps it (`duties.paged`)
    return removed
