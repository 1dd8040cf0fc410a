"""Matching an event to its callbacks, a chunk at a time.

An event of project P whose data names a pipeline X matches three levels, broadest first:
the platform-wide callbacks (project `DEVOPS_ALL_PROJECT`), P's own, and X's. Each level's
enabled callbacks of the event are a sorted set scored by callback id, so a fan-out reads
the first `size` ids after a cursor over all three in one script, and the next chunk starts
after the last id it read. A URL that two levels send the same event to gets it once, from
the broadest level that takes it (a project admin cannot displace an operator's delivery):
a narrower level's callback is left out when a broader one to its URL is enabled without a
filter, and comes *shadowed* when every such broader one has a filter (`Chunk.shadows`),
for the fan-out to drop once one of those filters takes the event (`worker.filtering`).

A worker keeps the chunks it read (`registry.matches.Matches`), with whether the event's
project numbers its events (`Chunk.numbered`: the lanes' hold, `worker.lanes`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dispatcher import keys
from dispatcher.clock import now_ms
from dispatcher.lua import ArgList, Key, KeyList, Script
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.registry.options import NO_OPTIONS, Options
from dispatcher.registry.rules import Destination, destination, is_pipeline_id
from dispatcher.tokens import NoKeys

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.headers import AuthHeader
    from dispatcher.keys import Keys

__all__ = [
    "NO_SHADOWS",
    "TARGET_FIELDS",
    "CallbackTarget",
    "Chunk",
    "ChunkQuery",
    "Match",
    "Shadow",
    "Shadows",
    "event_scopes",
    "read_secrets",
]

Decrypt = Callable[[bytes | None], str]
UNREADABLE = (
    "the callback's secrets cannot be decrypted with this process's DISPATCHER_TOKEN_KEYS: "
    "the key they were encrypted with is not among them (a change of the keys rolling out, "
    "or a key dropped): give every process that key (retried meanwhile)"
)


def read_secrets(
    decrypt: Decrypt, token: bytes | None, name: bytes | None, value: bytes | None
) -> tuple[str, AuthHeader | None, str | None]:
    """A callback's stored token and auth header as sent, and why they cannot be when
    they cannot (a key missing from `DISPATCHER_TOKEN_KEYS`): then its deliveries fail,
    the others' go on."""
    try:
        header = (name.decode(), decrypt(value)) if name else None
        return decrypt(token), header, None
    except NoKeys as exc:
        return "", None, str(exc)
    except ValueError:  # cannot decrypt, or not text
        return "", None, UNREADABLE


# What a delivery reads of a callback's hash, in this order (the match script and
# `Registry.target` both): `url` and `enabled` first, the match script relies on it.
# `failing` is '1' while failures are on record, '0' when none (`health.py` writes both);
# a callback without it (written before it was kept) counts as failing, so its first
# success writes the reset, and the '0'.
TARGET_FIELDS = (
    "url",
    "enabled",
    "failing",
    "region",
    "secretToken",
    "authHeaderName",
    "authHeaderValue",
    "previousToken",
    "previousTokenUntil",
    *Options.FIELDS,
)
FILTER_FIELD = Options.FIELDS[2]  # a broader callback's filter, which the match reads too


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """What a delivery needs of a callback, its secrets included. `project_id` is whose
    callback it is (`DEVOPS_ALL_PROJECT` for a platform-wide one): its history goes there."""

    id: int
    url: str
    region: Region
    secret_token: str
    failing: bool = True  # failures on record (True when unknown: the reset is then written)
    project_id: str = ""
    auth_header: AuthHeader | None = None
    problem: str | None = None  # why nothing can be sent to it (its secrets are unreadable)
    options: Options = NO_OPTIONS
    previous_token: str = ""  # a rotated-out token that still signs (its overlap is on)
    # its URL read once: a worker keeps its targets (`Matches`), its attempts reuse this
    destination: Destination = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "destination", destination(self.url))

    @classmethod
    def from_fields(
        cls,
        callback_id: int,
        values: Sequence[bytes | None],
        decrypt: Decrypt,
        *,
        failing: bool | None = None,
        owner: str = "",
    ) -> CallbackTarget:
        """The target from the values of `TARGET_FIELDS`, secrets decrypted; the previous
        token only while its overlap lasts. Failures on record: `failing` when given (a
        lane's release looks at the health hash), else the hash's mark."""
        url, _, mark, region, token, name, value, previous, until, *options = values
        overlapping = bool(previous) and int(until or 0) > now_ms()
        secret, header, problem = read_secrets(decrypt, token, name, value)
        old, _, old_problem = read_secrets(decrypt, previous if overlapping else None, None, None)
        return cls(
            callback_id,
            (url or b"").decode(),
            Region((region or b"").decode()),
            secret,
            mark != b"0" if failing is None else failing,
            owner,
            header,
            problem or old_problem,
            Options.from_values(options),
            old,
        )


