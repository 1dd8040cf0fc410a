"""A moved project's callbacks' failures on record (`dispatcher:health:{id}`), copied with
them and settled once the old shard is drained.

Between the copy and the end of the drain, a callback is delivered on both shards: on the
old one its events queued before the flip, on the new one those after, in no known order.
The copy marks the health it copies on both shards (`MOVED`: the count copied), and any
success deletes a health hash, mark included: at the end of the drain, a shard whose mark
is gone had a success since the copy. The new shard then keeps (`Settle`): with no success
on either, the copied count plus what each shard counted since; after a success on one
shard only, that shard's failures since (a lower bound: what the other counted may be
older); after a success on both, the fewer. A success on the old shard after the copy was
lost (only the old shard's health was reset, then deleted with the project there): the
callback kept its copied count on the new shard, and one more failure disabled a callback
whose last delivery had succeeded (review). A count may come out lower than the truth (a
callback is disabled a little later), never higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.failing import FAILING, failing_names
from dispatcher.health import MARK
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.registry.copies import callback_ids

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from redis.asyncio.client import Pipeline

    from dispatcher.services import Services

__all__ = ["MOVED", "Mark", "Settle", "marked_health", "settle_health"]

MOVED = "moved"  # a health's mark: the failures the move copied (a success deletes it)

Row = dict[str, str]


@dataclass
class Mark(Script):
    """A callback's health as it is, marked `MOVED` with its count (0: none), returned as
    field/value pairs, the mark included (the copy's: the old shard's events still come)."""

    LUA = f"""
redis.call('HSET', health, '{MOVED}', redis.call('HGET', health, 'failures') or '0')
return redis.call('HGETALL', health)
"""
    health: Key


async def marked_health(src: Services, ids: Sequence[int]) -> list[Row]:
    """The health of callbacks `ids` on `src` for their copy, each marked there (`Mark`),
    in one round trip."""
    if not ids:
        return []

    def mark(pipe: Pipeline) -> None:
        for cid in ids:
            Mark(health=src.keys.health(cid)).queue_on(pipe)

    answers = await run_pipeline(src.redis, mark)
    return [
        {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}
        for pairs in answers
    ]


@dataclass
class Settle(Script):
    """The new shard's health of a moved callback, given the old shard's at the end of its
    drain (`old_*`; `old_moved` '' when its mark is gone: a success there since the copy),
    settled as the module's doc says; listed among its project's failing callbacks and
    marked `failing` (`MARK`), or neither. A callback gone there keeps no health."""

    LUA = (
        MARK
        + FAILING
        + f"""
local project = redis.call('HGET', callback, 'projectId')
local new = redis.call('HMGET', health, '{MOVED}', 'failures', 'since', 'lastError', 'lastRecord')
local of, nf = tonumber(old_failures) or 0, tonumber(new[2]) or 0
local f, since, err, record = nf, new[3], new[4], new[5]
if new[1] and old_moved ~= '' then
  local copied = tonumber(new[1]) or 0
  f = of + nf - copied
  if copied == 0 and old_since ~= '' and (not since or tonumber(old_since) < tonumber(since)) then
    since = old_since
  end
  if nf <= copied then err, record = old_error, old_record end
elseif new[1] or (old_moved == '' and of < nf) then
  f, since, err, record = of, old_since, old_error, old_record
end
redis.call('DEL', health)
if not project or f <= 0 then
  failing_off(project, callback_id)
  mark(callback, '0', version_prefix)
  return 0
end
since = since or old_since
redis.call('HSET', health, 'failures', f, 'since', since, 'lastError', err or '')
if record and record ~= '' then redis.call('HSET', health, 'lastRecord', record) end
failing_on(project, callback_id, f, since)
mark(callback, '1', version_prefix)
return f
"""
    )
    health: Key
    callback: Key
    failing: Key
    failing_projects: Key
    failing_prefix: str
    callback_id: int
    version_prefix: str
    old_moved: str
    old_failures: str
    old_since: str
    old_error: str
    old_record: str


async def settle_health(
    src: Services, dst: Services, project: str, alive: Callable[[], None]
) -> None:
    """Settle on `dst` the health of `project`'s callbacks on `src` (its old shard, drained:
    no delivery runs there now), before `src` forgets them (`Settle`), in one round trip
    each; `alive` checked before the write."""
    ids = await callback_ids(src.registry, project)
    if not ids:
        return

    def read(pipe: Pipeline) -> None:
        for cid in ids:
            pipe.hgetall(src.keys.health(cid))

    olds = [
        {k.decode(): v.decode() for k, v in raw.items()}
        for raw in await run_pipeline(src.redis, read)
    ]
    k = dst.keys

    def settle(pipe: Pipeline) -> None:
        for cid, old in zip(ids, olds, strict=True):
            Settle(
                health=k.health(cid),
                callback=k.callback(cid),
                **failing_names(k),
                callback_id=cid,
                version_prefix=k.REGISTRY_VERSION_PREFIX,
                old_moved=old.get(MOVED, ""),
                old_failures=old.get("failures", "0"),
                old_since=old.get("since", ""),
                old_error=old.get("lastError", ""),
                old_record=old.get("lastRecord", ""),
            ).queue_on(pipe)

    alive()
    await run_pipeline(dst.redis, settle)
