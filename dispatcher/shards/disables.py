"""A moving project's callbacks that its old shard's workers disabled after the move copied
them (a 410 Gone, the failure threshold: the worker's writes do not read the move's freeze,
`registry.scripts`), disabled on the new shard too before the old shard's copies are
removed (`dispatcher.shards.move`, step 5). Without it the new shard kept them enabled and
delivered again to a receiver that had answered Gone (review)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher import keys
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.registry.copies import callback_ids, read_rows
from dispatcher.registry.scripts import DISABLE

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.services import Services

__all__ = ["CarryDisable", "carry_disables"]


@dataclass
class CarryDisable(Script):
    """Disables the callback whose hash is `callback` as its old shard did: with `reason`,
    at `at_ms` (`registry.scripts.DISABLE`), unless it is missing, disabled already, or
    its hash was changed at or after `at_ms` (a change made on this shard since the flip,
    a registration or an enable, is the later one: it stands). Returns 1 when it disabled
    it, else 0."""

    LUA = (
        DISABLE
        + """
local row = redis.call('HMGET', callback, 'enabled', 'updatedTime')
if row[1] ~= '1' or tonumber(row[2] or '0') >= tonumber(at_ms) then return 0 end
return disable(callback, disabled, reason, at_ms, match_prefix, sep, version_prefix)
"""
    )
    callback: Key
    disabled: Key
    reason: str
    at_ms: int
    match_prefix: str
    sep: str
    version_prefix: str


async def carry_disables(src: Services, dst: Services, project: str) -> int:
    """Disable on `dst` each of the project's callbacks that `src` holds disabled, with the
    reason and time `src` gave it, unless `dst` holds it disabled already or changed it
    since (`CarryDisable`): what a worker of `src` disabled after the move copied it.
    Run once the drain is done (no delivery of the project is left on `src`), before the
    project is removed from `src`; returns how many it disabled."""
    rows = await read_rows(src.registry, await callback_ids(src.registry, project))
    k = dst.keys
    carried = [
        CarryDisable(
            callback=k.callback(row["id"]),
            disabled=k.CALLBACKS_DISABLED,
            reason=row.get("disabledReason", ""),
            at_ms=int(row.get("updatedTime") or 0),
            match_prefix=k.MATCH_PREFIX,
            sep=keys.SEP,
            version_prefix=k.REGISTRY_VERSION_PREFIX,
        )
        for row in rows
        if row and row.get("enabled") == "0"
    ]

    def queue(pipe: Pipeline) -> None:
        for script in carried:
            script.queue_on(pipe)

    return sum(await run_pipeline(dst.redis, queue)) if carried else 0
