"""A mover's lease on a project: one move of a project at a time, fleet-wide.

A move takes the project's lease on the home shard (its mover's token, `LEASE_S`) and
renews it while it runs. Another move of the project meanwhile is refused; a move finds a
move of the project that died (and finishes or undoes it) only once that mover's lease
has lapsed. A mover that cannot keep its lease stops at its next step: each step that
copies, moves or removes data first checks (`alive`) that no renewal found the lease
taken or gone and that, by the mover's own clock, its last renewal still leaves a quarter
of the lease (renewals failed, or the mover was paused); each write of the placement
checks the token in the same script (`Placement.write`). What a stopped mover leaves is
its move's to finish.

A mover's marks on other shards (`mark`: the freeze of a project's callbacks on its old
shard) hold its token and live as long as its lease: renewed with it, they lapse with it
when the mover dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import Unavailable
from dispatcher.lua import Key, Script
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dispatcher.services import Services

__all__ = ["LEASE_S", "MoveLease"]

LEASE_S = 30.0
RENEWAL_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, TimeoutError)


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
    """`project`'s lease for the mover `token`, on the `home` shard; `say` tells the
    operator what goes wrong with it."""

    home: Services
    project: str
    token: str
    lease_s: float = LEASE_S
    say: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic  # the mover's own (a test's, paused)
    _until: float = field(default=0.0, init=False)  # monotonic: the last renewal's end
    _lost: str = field(default="", init=False)
    _marks: dict[int, tuple[Services, str]] = field(default_factory=dict, init=False)

    @property
    def key(self) -> str:
        return self.home.keys.move_lease(self.project)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Take the lease (Unavailable while another mover holds it), renewed meanwhile,
        then given back (a failure to give it back is said: it lapses)."""
        sent = self.clock()
        if not await self.home.redis.set(self.key, self.token, px=self._ms(), nx=True):
            left = max(await self.home.redis.pttl(self.key), 0) / 1000
            raise Unavailable(
                f"{self.project}: another move of it is under way (its mover's lease ends "
                f"within {left:.0f} s if that mover died): try again then"
            )
        self._until = sent + self.lease_s
        keeping = asyncio.create_task(self._keep())
        try:
            yield
        finally:
            await cancel_all([keeping])
            try:
                await KeepLease(self.key, self.token, 0).run(self.home.redis)
            except REDIS_ERRORS as exc:
                self.say(f"{self.project}: the move lease was not given back ({exc}): it lapses")

    def alive(self) -> None:
        """Raise Unavailable when the lease is lost (a renewal found it taken or gone) or,
        by this mover's clock, a quarter of it is all its last renewal has left (renewals
        failed, or the mover was paused): the move stops there, before Redis lets it go."""
        if self._lost or self.clock() > self._until - self.lease_s / 4:
            raise Unavailable(
                f"{self.project}: this mover stopped: "
                f"{self._lost or 'its lease may lapse (it was paused, or not renewed)'}"
            )

    async def fence(self) -> None:
        """`alive`, and the lease still this mover's in Redis (renewed)."""
        self.alive()
        if (kept := await self._renew()) != 1:
            self._lost = _LOST[kept]
            raise Unavailable(f"{self.project}: this mover stopped: {self._lost}")

    async def mark(self, services: Services, key: str) -> None:
        """Set `key` on the shard of `services` to this mover's token, renewed with the
        lease (one mark a shard)."""
        await services.redis.set(key, self.token, px=self._ms())
        self._marks[services.shard.index] = (services, key)

    async def unmark(self, services: Services, left_s: float = 0.0) -> bool:
        """This mover's mark on the shard of `services` renewed no more: kept `left_s`
        from now (0: removed); False when it is not this mover's (it lapsed)."""
        _, key = self._marks.pop(services.shard.index, (services, ""))
        ms = int(left_s * 1000)
        return bool(key) and await KeepLease(key, self.token, ms).run(services.redis) == 1

    async def marked(self, services: Services) -> bool:
        """Whether this mover's mark on the shard of `services` is still its own (renewed)."""
        services, key = self._marks.get(services.shard.index, (services, ""))
        return bool(key) and await KeepLease(key, self.token, self._ms()).run(services.redis) == 1

    async def _keep_marks(self) -> None:
        for services, _ in list(self._marks.values()):
            kept: bool | Exception
            try:
                kept = await asyncio.wait_for(self.marked(services), self.lease_s / 8)
            except RENEWAL_ERRORS as exc:
                kept = exc
            if kept is not True:
                self.say(
                    f"{self.project}: its mark on shard {services.shard.index} was not renewed "
                    f"({kept!r}): the move stops before it relies on it"
                )

    async def _renew(self) -> int:
        sent = self.clock()
        kept = int(await KeepLease(self.key, self.token, self._ms()).run(self.home.redis))
        if kept == 1:
            self._until = sent + self.lease_s
        return kept

    async def _keep(self) -> None:
        """Renew every quarter of the lease (each try given an eighth); when a renewal
        finds the lease taken or gone, mark it lost. The move itself checks (`alive`) at
        each step: cancelling it mid-step could leave a job on two shards."""
        while True:
            await asyncio.sleep(self.lease_s / 4)
            try:
                kept = await asyncio.wait_for(self._renew(), self.lease_s / 8)
            except RENEWAL_ERRORS as exc:
                self.say(f"{self.project}: the move lease was not renewed ({exc!r})")
                continue
            if kept != 1:
                self._lost = _LOST[kept]
                self.say(f"{self.project}: {self._lost}")
                return
            await self._keep_marks()

    def _ms(self) -> int:
        return int(self.lease_s * 1000)


_LOST = {0: "its lease lapsed: move it again", -1: "another mover took the lease"}
