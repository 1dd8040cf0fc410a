"""What a worker runs on each shard it serves: the shard's services, its own group commit
(a write goes to the shard of its job), its claims, and a delivery engine sharing the
process's HTTP clients, circuit breaker and statistics with the other shards'."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import RedisError

from dispatcher import bodies, metrics
from dispatcher.connections import REDIS_ERRORS, redis_full
from dispatcher.errors import InvalidSetting
from dispatcher.jobs import DELIVER, FAN_OUT, DeliveryJob, EventJob, decode, retry_project
from dispatcher.worker.claim_script import DATA_GONE
from dispatcher.worker.claims import Claims
from dispatcher.worker.engine import Engine
from dispatcher.worker.fence import Fence
from dispatcher.worker.record import keep_drop, keep_entry
from dispatcher.worker.shares import project_of
from dispatcher.worker.steps import ChunkEnd, NextStep
from dispatcher.worker.writer import Then, Writer

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio.client import Pipeline

    from dispatcher.jobs import EventJob
    from dispatcher.keys import Keys
    from dispatcher.services import Services
    from dispatcher.worker.claims import Claimed

__all__ = ["CLAIM_ERRORS", "PUT_BACK_WAIT_S", "Served", "given_shards"]

log = structlog.get_logger("dispatcher.worker")

BACKOFF_CAP_S = 2.0
SAID_AGAIN_S = 60.0  # a shard whose claims go on failing says so again this often
# Once every project busy in the worker has taken its room, a claim can only take the
# jobs of a project not busy yet, or of a busy one with room found with nothing due (quiet):
# it looks for them no further than a page into the queue (or than where the last room was
# filled) and in what came due from a second before its last claim on (its newest page; all
# of it while a quiet project has room), and as far as the whole claim budget, and a sweep
# step past it, at most this often (paging through thousands of entries it may not take
# was, per delivery, more Redis work than the delivery itself).
WIDE_SCAN_S = 0.25
NARROW_BUDGET, WIDE_BUDGET = 100, 2000
PUT_BACK_WAIT_S = 1.0  # a write answers in milliseconds: a failed run's slot is then freed
# waited out while claiming: an outage, and any reply error (READONLY after a failover)
CLAIM_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, RedisError)


@dataclass(eq=False)
class Served:
    """One shard as a worker serves it. `ready_at` (monotonic) and `backoff` pace the
    claims of a shard that does not answer, so the other shards go on."""

    services: Services
    writer: Writer
    claims: Claims
    engine: Engine
    ready_at: float = 0.0
    backoff: float = field(default=0.0)
    wide_at: float = 0.0  # monotonic time of the last short claim that looked at the budget
    quiet: frozenset[str] = frozenset()  # busy projects with room found with nothing due
    failing_since: float | None = None  # monotonic: its claims' first failure in a row
    said: tuple[float, bool] | None = None  # when a failure was last logged, and if full

    @classmethod
    def build(cls, services: Services, token: str, *, shared: Engine | None = None) -> Served:
        """A shard's machinery; `shared`: an engine of another shard to share HTTP with."""
        writer = Writer(services.redis, services.history.assign_ids)
        claims = Claims(services.redis, services.keys, token, services.settings.lease_seconds)
        engine = Engine(services, writer, shared=shared)
        engine.fence = Fence(claims, services.settings.lease_seconds)
        return cls(services, writer, claims, engine)

    @property
    def index(self) -> int:
        return self.services.shard.index

    @property
    def keys(self) -> Keys:
        return self.services.keys

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def failed(self, poll_delay: float) -> float:
        """A claim failed: the shard waits a growing pause; returns it."""
        self.backoff = min(BACKOFF_CAP_S, max(poll_delay, self.backoff * 2))
        self.ready_at = time.monotonic() + self.backoff
        return self.backoff

    def answered(self) -> None:
        self.backoff, self.ready_at = 0.0, 0.0

    async def renew(self) -> None:
        """Extend this worker's leases on this shard. Each shard's renewals run on their
        own (`every`, a task per shard): one whose Redis does not answer (redis-py waits
        ~4 socket timeouts) lets no lease on another lapse meanwhile."""
        try:
            await self.engine.fence.renew()
        except REDIS_ERRORS as exc:  # this shard is away: the others' leases go on
            log.debug("worker.renew_failed", shard=self.index, error=str(exc))

    async def claim(self, share: int, mine: list[str], poll_delay: float) -> list[Claimed] | None:
        """Up to `share` due jobs of this shard, within the projects' fair shares, passing
        over `mine` (the ids this worker runs here). None when its Redis did not answer:
        the shard then waits out a growing pause (`failed`) while the others go on."""
        shares = self.engine.shares.claim_budgets()
        now = time.monotonic()
        scout, quiet = self.reach(shares[1], now)
        try:
            claimed = await self.claims.claim(
                share, budget=WIDE_BUDGET, scout=scout, sweep=scout == WIDE_BUDGET,
                quiet=quiet, shares=shares, mine=mine,
            )  # fmt: skip
        except CLAIM_ERRORS as exc:
            if full := redis_full(exc):
                metrics.REDIS_FULL.labels(refused="claim").inc()
            self._claim_failed(str(exc), full, self.failed(poll_delay))
            return None
        self.answered()
        since = self.failing_since
        if since is not None and self.said is not None and self.said[0] >= since:  # said
            log.info("worker.claim_resumed", shard=self.index,
                     after_s=round(time.monotonic() - since, 1))  # fmt: skip
        self.failing_since = None
        self.scanned(shares[1], scout, share, claimed, now)
        return claimed

    def _claim_failed(self, error: str, full: bool, retry: float) -> None:
        """A failed claim, logged as its shard's outage begins, every `SAID_AGAIN_S` while it
        lasts, and when Redis starts saying it is full; then, if any was logged,
        `worker.claim_resumed`.
        Each was a line, a shard's every 2 s at most (a cluster's 8 shards down: 240 a
        minute). A shard whose claims fail now and then says so once a `SAID_AGAIN_S` at most
        (each failure and each end was a line: review), so an outage that begins within
        that of the last line said is first said when it is up (its `failing_for_s` says
        since when)."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        newly_full = full and (self.said is None or not self.said[1])  # not full, then full
        if self.said is None or now - self.said[0] >= SAID_AGAIN_S or newly_full:
            self.said = (now, full)
            log.warning("worker.claim_failed", error=error, redis_full=full,
                        retry_in_s=round(retry, 2), shard=self.index,
                        failing_for_s=round(now - self.failing_since, 1))  # fmt: skip

    def reach(self, busy: dict[str, int], now: float) -> tuple[int, frozenset[str]]:
        """The next claim's reach: how far it looks for a project not busy here yet once
        the busy ones (`Shares.claim_budgets`) have taken their room, and which busy ones
        with room it looks for only in what came due (`quiet`, `Claim`). A wide look (the
        whole budget, a sweep step past it, no one quiet) while nothing is busy and once
        per `WIDE_SCAN_S`; a page the rest of the time."""
        if not busy or now - self.wide_at >= WIDE_SCAN_S:
            return WIDE_BUDGET, frozenset()
        return NARROW_BUDGET, self.quiet.intersection(busy)

    def scanned(
        self, busy: dict[str, int], scout: int, asked: int, claimed: list[Claimed], now: float
    ) -> None:
        """After a claim: one that came back short looked for every busy project with
        room through the due range (as far as the budget) or in what just came due, so
        one that took nothing has nothing due there (quiet: looked for only in what comes
        due, until it takes a job or the next wide look); a wide one found every project
        new here."""
        took = {project_of(job.job_id) for job in claimed}
        if len(claimed) < asked:
            if scout == WIDE_BUDGET:
                self.wide_at = now
            self.quiet = frozenset(p for p, more in busy.items() if more > 0 and p not in took)
        else:
            self.quiet = self.quiet.difference(took)

    # ---- a job's ends on this shard ------------------------------------------------------

    def put_back(self, job_id: str, delay: float) -> asyncio.Future[list[Any]]:
        """The job's run failed or was stopped: due again in `delay` seconds (unless its
        own writes already ended it or set it later). Done once Redis has it."""
        claims = self.claims
        return self.writer.submit(
            lambda pipe: claims.again(pipe, job_id, delay, next_attempt=False)
        )

    async def failed_run(
        self, job_id: str, claims: int, error: str, free: Callable[[], None] | None = None
    ) -> None:
        """A run that failed (a timeout, Redis, a bug): its job is put back, to do the
        same work again later. Held (its lease renewed, passed over by this worker's
        claims) until Redis has taken the put-back, and so every write the run queued
        before it: another worker claiming the job before its writes landed (Redis away or
        full) would send its deliveries again. `free` (several shards served) is called
        when the put-back has not landed within `PUT_BACK_WAIT_S`: the job, which only
        waits now, gives its slot to the other shards' jobs (its shard not answering, its
        slot would hold them up for as long)."""
        delay = retry_in(claims)
        log.warning(
            "job.failed",
            job_id=job_id,
            error=error,
            claims=claims,
            retry_in_s=delay,
            shard=self.index,
        )
        with contextlib.suppress(Exception):  # refused for good: logged by the writer
            back = self.put_back(job_id, delay)
            if free is not None:
                landed, _ = await asyncio.wait({back}, timeout=PUT_BACK_WAIT_S)
                if not landed:
                    free()
            await back

    async def deliver(self, claimed: Claimed, job: DeliveryJob) -> None:
        """A `deliver` job's run, with the body it refers to when it holds none of its own
        (`dispatcher.bodies`, read by `Engine.deliver` once its lane's turn has come; gone,
        the job is dropped on record). After the run, however it ended (a timeout, a
        cancel), the release follows its writes: it gives the body back if the job has
        ended, else keeps it as long as the job may live now; a run that put its job back
        did that in the same write, and sends none after."""
        wait_ms = self.engine.body_wait_ms
        kept: list[bool] = []  # whether a write put the job back with its body kept

        def keep(pipe: Pipeline) -> None:
            """A job put off (for days, in a long line) keeps its body as long, in the
            same write: that is its release, not made again after the run."""
            bodies.release(pipe, self.keys, job, wait_ms)
            kept.append(True)

        shared = job.body_of is not None
        try:
            await self.engine.deliver(
                job, NextStep(self.claims, claimed.job_id, keep if shared else None)
            )
        finally:
            if shared and not kept:
                self.release(job, wait_ms)

    def release(self, job: DeliveryJob, keep_ms: int) -> None:
        """The release of `job`'s kept body after its run (see `bodies.release`): not
        waited for, the writer logs a refusal."""
        self.writer.submit(lambda pipe: bodies.release(pipe, self.keys, job, keep_ms))

    def next_step(self, job_id: str) -> Then:
        """After a `deliver` job's attempt: back in the queue for the next one, or done."""
        return NextStep(self.claims, job_id)

    def chunk_end(self, claimed: Claimed, event: EventJob) -> ChunkEnd:
        """A fan-out job's end after the chunk it runs, or its move to the next chunk."""
        return ChunkEnd(self.claims, claimed, event)

    async def poison(self, claimed: Claimed, problem: str) -> None:
        """A job that cannot be read: recorded for operators, then removed, never retried."""
        raw = (claimed.data or b"")[:500].decode("utf-8", errors="replace")

        def write(pipe: Pipeline) -> None:
            keep_entry(
                pipe,
                self.keys.POISON_JOBS,
                {"jobId": claimed.job_id, "problem": problem, "raw": raw},
            )
            self.claims.finish(pipe, claimed.job_id)

        await self.writer.commit(write)
        metrics.POISON_JOBS.inc()
        log.error("job.poison", job_id=claimed.job_id, problem=problem, shard=self.index)

    async def drop(self, claimed: Claimed, reason: str, *, finish: bool = True) -> None:
        """End a job without running it, on record (an ordered delivery's drop releases its
        lane, a retry's its reference to a kept body, in the same write), in its project's
        list of drops (`_held`)."""
        delivery, _ = _held(claimed)
        if finish and delivery is not None and delivery.lane is not None:
            then = self.engine.lanes.releasing(delivery, self.next_step(claimed.job_id))
            await self.engine.drop(delivery, reason, then, "job")
            return
        done = self._drop(claimed, reason, finish=finish)
        if done is not None:
            await asyncio.shield(done)

    def _drop(self, claimed: Claimed, reason: str, *, finish: bool) -> asyncio.Future[Any] | None:
        """`drop`'s write, but a lane's release: queued (the future done once Redis has it;
        None: no write, the drop of a job whose data was gone being on record by its claim,
        `claim_script.Claim`)."""
        metrics.DROPPED.labels(reason="job").inc()
        log.error("job.dropped", job_id=claimed.job_id, reason=reason, shard=self.index)
        if claimed.data is None and claimed.claims:
            return None
        delivery, project = _held(claimed)

        def write(pipe: Pipeline) -> None:
            keep_drop(pipe, self.keys, project, {"jobId": claimed.job_id, "reason": reason})
            if finish:
                self.claims.finish(pipe, claimed.job_id)
                if delivery is not None:
                    bodies.release(pipe, self.keys, delivery)
            pipe.delete(self.keys.pushed(claimed.job_id))  # a redelivery's id: free again

        return self.writer.submit(write)

    def give_back(self, claimed: list[Claimed]) -> None:
        """Jobs claimed and not started, the worker stopping: each due again at once, the
        claim that took it not counted against it (`unending`: it ran nothing). One whose
        data was gone (the claim took it out of the queue) is dropped as its run would
        have: a put-back found nothing to put back, and nothing said so."""
        for job in claimed:
            if job.data is None:
                self._drop(job, DATA_GONE, finish=False)
            else:
                self.writer.submit(functools.partial(self.claims.unclaim, job_id=job.job_id))