@dataclass(frozen=True, slots=True)
class Shadow:
    """A broader level's callback to a target's URL, for the same event, enabled and with a
    filter: the target gets an event only when no such filter takes it. The broader one may
    be in another chunk, so its filter comes along."""

    callback_id: int
    filter: str
    owner: str  # whose filter it is: its re-run spends its owner's budget, no other's


Shadows = Mapping[int, tuple[Shadow, ...]]  # a chunk's shadowed targets' shadows, by target id
NO_SHADOWS: Shadows = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of an event's callbacks; `after` is where the next starts (None: none).
    `shadows`: those of its targets a filtered broader callback shadows, each's shadows
    broadest first (empty in the common case: no URL at two levels with a filter).
    `numbered`: the event's project or the platform had an ordered callback when it was
    read (`keys.lanes_ordered`, which the producer reads to number an event:
    `dispatcher.sequence`), so the event may hold its project's lanes (`worker.lanes`).
    Every write to those sets bumps their project's registry version, so a chunk kept
    under the version a claim read says what the sets held since that version began."""

    targets: list[CallbackTarget]
    after: int | None
    shadows: Shadows = field(default_factory=lambda: NO_SHADOWS)  # (a mapping: unhashable)
    numbered: bool = False


def event_scopes(project_id: str, pipeline_id: object = None) -> list[tuple[str, str]]:
    """The (scope, owner project) of every level an event of `project_id` reaches, broadest
    first; `pipeline_id` is the event's `data.pipelineId` (ignored unless it can be one)."""
    scopes = [] if project_id == PLATFORM_PROJECT else [(PLATFORM_PROJECT, PLATFORM_PROJECT)]
    scopes.append((project_id, project_id))
    if is_pipeline_id(pipeline_id):
        scopes.append((keys.scope(project_id, str(pipeline_id)), project_id))
    return scopes


@dataclass
class Match(Script):
    """The chunk of an event's callbacks after callback id `after`: the `size` smallest
    ids after it over all levels (`levels`: the match zsets of the event's levels,
    broadest first: platform, project, pipeline; then the upsert hashes of the same
    levels), less the disabled ones and those whose URL a broader level sends the same
    event to without a filter (one delivery per URL; a level without callbacks is not
    asked, and is known to have none at cursor 0 when its range is empty, or else by one
    EXISTS a chunk). One whose URL only broader callbacks with a filter (`filter_field`)
    send the event to is kept, shadowed by them. `fields` names the hash fields a delivery
    needs (`match.TARGET_FIELDS`: 'url' and 'enabled' first); `field_prefix` is the upsert
    field's start ("{event} "). The ids are found here, so their hashes' keys are made here
    (`callback_prefix`). Returns {next cursor ('' when nothing follows), rows, shadows,
    numbered}; a row is {id, level index, the values}; `shadows` holds {id, broader id,
    its filter, its level index} for each shadow of a row, broadest first; `numbered`,
    when `ask` is '1', is 1 or 2 when the project's or the platform's set of ordered
    callbacks exists (`ordered`, `platform_ordered`), else 0 (`Chunk.numbered`: one
    EXISTS per project and registry version a worker reads, `registry.matches`)."""

    LUA = """
local n = #levels / 2
local size = tonumber(size)
local found = {}
local more = false
local empty = {}  -- levels without callbacks: no URL of theirs to give way to
for lvl = 1, n do
  local ids = redis.call('ZRANGEBYSCORE', levels[lvl], '(' .. after, '+inf', 'LIMIT', 0, size)
  if #ids == size then more = true end
  empty[lvl] = #ids == 0 and (after == '0' or redis.call('EXISTS', levels[lvl]) == 0)
  for _, id in ipairs(ids) do found[#found + 1] = {tonumber(id), id, lvl} end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
if #found > size then more = true end
local taken = math.min(#found, size)
local rows, shadows = {}, {}
for i = 1, taken do
  local id, lvl = found[i][2], found[i][3]
  local values = redis.call('HMGET', callback_prefix .. id, unpack(fields))
  local keep = values[1] and values[2] == '1'
  local over = nil  -- the broader callbacks to its URL with a filter: {id, filter, level}
  for broader = 1, lvl - 1 do
    if keep and not empty[broader] then
      local other = redis.call('HGET', levels[n + broader], field_prefix .. values[1])
      if other and redis.call('ZSCORE', levels[broader], other) then
        local filter = redis.call('HGET', callback_prefix .. other, filter_field)
        if not filter or filter == '' then keep = false
        else over = over or {}; over[#over + 1] = {other, filter, broader} end
      end
    end
  end
  if keep then
    local row = {id, lvl}
    for j = 1, #fields do row[j + 2] = values[j] end
    rows[#rows + 1] = row
    if over then
      for _, shadow in ipairs(over) do
        shadows[#shadows + 1] = id
        shadows[#shadows + 1] = shadow[1]
        shadows[#shadows + 1] = shadow[2]
        shadows[#shadows + 1] = shadow[3]
      end
    end
  end
end
local next_after = ''
if more and taken > 0 then next_after = found[taken][2] end
local numbered = 0  -- asked only when the worker does not know it (`ChunkQuery.numbered`)
if ask == '1' then numbered = redis.call('EXISTS', ordered, platform_ordered) end
return {next_after, rows, shadows, numbered}
"""
    ordered: Key
    platform_ordered: Key
    levels: KeyList
    after: int
    size: int
    callback_prefix: str
    field_prefix: str
    filter_field: str
    ask: str
    fields: ArgList


