"""Platform-wide callbacks (`DEVOPS_ALL_PROJECT`) on every shard.

They receive the events of every project, and each shard fans its own projects' events
out alone, never reading another shard: so every shard holds a copy of each. The home
shard (shard 0) is where they are registered: it hands out their ids (so a callback has
one id on every shard, the home shard's range) and holds the authoritative copy; every
change is made there first, then the callback is written to each other shard as the home
shard holds it. A shard that did not answer misses the change until the next one, or
until `dispatcher shards sync` copies every platform-wide callback again (it is also how
a new shard gets them): the operator's call fails with 503 saying so.

Endpoint health is per shard (each counts the failures of the deliveries it made), so a
copy can be disabled on one shard before the others: the views below show a callback
disabled when any copy is, and enabling it enables every copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import NotFound, NotReplicated, Unavailable
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.registry.copies import callback_ids, put_rows, read_rows
from dispatcher.services import DEFAULT_OVERLAP_HOURS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dispatcher.models import Callback, CallbackPage, CreateCallBackResult, Event
    from dispatcher.registry import Registration
    from dispatcher.services import Services

__all__ = ["PlatformCallbacks"]


log = structlog.get_logger("dispatcher.shards")

# a shard that did not take a copy: away, or its replicas did not confirm it
UNCOPIED: tuple[type[Exception], ...] = (*REDIS_ERRORS, NotReplicated)


class PlatformCallbacks:
    """The platform-wide callbacks of every shard, with the methods of `Services` that
    manage a scope's callbacks."""

    def __init__(self, shards: list[Services]) -> None:
        self.home = shards[0]
        self.others = shards[1:]

    async def register(self, registration: Registration, event: Event | str) -> int:
        """`Services.register` on the home shard, then on every other."""
        callback_id = await self.home.register(registration, event)
        await self.copy([callback_id], reset=True)
        return callback_id

    async def register_batch(self, registration: Registration, events: str) -> CreateCallBackResult:
        """`Services.register_batch` on the home shard, then on every other."""
        result = await self.home.register_batch(registration, events)
        await self.copy(await callback_ids(self.home.registry, PLATFORM_PROJECT), reset=True)
        return result

    async def rotate_secret(
        self,
        callback_id: int,
        project_id: str,
        secret_token: str,
        overlap_hours: float = DEFAULT_OVERLAP_HOURS,
        *,
        pipeline_id: str | None = None,
    ) -> Callback:
        found = await self.home.rotate_secret(
            callback_id, project_id, secret_token, overlap_hours, pipeline_id=pipeline_id
        )
        await self.copy([callback_id], reset=False)
        return found

    async def delete(
        self, callback_id: int, project_id: str, *, pipeline_id: str | None = None
    ) -> None:
        unconfirmed = None  # deleted on the home shard's master: deleted everywhere too
        try:
            await self.home.delete(callback_id, project_id, pipeline_id=pipeline_id)
        except NotReplicated as exc:
            unconfirmed = exc
        await self._each(lambda shard: _delete(shard, callback_id))
        if unconfirmed is not None:
            raise unconfirmed

    async def enable(self, callback_id: int, *, project_id: str | None = None) -> None:
        """Enable every copy (also one a shard disabled): their failure counts start again."""
        await self.home.enable(callback_id, project_id=project_id)
        await self.copy([callback_id], reset=True)

    async def disable(
        self, callback_id: int, *, by: str, reason: str | None = None, project_id: str | None = None
    ) -> None:
        await self.home.disable(callback_id, by=by, reason=reason, project_id=project_id)
        await self.copy([callback_id], reset=False)

    async def callbacks(
        self,
        project_id: str,
        page: int = 1,
        page_size: int = 20,
        *,
        pipeline_id: str | None = None,
    ) -> CallbackPage:
        """The home shard's list, each callback shown disabled when a copy is."""
        found = await self.home.callbacks(project_id, page, page_size, pipeline_id=pipeline_id)
        found.records = [await self._merged(callback) for callback in found.records]
        return found

    async def callback(
        self, callback_id: int, project_id: str, *, pipeline_id: str | None = None
    ) -> Callback:
        return await self._merged(
            await self.home.callback(callback_id, project_id, pipeline_id=pipeline_id)
        )

    async def _merged(self, callback: Callback) -> Callback:
        """`callback` as the home shard has it, disabled when a copy is (with its reason)."""
        if not callback.enabled:
            return callback
        for shard in self.others:
            try:
                (row,) = await read_rows(shard.registry, [callback.id])
            except REDIS_ERRORS:
                continue
            if row and row.get("enabled") != "1":
                reason = row.get("disabledReason") or "disabled"
                return callback.model_copy(
                    update={
                        "enabled": False,
                        "disabled_reason": f"{reason} (on shard {shard.shard.index})",
                    }
                )
        return callback

    async def copy(self, ids: list[int], *, reset: bool) -> None:
        """Write the home shard's callbacks `ids` to every other shard (a deleted one is
        deleted there too)."""
        rows = await read_rows(self.home.registry, ids)
        present = [row for row in rows if row]
        gone = [cid for cid, row in zip(ids, rows, strict=True) if not row]

        async def write(shard: Services) -> None:
            await put_rows(shard.registry, present, reset=reset)
            for cid in gone:
                await _delete(shard, cid)

        await self._each(write)

    async def sync(self) -> int:
        """Copy every platform-wide callback of the home shard to every other shard, and
        delete there the ones the home shard no longer has; returns how many were copied."""
        ids = await callback_ids(self.home.registry, PLATFORM_PROJECT)
        await self.copy(ids, reset=False)
        for shard in self.others:
            stale = set(await callback_ids(shard.registry, PLATFORM_PROJECT)) - set(ids)
            for cid in stale:
                await _delete(shard, cid)
        return len(ids)

    async def _each(self, write: Callable[[Services], Awaitable[None]]) -> None:
        missed = []
        for shard in self.others:
            try:
                await write(shard)
                await shard.registry.confirmed()
            except UNCOPIED as exc:
                log.warning("shards.platform_copy_failed", shard=shard.shard.index, error=str(exc))
                missed.append(str(shard.shard.index))
        if missed:
            raise Unavailable(
                f"the platform-wide callback was saved, but shard(s) {', '.join(missed)} did "
                "not answer, or their replicas did not confirm it (DISPATCHER_REDIS_MIN_REPLICAS):"
                " their projects' events may not reach it as it is now; do it again (or run "
                "`dispatcher shards sync`) once they answer"
            )


async def _delete(shard: Services, callback_id: int) -> None:
    try:
        await shard.registry.delete(PLATFORM_PROJECT, callback_id)
    except NotFound:
        pass
