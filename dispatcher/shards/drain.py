"""Step 4 of a move (`dispatcher.shards.move`): the drain. The moving project's jobs queued
on its old shard are taken across one at a time until none is left and none came for a
settle, and not before the last event a producer may still queue there has come
(`late_pushes_s`: a producer routes an event by the placement it last read, and tries
that shard again for up to `DISPATCHER_EMIT_WAIT`).

One job moves in three writes on two shards, so that it is never on neither, nor run on
both while its mover lives:
  1. it is taken on the old shard under the mover's lease (`TakeJob`): no worker there
     claims it meanwhile;
  2. a copy is queued on the new shard *held* by the mover (`PlaceJob`): no worker there
     runs it yet. A copy of it there held by another mover (paused past its lease while
     this one took the move over) is written over, this one's now: that mover no longer
     removes it. With `DISPATCHER_REDIS_MIN_REPLICAS`, it is on that many replicas
     before step 3 (`dispatcher.replication`);
  3. the job leaves the old shard while the mover's lease there is still its own
     (`DropHeld`: no worker took it since), and the copy is let run (`FreeHeld`, due when
     the job was). A mover paused past that lease finds a worker took the job: it
     removes the copy while it still holds it (held twice the lease) and its lease on the
     project is still its own (`fence`: else another mover may have moved the job, the
     copy its only one), and looks at the job again on the next pass.
A copy its replicas did not confirm is removed, and the job given back on the old shard
(its workers run it at once): the move stops (NotReplicated: `STOPPED_FLIPPED` says what
it leaves). Each write answers as it did when redis-py sends it again, its first answer
lost (`TakeJob` and `PlaceJob` find the mover's own lease or hold; `DropHeld` leaves the
mover's word that it removed the job). A write that fails (Redis unreachable through
redis-py's tries) leaves the job to the next pass: after a failed take or placement it is
under the mover's lease on the old shard, taken again then; a failed removal, or letting
the copy run, is made again then (`Drain.unsettled`), the copy held meanwhile, as it may
be the only one.

A mover stopped mid-job (it died, it lost its lease, or its move stopped on an error)
leaves that job on one shard or both, never on neither: on the old one, run there once
the mover's lease lapses (30 s), and/or its copy on the new one, run once the hold does
(60 s): at least once, under the same delivery id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from dispatcher.bodies import Carried
from dispatcher.connections import REDIS_ERRORS
from dispatcher.errors import NotReplicated
from dispatcher.lua import run_pipeline
from dispatcher.replication import Replication, confirm, run_replicated
from dispatcher.shards.lanes import lanes_left, ordered_on
from dispatcher.shards.left import Scan
from dispatcher.shards.queued import (
    MOVE,
    OTHER_EVENT,
    STAY,
    UNLESS_BEGUN,
    DropHeld,
    FreeHeld,
    PlaceJob,
    TakeJob,
    job_keys,
    where_to,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys
    from dispatcher.services import Services
    from dispatcher.settings import Settings

__all__ = [
    "LEASE_S",
    "STOPPED",
    "STOPPED_FLIPPED",
    "Drain",
    "Taken",
    "confirmed",
    "late_pushes_s",
]

LEASE_S = 30.0  # a job the mover takes is leased this long on the old shard
HOLD_FACTOR = 2  # and its copy held this many times as long on the new one
SAY_EVERY_S = 10.0  # how often a move waiting for jobs to finish on the old shard says so
TOOK_OVER = 2  # `PlaceJob`'s answer: the copy was held by another mover
# What a write the replicas did not confirm leaves: before a move's flip, and after it
STOPPED = (
    "the move stopped before its flip, nothing of the project removed from its old shard "
    "(its callbacks and roles frozen until the move is run again)"
)
STOPPED_FLIPPED = (
    "the move stopped after its flip: of the project, only the queued jobs moved so far "
    "left its old shard (each confirmed on the new one), the rest is still there; its "
    "ordered deliveries on the new shard wait (their lanes held) until the move is finished"
)
NO_TTL_MARK_MS = 86_400_000  # a progress mark without a time to live goes with a day


def late_pushes_s(settings: Settings) -> float:
    """How long after a move's flip an event may still be queued on the old shard: a
    producer that routed it by the placement it read before the flip (read again every
    `DISPATCHER_PLACEMENT_REFRESH`) tries that shard for up to `DISPATCHER_EMIT_WAIT`,
    its last try's write answered within `DISPATCHER_REDIS_TIMEOUT`."""
    return settings.placement_refresh + settings.emit_wait + settings.redis_timeout


