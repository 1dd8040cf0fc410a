"""Growing: shards added to the list, and the projects whose shard changes moved to it,
under load, nothing lost (`dispatcher shards grow`, `rebalance`, `move`).

`grow` (after the longer list is on every process; until then the new shards take no
project): it freezes the callbacks and roles of the projects that the longer list would
move (`:growing`), pins each one that has data to the shard the hash put it on (where its
data and events are, whatever stale copy another shard holds), copies the platform-wide
callbacks and the `*` roles to the new shards, then puts the longer list in use (and copies
them once more: see `Mover.grow`). New
projects go to the new shards from then on; the pinned ones stay where they are until
moved.

`move` (one project; `rebalance` every one placed explicitly, to where its hash says):
  1. freeze its callbacks and roles (placement `from>to`), and wait until every process
     has seen it (`settle`: three placement refreshes); its callbacks are frozen on the
     old shard too (a mark its registry's writes refuse, kept with the mover's lease:
     `registry.scripts`), so that a change that passed a process's check before the
     freeze (its URL's host slow to resolve) and lands after the copy is refused;
  2. copy its callbacks (ids kept) and roles to the new shard, and its Redis history; the
     new shard keeps a note of each callback's `updatedTime` as copied until the move ends;
  3. flip its placement, and wait again: from now on its events are queued on the new
     shard, where its callbacks are;
  4. drain (`dispatcher.shards.drain`): its jobs still queued on the old shard (retries,
     events queued just before the flip, or late by a producer's retries) are taken one
     at a time under a lease, written to the new shard, then removed from the old (a job
     a worker holds, or took from a mover paused past its lease, is left to finish, and
     looked at again); its ordered deliveries are not moved but finish there, in order,
     while its lanes on the new shard wait (`dispatcher.shards.lanes`), and so do the
     events whose fan-out began there (a run died, or a re-run goes on: what it sent is
     marked there, and read by its re-run); until none is left and none came for a
     settle, and the last push a producer may still make there is past;
  5. disable on the new shard the callbacks a worker disabled on the old one since their
     copy, unless changed there since (their `updatedTime` is not the one noted at the
     copy: `dispatcher.shards.disables`), copy the history written meanwhile and its drops
     (after those made on the new shard since the flip), remove the project from the old
     shard, and let its lanes on the new one go. The freeze mark stays on the old shard
     `FROZEN_AFTER_S` (a change slower still is refused there too); a move back removes it
     first.
With `DISPATCHER_REDIS_MIN_REPLICAS`, what it wrote to a shard is on that many replicas
before a step relies on it: the copies (2) before the flip, each placement, each moved job
before it leaves the old shard, the history before the old shard is cleaned; else the move
stops (NotReplicated). Before the flip nothing of the project is removed from the old shard
(its callbacks and roles stay frozen until the move is run again); after it, only the
queued jobs moved so far have left it (each on the new shard's replicas first), and its
lanes on the new shard stay held (its ordered deliveries wait) until the move is finished.
A mover that dies leaves a job under its lease, which lapses: the job runs on the old
shard as well, under the same delivery id (at least once, never lost). Moving again
finishes the move: from its start before the flip, from step 4 after it (the hold on the
new shard names the old one). A move elsewhere undoes one that died before its flip.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.auth import ALL_PROJECTS
from dispatcher.errors import InvalidInput, Unavailable
from dispatcher.history.redis import RedisHistory
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.placement import Placed, rendezvous
from dispatcher.shards.disables import carry_disables, copy_callbacks, forget_copied, keep_copied
from dispatcher.shards.drain import (
    STOPPED,
    STOPPED_FLIPPED,
    Drain,
    confirmed,
    late_pushes_s,
)
from dispatcher.shards.holdings import copy_drops, forget, holds, projects_on, thaw
from dispatcher.shards.lanes import hold, hold_source, let_go
from dispatcher.shards.lease import MoveLease
from dispatcher.shards.left import to_drain
from dispatcher.shards.queued import MOVER

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dispatcher.services import Services
    from dispatcher.shards.router import Router

__all__ = ["Mover"]

SETTLE_REFRESHES = 3
FROZEN_AFTER_S = 600.0  # how long the freeze mark stays on the old shard after a move


@dataclass
class Mover:
    """Moves projects between the shards of `router`, saying what it does with `say`."""

    router: Router
    say: Callable[[str], None] = print
    settle_s: float = 0.0
    token: str = field(default_factory=lambda: f"{MOVER}{time.time_ns()}")
    # a drain ends no sooner than this after the flip; None: `drain.late_pushes_s` (what
    # the settings say), 0: it waits for no late push
    late_s: float | None = None

    def __post_init__(self) -> None:
        if not self.settle_s:
            self.settle_s = SETTLE_REFRESHES * self.router.settings.placement_refresh
        if self.late_s is None:
            self.late_s = late_pushes_s(self.router.settings)

    async def grow(self) -> list[str]:
        """Put every listed shard in use; returns the projects pinned where they are.

        The new shards get the platform-wide callbacks and the `*` roles before the longer
        count is published (no project is placed on a shard without them: a grow stopped
        before that is run again), and once more after every process has seen it (a change
        made meanwhile by a process that did not write to the new shards). With nothing to
        grow, it copies them again (a grow of the version before published the count first:
        stopped there, the new shard was in use without them)."""
        placement = self.router.placement
        old, new = placement.active, placement.count
        if new <= old:
            copied = await self.sync()
            self.say(
                f"{old} shard(s) in use, {new} listed: nothing to grow; the platform-wide "
                f"callbacks ({copied}) and `*` roles copied to every shard again"
            )
            return []
        await placement.write_counts(old, new)
        await self.settle()  # every process now freezes the projects that would move
        pinned = []
        for project in await self.known(old):
            home = rendezvous(project, old)  # placed by the hash: its data is there
            if project not in placement.explicit and rendezvous(project, new) != home:
                await placement.write(project, Placed(home))
                pinned.append(project)
        try:
            await self.sync()
        except Unavailable as exc:
            raise Unavailable(
                f"{exc.message}. The grow stopped before the new shards took any project "
                f"({old} still in use): run it again once they answer"
            ) from exc
        for services in self.router.shards[old:new]:
            await confirmed(services, "the platform-wide callbacks", "the count is unchanged")
        await placement.write_counts(new, None)
        # the pins with the counts (a replica holds a prefix of the master's writes)
        await confirmed(self.router.home, "the placements", "they are on its master alone")
        await self.settle()
        await self.sync()
        self.say(f"{new} shards in use; {len(pinned)} project(s) pinned, to move: rebalance")
        return pinned

    async def known(self, count: int) -> set[str]:
        """The projects with callbacks, roles or history on the first `count` shards."""
        found: set[str] = set()
        for services in self.router.shards[:count]:
            found |= await projects_on(services)
        return found

    async def sync(self) -> int:
        """Copy the platform-wide callbacks and the `*` roles of the home shard to every
        shard; returns how many callbacks."""
        copied = await self.router.platform.sync()
        for user, role in (await self.router.home.roles.list(ALL_PROJECTS)).items():
            for services in self.router.shards[1:]:
                await services.roles.grant(ALL_PROJECTS, user, role)
        return copied

    async def rebalance(self) -> int:
        """Move every project placed explicitly to where the hash puts it (one placed there
        already is a move that died after its flip: a move that ends there drops its
        explicit placement); returns how many moved, or had a move finished."""
        placement, moved, refused = self.router.placement, 0, []
        for project in sorted(placement.explicit):
            try:
                moved += await self.move(project, rendezvous(project, placement.active))
            except Unavailable as exc:  # the others still move
                self.say(f"not moved: {exc.message}")
                refused.append(project)
        if refused:
            raise Unavailable(
                f"{moved} project(s) moved; not moved (see above; run rebalance again): "
                + ", ".join(refused)
            )
        return moved

    async def move(self, project: str, target: int, came_from: int | None = None) -> bool:
        """Move one project to shard `target` (see the module's doc), first finishing or
        undoing a move of it that died; returns whether any of its data moved. One move of
        a project at a time (`shards.lease`): Unavailable while another one runs.
        `came_from`: the shard a move that died after its flip came from, when its hold
        (the version before's) does not say and several shards hold the project."""
        if project in (PLATFORM_PROJECT, ALL_PROJECTS) or ":" in project:
            raise InvalidInput(f"{project!r} is not a project that lives on one shard")
        for shard in (target, came_from):
            if shard is not None and not 0 <= shard < len(self.router.shards):
                raise InvalidInput(f"there is no shard {shard}")
        lease = MoveLease(
            self.router.home,
            project,
            self.token,
            lease_s=self.router.settings.move_lease,
            say=self.say,
        )
        async with lease.held():
            await self.router.placement.load()  # as the mover before may have left it
            return await self._move(project, target, lease, came_from)

    async def _move(
        self, project: str, target: int, lease: MoveLease, came_from: int | None = None
    ) -> bool:
        placement = self.router.placement
        placed = placement.explicit.get(project)
        source = placed.index if placed is not None else placement.shard_of(project)
        moved = False
        if came_from is not None and placed is not None and placed.moving_to is not None:
            raise InvalidInput(
                f"{project}: --came-from does not apply: its move died before its flip"
            )
        if placed is not None and placed.moving_to not in (None, target):
            await self._abandon(project, placed.moving_to, lease)
            await thaw(self.router.shards[source], project)  # the dead mover's mark
            moved = True
        elif placed is None or placed.moving_to is None:
            moved = await self._finish_dead(project, source, lease, came_from)
        if source != target:
            await self._move_from(project, source, target, lease)
            moved = True
        lease.alive()
        await let_go(self.router.shards[target], project)
        hashed = rendezvous(project, placement.active) == target
        done = "the move is done, its last placement on the home shard's master alone"
        await self._place(lease, project, None if hashed else Placed(target), done)
        self.say(f"{project}: on shard {target}")
        return moved

    async def _move_from(self, project: str, source: int, target: int, lease: MoveLease) -> None:
        """Steps 1 to 5 of the module's doc."""
        src, dst = self.router.shards[source], self.router.shards[target]
        if target >= self.router.placement.active:  # `grow` not run yet
            self.say(
                f"{project}: shard {target} is not in use yet: a process given fewer shards "
                f"refuses {project}'s events and changes (503) until it has the whole list"
            )
        self.say(f"{project}: shard {source} -> {target}: freezing its callbacks")
        await self._place(lease, project, Placed(source, target), STOPPED)
        await lease.mark(src, src.keys.callbacks_frozen(project))
        await thaw(dst, project)  # what a move away from it left
        await self.settle()
        await lease.fence()
        await hold(dst, project, source)
        await self._copy(src, dst, project, lease.alive)
        await confirmed(dst, f"{project}'s hold, callbacks, roles and history", STOPPED)
        await self._place(lease, project, Placed(target), STOPPED_FLIPPED)
        flipped = time.monotonic()
        await self.settle()
        await lease.fence()
        await self._finish(src, dst, project, source, lease, flipped)

    async def _place(
        self, lease: MoveLease, project: str, placed: Placed | None, then: str
    ) -> None:
        """Write the project's placement while this mover holds its `lease`, confirmed by
        the home shard's replicas (`DISPATCHER_REDIS_MIN_REPLICAS`: `then` says what a
        write they do not confirm leaves)."""
        lease.alive()
        if not await self.router.placement.write(project, placed, lease=(lease.key, lease.token)):
            raise Unavailable(f"{project}: this mover lost its lease: its placement stays")
        what = f"{project}'s placement ({placed or 'by the hash'})"
        await confirmed(self.router.home, what, then)

    async def _finish_dead(
        self, project: str, current: int, lease: MoveLease, said: int | None = None
    ) -> bool:
        """Finish a move to `current` that died after its flip (its hold, still on, names
        the shard it came from, or the operator `said` which: the project's data is still
        there too); returns whether there was one to finish."""
        dst = self.router.shards[current]
        came_from = await hold_source(dst, project)
        if said is not None and came_from not in (-1, said):
            why = f"its hold says shard {came_from}"
            if came_from is None:
                why = "no move of it died after its flip"
            raise InvalidInput(f"{project}: its move did not come from shard {said}: {why}")
        if came_from is None:
            return False
        if came_from >= len(self.router.shards):
            raise Unavailable(
                f"{project}: a move of it from shard {came_from} died after its flip, and "
                f"{len(self.router.shards)} shards are listed: list that shard again"
            )
        # the version before's hold (-1) names none: the one other shard holding the project
        candidates = [came_from] if came_from >= 0 else range(len(self.router.shards))
        olds = [
            i for i in candidates
            if i != current and await holds(self.router.shards[i], project)
        ]  # fmt: skip
        if said is not None and came_from < 0:  # the operator says which one
            if said not in olds:
                raise InvalidInput(f"{project}: shard {said} is not one of {olds}, which hold it")
            olds = [said]
        if len(olds) > 1:
            raise Unavailable(
                f"{project}: a move of it died after its flip, and shards {olds} all "
                "hold its data: its hold (the version before's) does not say which one "
                "it came from, so nothing is moved (say which: --came-from)"
            )
        for index in olds:
            self.say(f"{project}: finishing its move from shard {index}")
            flipped = time.monotonic()  # or before: the late pushes are waited for from now
            await self._finish(self.router.shards[index], dst, project, index, lease, flipped)
        lease.alive()
        await let_go(dst, project)
        return bool(olds)

    async def _abandon(self, project: str, index: int, lease: MoveLease) -> None:
        """Undo a move to shard `index` that died before its flip: its copies there go, and
        its hold (the project's data and events stayed where they were)."""
        self.say(f"{project}: undoing its move to shard {index}")
        await lease.fence()
        await forget(self.router.shards[index], project, lease.alive)
        await forget_copied(self.router.shards[index], project)
        lease.alive()
        await let_go(self.router.shards[index], project)

    async def settle(self) -> None:
        await asyncio.sleep(self.settle_s)

    async def _finish(
        self,
        src: Services,
        dst: Services,
        project: str,
        source: int,
        lease: MoveLease,
        flipped: float,
    ) -> None:
        """After the flip (at `flipped`, monotonic): drain the old shard, carry over the
        disables made there since the copy, copy the history written meanwhile, clean it,
        each once the new shard's replicas confirmed."""
        late_s = self.late_s or 0.0  # (set by now: see `__post_init__`)
        await lease.mark(src, src.keys.callbacks_frozen(project))  # (a dead move's: again)
        await keep_copied(dst, project)  # the note of the copy, for `carry_disables`
        drain = self.drain_of(src, dst, project, lease.alive, flipped + late_s, lease.fence)
        moved = await drain.run()
        while left := await to_drain(src, project):  # none may be left where it is cleaned
            self.say(f"{project}: {left} job(s) or lane(s) of it still on shard {source}")
            moved += await drain.run()
        self.say(f"{project}: {moved} queued job(s) moved; cleaning shard {source}")
        lease.alive()
        await carry_disables(src, dst, project, self.say)  # a worker's, since the copy
        await copy_drops(src, dst, project)  # none come there now: its jobs are all gone
        await self._copy_history(src, dst, project, lease.alive)
        await confirmed(dst, f"{project}'s disables, history and drops", STOPPED_FLIPPED)
        await lease.fence()
        if not await lease.marked(src):
            raise Unavailable(
                f"{project}: the freeze of its callbacks on shard {source} lapsed (see above): "
                f"a change made there since their copy is not on shard {dst.shard.index}; "
                f"shard {source} is not cleaned (compare them, then move it again)"
            )
        await forget(src, project, lease.alive)
        await forget_copied(dst, project)
        await lease.unmark(src, FROZEN_AFTER_S)

    def drain_of(
        self,
        src: Services,
        dst: Services,
        project: str,
        alive: Callable[[], None],
        until: float = 0.0,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> Drain:
        """The drain of `project`'s jobs from `src` to `dst` (step 4) by this mover (see
        `Drain` for `alive`, `until` and `fence`)."""
        return Drain(
            src, dst, project, self.token, alive, self.say, self.settle_s, until, fence=fence
        )

    async def _copy(
        self, src: Services, dst: Services, project: str, alive: Callable[[], None]
    ) -> None:
        """Copy the project's callbacks, roles and Redis history, `alive` checked before
        each write (it raises to stop: the mover's lease)."""
        await copy_callbacks(src, dst, project, alive)  # and their note (`carry_disables`)
        for user, role in (await src.roles.list(project)).items():
            alive()
            await dst.roles.grant(project, user, role, mover=True)
        await self._copy_history(src, dst, project, alive)

    @staticmethod
    async def _copy_history(
        src: Services, dst: Services, project: str, alive: Callable[[], None]
    ) -> None:
        if isinstance(src.history, RedisHistory) and isinstance(dst.history, RedisHistory):
            from dispatcher.history.moving import copy_project

            await copy_project(src.history, dst.history, project, alive)