class ChunkQuery:
    """The chunk of `size` callbacks after callback id `after`: queue it on a pipeline (a
    Batcher's, say), then `read` its answer. `numbered`: whether the project numbers its
    events, when known (`registry.matches.Matches`, under the registry version the chunk is
    read for); None, the match reads it."""

    def __init__(
        self,
        keys: Keys,
        decrypt: Decrypt,
        project_id: str,
        event: str,
        pipeline_id: object,
        after: int,
        size: int,
    ) -> None:
        self.keys = keys
        self.decrypt = decrypt
        self.project_id = project_id
        self.scopes = event_scopes(project_id, pipeline_id)
        self.event = event
        self.after = after
        self.size = size
        self.numbered: bool | None = None

    def following(self, after: int) -> ChunkQuery:
        """The query of the chunk after callback id `after` (the next one)."""
        following = copy.copy(self)
        following.after = after
        return following

    @property
    def key(self) -> tuple[object, ...]:
        """What the chunk depends on besides the registry: its levels, event and cursor."""
        return (*self.scopes, self.event, self.after, self.size)

    def queue_on(self, pipe: Pipeline) -> None:
        scopes = [scope for scope, _ in self.scopes]
        Match(
            ordered=self.keys.lanes_ordered(self.project_id),
            platform_ordered=self.keys.lanes_ordered(PLATFORM_PROJECT),
            levels=[self.keys.match(scope, self.event) for scope in scopes]
            + [self.keys.callback_unique(scope) for scope in scopes],
            after=self.after,
            size=self.size,
            callback_prefix=self.keys.CALLBACK_PREFIX,
            field_prefix=keys.callback_unique_field(self.event, ""),
            filter_field=FILTER_FIELD,
            ask="1" if self.numbered is None else "0",
            fields=TARGET_FIELDS,
        ).queue_on(pipe)

    def read(self, answer: list[Any]) -> Chunk:
        after, rows, shadowed, numbered = answer
        targets = [self._target(row) for row in rows]
        shadows = self._shadows(shadowed)
        known = numbered > 0 if self.numbered is None else self.numbered
        return Chunk(targets, int(after) if after else None, shadows, known)

    def _shadows(self, flat: list[Any]) -> Shadows:
        """The shadows of the chunk's targets, from the match's {id, broader id, filter,
        level} quadruples, each with its level's owner."""
        if not flat:
            return NO_SHADOWS
        found: dict[int, tuple[Shadow, ...]] = {}
        for i in range(0, len(flat), 4):
            cid, owner = int(flat[i]), self.scopes[int(flat[i + 3]) - 1][1]
            shadow = Shadow(int(flat[i + 1]), flat[i + 2].decode(), owner)
            found[cid] = (*found.get(cid, ()), shadow)
        return found

    def _target(self, row: list[Any]) -> CallbackTarget:
        cid, level, *values = row
        return CallbackTarget.from_fields(
            int(cid),
            values,
            self.decrypt,
            owner=self.scopes[int(level) - 1][1],
        )