async def confirmed(services: Services, what: str, then: str) -> None:
    """What the mover wrote to `services`' shard so far, on as many of its replicas as
    `DISPATCHER_REDIS_MIN_REPLICAS` says, before it goes on; NotReplicated otherwise,
    saying `what` was not confirmed, and `then` what that leaves (`STOPPED`, ...)."""
    try:
        await confirm(services.redis, Replication.of(services.settings, services.keys))
    except NotReplicated as exc:
        raise _unconfirmed(exc, f"shard {services.shard.index}: {what}", then) from exc


def _unconfirmed(exc: NotReplicated, what: str, then: str) -> NotReplicated:
    return NotReplicated(
        f"{what} not confirmed ({exc.message}): {then}; run it again once the replicas are back",
        confirmed=exc.confirmed,
        wanted=exc.wanted,
    )


@dataclass
class Taken:
    """A job the mover took on the old shard, as it was there: its bytes, due time and
    time to live, the kept body it refers to (it goes along), and its marks (`marks`)."""

    job_id: str
    data: bytes
    due: bytes
    ttl_ms: int
    carried: Carried | None
    progress: tuple[bytes, int] | None = None  # its progress mark and that mark's ms left
    pushed: tuple[bytes, int] | None = None  # a window redelivery's queued-once key, too

    def marks(self, keys: Keys) -> list[tuple[str, bytes, int]]:
        """Its marks on the shard of `keys`: key, value, ms to keep (the mark's write time
        stays readable: see `worker.marks`)."""
        found = []
        if self.progress is not None:
            value, ms = self.progress
            found.append((keys.delivery(self.job_id), value, ms if ms > 0 else NO_TTL_MARK_MS))
        if self.pushed is not None and self.pushed[1] > 0:
            found.append((keys.pushed(self.job_id), *self.pushed))
        return found


