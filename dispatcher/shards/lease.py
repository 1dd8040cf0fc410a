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

from dispatcher.errors import Unavailable
from dispatcher.lua import Key, Script
from dispatcher.stopping import retrieved

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dispatcher.services import Services

__all__ = ["LEASE_S", "MoveLease"]

LEASE_S = 30.0


@dataclass
class KeepLease(Script):
    """While `lease` holds `token`: extends it to `ms` from now, or deletes it (`ms` 0);
    returns 1, else 0."""

    LUA = """
    if redis.call('GET', lease) ~= token then return 0 end
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
        then given back."""
        ms = int(self.lease_s * 1000)
        if not await self.home.redis.set(self.key, self.token, px=ms, nx=True):
            left = max(await self.home.redis.pttl(self.key), 0) / 1000
            raise Unavailable(
                f"{self.project}: another move of it is under way (its mover's lease ends "
                f"within {left:.0f} s if that mover died): try again then"
            )
        keeping = asyncio.create_task(self._keep(ms))
        keeping.add_done_callback(retrieved)
        try:
            yield
        finally:
            keeping.cancel()
            await KeepLease(self.key, self.token, 0).run(self.home.redis)

    async def fence(self) -> None:
        """Raise Unavailable unless the lease is still this mover's (renewing it)."""
        if not await KeepLease(self.key, self.token, int(self.lease_s * 1000)).run(self.home.redis):
            raise Unavailable(f"{self.project}: this mover lost its lease: another one goes on")

    async def _keep(self, ms: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(Exception):  # a failed renewal: the fences tell
                await KeepLease(self.key, self.token, ms).run(self.home.redis)
