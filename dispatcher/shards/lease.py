"""A mover's lease on a project: one move of a project at a time, fleet-wide.

A move takes the project's lease on the home shard (its mover's token, `LEASE_S`) and
renews it while it runs. Another move of the project meanwhile is refused; a move finds a
move of the project that died (and finishes or undoes it) only once that mover's lease
has lapsed. Before each step that writes the placement or removes data, the mover checks
that the lease is still its own (`fence`): one paused past its lease stops there, as if it
had died, and leaves the move to whoever took the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import Unavailable
from dispatcher.lua import Key, Script
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dispatcher.services import Services

__all__ = ["LEASE_S", "MoveLease"]

LEASE_S = 30.0
log = structlog.get_logger("dispatcher.shards")


@dataclass
class KeepLease(Script):
    """While `lease` holds `token`: extends it to `ms` from now, or deletes it (`ms` 0);
    returns 1, else 0 when it is gone (lapsed) and -1 when another mover holds it."""

    LUA = """
    local holder = redis.call('GET', lease)
    if not holder then return 0 end
    if holder ~= token then return -1 end
    if tonumber(ms) > 0 then redis.call('PEXPIRE', lease, ms) else redis.call('DEL', lease) end
    return 1
    """
    lease: Key
    token: str
    ms: int


@dataclass
class MoveLease:
    """`project`'s lease for the mover `token`, on the `home` shard."""

    home: Services
    project: str
    token: str
    lease_s: float = LEASE_S

    @property
    def key(self) -> str:
        return self.home.keys.move_lease(self.project)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Take the lease (Unavailable while another mover holds it), renewed meanwhile,
        then given back (a failure to give it back is logged: it lapses)."""
        ms = int(self.lease_s * 1000)
        if not await self.home.redis.set(self.key, self.token, px=ms, nx=True):
            left = max(await self.home.redis.pttl(self.key), 0) / 1000
            raise Unavailable(
                f"{self.project}: another move of it is under way (its mover's lease ends "
                f"within {left:.0f} s if that mover died): try again then"
            )
        keeping = asyncio.create_task(self._keep(ms))
        try:
            yield
        finally:
            await cancel_all([keeping])
            try:
                await KeepLease(self.key, self.token, 0).run(self.home.redis)
            except REDIS_ERRORS as exc:
                log.warning("move.lease_kept", project=self.project, error=str(exc))

    async def fence(self) -> None:
        """Raise Unavailable unless the lease is still this mover's (renewing it)."""
        kept = await KeepLease(self.key, self.token, int(self.lease_s * 1000)).run(self.home.redis)
        if kept == -1:
            raise Unavailable(f"{self.project}: another mover took this one's lease: it goes on")
        if kept != 1:
            raise Unavailable(f"{self.project}: this mover's lease lapsed: move it again")

    async def _keep(self, ms: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                kept = await KeepLease(self.key, self.token, ms).run(self.home.redis)
            except REDIS_ERRORS as exc:  # the next renewal, or the next fence, tells
                log.warning("move.lease_not_renewed", project=self.project, error=str(exc))
                continue
            if kept != 1:
                log.warning("move.lease_lost", project=self.project, holder=kept)
                return