def retry_in(claims: int) -> float:
    """Backoff before a failed run's job is due again."""
    return min(60.0, 0.5 * 2.0 ** min(claims, 7))


def _held(claimed: Claimed) -> tuple[DeliveryJob | None, str | None]:
    """The delivery a job holds, if it holds one (its body unread), and the project whose
    list of drops its drop goes to: its delivery's event's (`DeliveryJob.event_project`),
    a fan-out's event's, or, the job unread, the one a retry's id of today names
    (`jobs.retry_project`); None: no project for sure (every project's list alone)."""
    try:
        wire = decode(claimed.data or b"")
        if wire.function == DELIVER:
            job = DeliveryJob.from_wire(wire.payload, claimed.job_id)
            return job, job.event_project
        if wire.function == FAN_OUT:
            return None, EventJob.from_wire(wire.payload).project_id
    except (TypeError, ValueError):  # BadJob, or an event's field of the wrong type
        pass
    return None, retry_project(claimed.job_id)


def given_shards(shards: list[Services], wanted: list[int] | None) -> list[Services]:
    """The shards a worker serves: those of DISPATCHER_WORKER_SHARDS, else every one."""
    if wanted is None:
        return shards
    unknown = [index for index in wanted if not 0 <= index < len(shards)]
    if unknown or not wanted:
        raise InvalidSetting(
            f"there are {len(shards)} shard(s), numbered from 0: {unknown or wanted} is not a "
            "list of them",
            param="DISPATCHER_WORKER_SHARDS",
        )
    return [shards[index] for index in dict.fromkeys(wanted)]
