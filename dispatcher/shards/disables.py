"""A moving project's callbacks that its old shard's workers disabled after the move copied
them (a 410 Gone, the failure threshold: the worker's writes do not read the move's freeze,
`registry.scripts`), disabled on the new shard too before the old shard's copies are
removed (`dispatcher.shards.move`, step 5). Without it the new shard kept them enabled and
delivered again to a receiver that had answered Gone (review).

Whether the new shard changed a callback since the copy (an enable, a registration again,
after the flip: that change stands) is read from what the copy wrote, never from clocks:
the copy notes on the new shard each callback's `updatedTime` as copied
(`keys.callbacks_copied`, in Redis, so a move that died is finished by another mover with
it), and a callback whose row there still holds exactly that time is unchanged there. The
first version compared the old shard's disable time with the new shard's `updatedTime`,
two hosts' clocks: a worker 1 s behind the API host that registered the callback, or a
disable in the registration's millisecond, lost the carry, and the new shard went on
delivering to a receiver that had answered Gone (review)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dispatcher import keys
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.registry.copies import project_rows, queue_put
from dispatcher.registry.scripts import DISABLE

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.services import Services

__all__ = [
    "COPIED_KEPT_S",
    "Carried",
    "CarryDisable",
    "carry_disables",
    "copy_callbacks",
    "forget_copied",
    "keep_copied",
]

# How long the note of a copy lives past the copy, or past the start of a move's finish
# (`keep_copied`): removed when the move ends; the TTL only ends a note no move finished.
COPIED_KEPT_S = 86_400
UNNOTED = -1  # `CarryDisable`'s answer: no note of the copy (lapsed, or a version before's)


@dataclass
class CarryDisable(Script):
    """Disables the callback whose hash is `callback` as its old shard did: with `reason`,
    at `at_ms` (`registry.scripts.DISABLE`), when it is enabled and its `updatedTime` is
    still the one the move's copy noted in `copied` for `callback_id` (no change was made
    to it here since: an enable or a registration after the flip is the later change, and
    stands; a write here stamped in that very millisecond is taken for none, but the
    freeze's settle, the copy, the flip and its settle come between). Returns 1 when it
    disabled it, 0 when missing, disabled already or changed here, `UNNOTED` (-1) when
    enabled with no note of its copy."""

    LUA = (
        DISABLE
        + """
local row = redis.call('HMGET', callback, 'enabled', 'updatedTime')
if row[1] ~= '1' then return 0 end
local noted = redis.call('HGET', copied, callback_id)
if not noted then return -1 end
if row[2] ~= noted then return 0 end
return disable(callback, disabled, reason, at_ms, match_prefix, sep, version_prefix)
"""
    )
    callback: Key
    disabled: Key
    copied: Key
    callback_id: str
    reason: str
    at_ms: int
    match_prefix: str
    sep: str
    version_prefix: str


class Carried(NamedTuple):
    """What `carry_disables` did: how many callbacks it disabled, and how many disabled on
    the old shard it left as they are for want of a note of their copy."""

    disabled: int
    unnoted: int


async def copy_callbacks(
    src: Services, dst: Services, project: str, alive: Callable[[], None]
) -> int:
    """Copy the project's callbacks from `src` to `dst` (ids kept: a move's step 2) and, in
    the same round trip, note on `dst` each one's `updatedTime` as copied, the note of an
    earlier copy replaced (`CarryDisable` reads it). `alive` is checked before the write
    (it raises to stop: the mover's lease). Returns how many."""
    rows = await project_rows(src.registry, project)
    copied = dst.keys.callbacks_copied(project)

    def write(pipe: Pipeline) -> None:
        for row in rows:
            queue_put(dst.registry, pipe, row, reset=False)
        pipe.delete(copied)
        if rows:
            pipe.hset(copied, mapping={row["id"]: row.get("updatedTime", "") for row in rows})
            pipe.expire(copied, COPIED_KEPT_S)

    alive()
    await run_pipeline(dst.redis, write)
    return len(rows)


async def keep_copied(dst: Services, project: str) -> None:
    """The note of the project's copy to `dst` kept `COPIED_KEPT_S` from now (a move's
    finish begins: its drain may be long, and a move that died may be finished late)."""
    await dst.redis.expire(dst.keys.callbacks_copied(project), COPIED_KEPT_S)


async def forget_copied(dst: Services, project: str) -> None:
    """Remove the note of the project's copy to `dst` (its move ended, or was undone)."""
    await dst.redis.delete(dst.keys.callbacks_copied(project))


async def carry_disables(
    src: Services, dst: Services, project: str, say: Callable[[str], None]
) -> Carried:
    """Disable on `dst` each of the project's callbacks that `src` holds disabled, with the
    reason and time `src` gave it, when `dst` holds it enabled and unchanged since the copy
    (`CarryDisable`): what a worker of `src` disabled after the move copied it; `say` tells
    the operator what it did, and what it could not judge. Run once the drain is done (no
    delivery of the project is left on `src`), before the project is removed from `src`."""
    rows = await project_rows(src.registry, project)
    k = dst.keys
    carried = [
        CarryDisable(
            callback=k.callback(row["id"]),
            disabled=k.CALLBACKS_DISABLED,
            copied=k.callbacks_copied(project),
            callback_id=row["id"],
            reason=row.get("disabledReason", ""),
            at_ms=int(row.get("updatedTime") or 0),
            match_prefix=k.MATCH_PREFIX,
            sep=keys.SEP,
            version_prefix=k.REGISTRY_VERSION_PREFIX,
        )
        for row in rows
        if row.get("enabled") == "0"
    ]

    def queue(pipe: Pipeline) -> None:
        for script in carried:
            script.queue_on(pipe)

    done = await run_pipeline(dst.redis, queue) if carried else []
    result = Carried(done.count(1), done.count(UNNOTED))
    old, new = src.shard.index, dst.shard.index
    if result.disabled:
        say(f"{project}: {result.disabled} callback(s) disabled on shard {old} meanwhile")
    if result.unnoted:
        say(
            f"{project}: {result.unnoted} callback(s) disabled on shard {old} left enabled on "
            f"shard {new}: no note of their copy there (a version before copied them, or the "
            "move was finished over a day later): compare them"
        )
    return result