@dataclass
class Drain:
    """Step 4 of `project`'s move from `src` to `dst` (see the module's doc), by the mover
    `token` (`queued.MOVER` and more); `alive` raises to stop it (the mover's lease, by its
    clock), and so does `fence` (the lease still its own in Redis; None: `alive`), checked
    before the mover removes a copy. It ends once no job was found for `quiet_s`, and not
    before `until` (monotonic)."""

    src: Services
    dst: Services
    project: str
    token: str
    alive: Callable[[], None]
    say: Callable[[str], None] = print
    quiet_s: float = 0.0
    until: float = 0.0
    lease_s: float = LEASE_S
    hold_s: float = 0.0  # (0: `HOLD_FACTOR` times `lease_s`)
    fence: Callable[[], Awaitable[None]] | None = None
    replication: Replication | None = field(init=False)
    # the jobs Redis kept from settling (`settle`), and whether their copy was placed
    unsettled: dict[str, tuple[Taken, bool]] = field(init=False, default_factory=dict)
    kept: set[str] = field(init=False, default_factory=set)  # the ids of events that `stay`
    scan: Scan = field(init=False)

    def __post_init__(self) -> None:
        self.replication = Replication.of(self.dst.settings, self.dst.keys)
        self.scan = Scan(self.src, self.project)
        self.hold_s = self.hold_s or HOLD_FACTOR * self.lease_s

    async def run(self) -> int:
        """Move the project's queued jobs, and wait for those that stay (`queued.where_to`)
        to end on the old shard; returns how many moved."""
        moved, quiet_since, said = 0, time.monotonic(), time.monotonic()
        while True:
            self.alive()
            began = time.monotonic()  # a pass that ends it began once no push may come
            found, taken, staying = await self.one_pass()
            moved += taken
            now = time.monotonic()
            if found or staying:
                quiet_since = now
            elif now - quiet_since >= self.quiet_s and began >= self.until:
                # a lane's head is always in the queue (or its fan-out is): none left there
                # means no lane left; a lane without one would wait here, and say so
                if not (staying := await lanes_left(self.src, self.project)):
                    return moved
            if staying and now - said >= SAY_EVERY_S:
                said = now
                self.say(f"{self.project}: waiting for {staying} job(s) or lane(s) to end there")
            await asyncio.sleep(min(0.2 if found or not staying else 1.0, self.quiet_s))

    async def one_pass(self) -> tuple[int, int, int]:
        """One pass over the project's jobs on the old shard (`shards.left`): (those seen,
        those moved, those left to finish there: see `queued.where_to`)."""
        seen, taken = await self.resettle()
        ordered, staying = await ordered_on(self.src, self.project), 0
        async for job_id, data in self.scan.jobs():  # (the project's alone: `shards.left`)
            where = "" if data is None else where_to(data, self.project, ordered)
            held = job_id in self.kept or job_id in self.unsettled  # (left to `resettle`)
            where = STAY if where and held else where
            moved = None
            if where in (MOVE, UNLESS_BEGUN) and data is not None:
                self.alive()
                moved = await self.move_job(job_id, data, unless_begun=where == UNLESS_BEGUN)
                seen += moved is not None
                taken += moved is True
            staying += where == STAY or (where == UNLESS_BEGUN and moved is None)
        return seen, taken, staying

    async def move_job(self, job_id: str, read: bytes, *, unless_begun: bool) -> bool | None:
        """Move one queued job as it was `read`: True when moved, False when a worker holds
        it or took it meanwhile, or it changed since (looked at again on the next pass),
        None when it stays (`unless_begun`: it began here; or another event holds its id on
        the new shard: `stay`)."""
        taken = await self.take(job_id, read, unless_begun=unless_begun)
        return await self.carry(taken) if isinstance(taken, Taken) else taken

    async def take(
        self, job_id: str, read: bytes, *, unless_begun: bool = False
    ) -> Taken | Literal[False] | None:
        """Step 1 (see `move_job` for False and None)."""
        src, k = self.src, self.src.keys
        take = TakeJob.of(k, job_id, self.token, self.lease_s, read, unless_begun)
        got = await take.run(src.redis)
        if got == b"stays":
            return None
        if not got:
            return False
        data, due, ttl = got
        carried = await Carried.read(src.redis, k, data)  # a retry's kept body goes along
        async with src.redis.pipeline(transaction=False) as pipe:
            for key in (k.delivery(job_id), k.pushed(job_id)):
                pipe.get(key)
                pipe.pttl(key)
            progress, progress_ms, pushed, pushed_ms = await pipe.execute()
        return Taken(
            job_id,
            data,
            due,
            max(int(ttl), 1),
            carried,
            None if progress is None else (progress, int(progress_ms)),
            None if pushed is None else (pushed, int(pushed_ms)),
        )

    async def carry(self, taken: Taken) -> bool | None:
        """Steps 2 and 3: True when the job moved, False when a worker on the old shard took
        it since it was taken (its copy on the new shard removed), or Redis failed as it
        was placed (it is under the mover's lease on the old shard, where the next pass
        takes it again: `TakeJob`) or settled (the next pass settles it: `settle`); None:
        `stay`."""
        self.alive()  # a mover that lost its lease places nothing (another may move it)
        try:
            placed = await self.place(taken)
        except REDIS_ERRORS as exc:
            self.say(f"{self.project}: job {taken.job_id} not placed ({exc!r}): next pass")
            return False
        if placed is not None:
            return await self.settle(taken, placed)
        await self.stay(taken)
        return None

    async def stay(self, taken: Taken) -> None:
        """Another event has the id of the one taken on the new shard (emitted there after
        the flip, or this one here by the placement from before it): this one runs on the
        old shard (its lease lapses if Redis fails), left as an event whose fan-out began."""
        self.kept.add(taken.job_id)
        said = f"{self.project}: job {taken.job_id}: another event has its id on the new shard"
        self.say(f"{said}: it runs on the old one")
        with contextlib.suppress(*REDIS_ERRORS):
            await self._let_run(self.src, taken)

    async def settle(self, taken: Taken, placed: bool) -> bool:
        """Step 3: the job leaves the old shard and its copy is let run (True), or, a worker
        there having taken it, the copy is removed (False). Redis failing meanwhile, the
        job is kept `unsettled` (False) and settled on the next pass: the copy stays held
        meanwhile, as it may be the only one (these writes may be made again: `DropHeld`
        answers as it did, and `FreeHeld` frees the copy once)."""
        try:
            if moved := await self._leave(taken):
                if placed:
                    await self._let_run(self.dst, taken)
            elif placed:
                await self._fence()  # else another mover may have moved the job: copy stays
                if not await self._drop_copy(taken):
                    self.say(
                        f"{self.project}: job {taken.job_id}: its copy on the new shard is no "
                        "longer this mover's (its hold lapsed, or another mover took it "
                        "over): it may run on both shards"
                    )
        except REDIS_ERRORS as exc:
            self.unsettled[taken.job_id] = (taken, placed)
            self.say(f"{self.project}: job {taken.job_id} not settled ({exc!r}): next pass")
            return False
        self.unsettled.pop(taken.job_id, None)
        return moved

    async def resettle(self) -> tuple[int, int]:
        """The jobs Redis kept a pass before from settling, settled (`settle`): (how many,
        how many moved)."""
        moved, tried = 0, list(self.unsettled.values())
        for taken, placed in tried:
            self.alive()
            moved += await self.settle(taken, placed)
        return len(tried), moved

    async def _fence(self) -> None:
        if self.fence is None:
            self.alive()
        else:
            await self.fence()

    async def place(self, taken: Taken) -> bool | None:
        """Step 2: the held copy, confirmed by the replicas; False when that job id was
        queued there already and not held by a mover (kept as it is: `PlaceJob`), None when
        that job is another event (`OTHER_EVENT`). NotReplicated: its copy is removed, and
        the job given back on the old shard."""
        d, job_id = self.dst.keys, taken.job_id

        def queue(pipe: Pipeline) -> None:
            job_key = d.arq_job(job_id)
            body, shared = (taken.carried and taken.carried.placed(d)) or (job_key, b"")
            lease, hold_ms = d.ARQ_IN_PROGRESS_PREFIX + job_id, int(self.hold_s * 1000)
            PlaceJob(
                d.QUEUE, job_key, lease, body, job_id, taken.data, taken.due, taken.ttl_ms,
                self.token, hold_ms, shared,
            ).queue_on(pipe)  # fmt: skip
            for key, value, ms in taken.marks(d):
                pipe.set(key, value, px=ms, nx=True)

        try:
            answers = await run_replicated(self.dst.redis, queue, self.replication)
        except NotReplicated as exc:
            with contextlib.suppress(*REDIS_ERRORS):  # (else both lapse: at least once)
                await self._drop_copy(taken)
                await self._let_run(self.src, taken)
            what = f"shard {self.dst.shard.index}: {self.project}'s job {job_id}"
            raise _unconfirmed(exc, what, STOPPED_FLIPPED) from exc
        if answers[0] == TOOK_OVER:
            self.say(
                f"{self.project}: job {job_id}: its copy on the new shard, held by another "
                "mover (paused past its lease), is this mover's now"
            )
        return None if answers[0] == OTHER_EVENT else bool(answers[0])

    def _held(self, keys: Keys, taken: Taken, marks: list[tuple[str, bytes, int]]) -> DropHeld:
        job_id = taken.job_id
        return DropHeld(
            **job_keys(keys, job_id),
            marks=[key for key, _, _ in marks],
            token=self.token,
            job_id=job_id,
            left_ms=int(self.hold_s * 1000),
            values=[value for _, value, _ in marks],
        )

    async def _leave(self, taken: Taken) -> bool:
        """The job removed from the old shard (with its reference to a kept body) while the
        mover's lease there is its own; False when a worker took it since."""
        k = self.src.keys

        def queue(pipe: Pipeline) -> None:
            self._held(k, taken, []).queue_on(pipe)
            if taken.carried is not None:  # given back only once the job is gone
                taken.carried.release(pipe, k)

        return bool((await run_pipeline(self.src.redis, queue))[0])

    async def _drop_copy(self, taken: Taken) -> bool:
        """The copy removed from the new shard, with the marks written with it, while the
        mover holds it there; False when a worker there took it (its hold lapsed)."""
        d = self.dst.keys

        def queue(pipe: Pipeline) -> None:
            self._held(d, taken, taken.marks(d)).queue_on(pipe)
            if taken.carried is not None:
                taken.carried.release(pipe, d)

        return bool((await run_pipeline(self.dst.redis, queue))[0])

    async def _let_run(self, services: Services, taken: Taken) -> None:
        """The mover gives up its hold of the job on `services`' shard: due as it was."""
        k = services.keys
        lease = k.ARQ_IN_PROGRESS_PREFIX + taken.job_id
        await FreeHeld(k.QUEUE, lease, self.token, taken.job_id, taken.due).run(services.redis)
