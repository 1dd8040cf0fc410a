"""A move's drain (`dispatcher.shards.drain`) on two real shards: a mover paused past its
lease on a job leaves that job to the worker that took it, on one shard only; a drain
waits for the events a producer may still queue on the old shard after the flip; and an
event whose id another event holds on the new shard stays on the old one."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
import redis as sync_redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import Unavailable
from dispatcher.events import event_job
from dispatcher.jobs import EventJob, encode
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards.drain import Drain, Taken
from dispatcher.shards.move import SETTLE_REFRESHES, Mover
from dispatcher.shards.queued import MOVER, OTHER_EVENT, PlaceJob
from dispatcher.shards.router import Router
from dispatcher.worker import create_worker
from dispatcher.worker.claims import Claims
from tests.helpers import Receiver, make_settings, until

JOB_ID = "mv:e.1@5"
PAUSED_LEASE_S = 0.2  # the mover's lease on a job it takes, lapsed in its pause
HOLD_S = 30.0  # its hold of the copy on the new shard, not


def two_empty_shards(shard_servers: list[EmbeddedRedis], **overrides: object) -> Settings:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return make_settings(urls[0], redis_shards=urls, placement_refresh=0.05, **overrides)


class Paused(Drain):
    """A drain whose mover is paused past its lease on the job it took, `at` a step of its
    move, while a worker of the old shard claims the job (and, `ended`, runs and ends it)."""

    at: Literal["take", "place"] = "take"
    ended = False

    async def take(
        self, job_id: str, read: bytes, *, unless_begun: bool = False
    ) -> Taken | Literal[False] | None:
        taken = await super().take(job_id, read, unless_begun=unless_begun)
        if self.at == "take":
            await self.pause()
        return taken

    async def place(self, taken: Taken) -> bool | None:
        placed = await super().place(taken)
        if self.at == "place":
            await self.pause()
        return placed

    async def pause(self) -> None:
        src, lease = self.src, self.src.keys.ARQ_IN_PROGRESS_PREFIX + JOB_ID

        async def lapsed() -> bool:
            return not await src.redis.exists(lease)

        await until(lapsed, 10, "the mover's lease on the job to lapse")
        worker = Claims(src.redis, src.keys, "worker", lease_s=30)
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]
        if self.ended:
            await run_pipeline(src.redis, lambda pipe: worker.finish(pipe, JOB_ID))


async def _where(services: Services) -> tuple[bool, bytes | None]:
    """Whether the job is queued on the shard, and who holds its lease there."""
    k = services.keys
    queued = await services.redis.zscore(k.QUEUE, JOB_ID) is not None
    return queued, await services.redis.get(k.ARQ_IN_PROGRESS_PREFIX + JOB_ID)


@pytest.mark.parametrize("at", ["take", "place"])
@pytest.mark.parametrize("ended", [False, True], ids=["worker holds it", "worker ended it"])
async def test_a_mover_paused_past_its_lease_leaves_the_job_to_the_worker_that_took_it(
    shard_servers: list[EmbeddedRedis], at: Literal["take", "place"], ended: bool
) -> None:
    """The mover takes a job on the old shard, then is paused past its lease on it: right
    after its take, or after it queued its copy on the new shard. A worker of the old
    shard claims the job meanwhile (and runs and ends it, or still holds it). The mover,
    resumed, finds its lease gone as it removes the job from the old shard: it leaves
    the job to that worker and removes its copy from the new shard, which no worker there
    could take (held by the mover). The job runs on one shard only. Before, the mover
    queued the copy and ignored its removal's answer (0 while the worker holds the job, 1
    once the job ended there): the job ran on both shards."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: now_ms()})
        await src.redis.set(src.keys.delivery(JOB_ID), "1", ex=1_000)
        drain = Paused(src, dst, "mv", "mover", lambda: None, lease_s=PAUSED_LEASE_S, hold_s=HOLD_S)
        drain.at, drain.ended = at, ended
        assert await drain.move_job(JOB_ID, b"{}", unless_begun=False) is False
        assert await _where(dst) == (False, None)  # no copy on the new shard
        assert not await dst.redis.exists(dst.keys.arq_job(JOB_ID), dst.keys.delivery(JOB_ID))
        assert await _where(src) == ((False, None) if ended else (True, b"worker"))


async def _lapsed(services: Services) -> None:
    """Until the lease on the job lapsed on the shard of `services`."""
    lease = services.keys.ARQ_IN_PROGRESS_PREFIX + JOB_ID

    async def gone() -> bool:
        return not await services.redis.exists(lease)

    await until(gone, 10, "the lease on the job to lapse")


async def _lease_lost() -> None:
    raise Unavailable("mv: this mover stopped: another mover took the lease")


class Overtaken(Drain):
    """Mover A, paused once it queued its copy on the new shard, past its lease on the job
    on the old shard; meanwhile mover `next` (the project's lease lapsed, it took the move
    over) moves that job."""

    next: Drain

    async def place(self, taken: Taken) -> bool | None:
        placed = await super().place(taken)
        await _lapsed(self.src)
        assert await self.next.move_job(JOB_ID, b"{}", unless_begun=False) is True
        return placed


@pytest.mark.parametrize("fenced", [False, True], ids=["its lease seems kept", "lease lost"])
async def test_a_mover_that_took_a_move_over_takes_over_the_copy_a_paused_one_holds(
    shard_servers: list[EmbeddedRedis], fenced: bool
) -> None:
    """Mover A takes a job on the old shard and queues its copy on the new one, held, then
    is paused past its lease on the job. Mover B, which took the move over, takes the job
    on the old shard, finds A's copy held on the new one and takes that hold over, then
    removes the job from the old shard and lets the copy run. A, resumed, finds the job
    gone from the old shard: it stops before it removes its copy (its lease lost), or,
    its lease seemingly kept, finds the copy no longer its own. The job is queued on the
    new shard, free to run: on one shard, never on neither. Before, B's placement kept
    A's copy as it was (A's), and A removed it: the job was on neither shard."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: now_ms()})
        said: list[str] = []
        a = Overtaken(src, dst, "mv", MOVER + "a", lambda: None, said.append, lease_s=0.2)
        a.hold_s, a.fence = HOLD_S, _lease_lost if fenced else None
        a.next = Drain(src, dst, "mv", MOVER + "b", lambda: None, said.append)
        if fenced:
            with pytest.raises(Unavailable, match="another mover took the lease"):
                await a.move_job(JOB_ID, b"{}", unless_begun=False)
        else:
            assert await a.move_job(JOB_ID, b"{}", unless_begun=False) is False
        assert await _where(src) == (False, None)
        assert await _where(dst) == (True, None)  # let run by B
        assert await dst.redis.get(dst.keys.arq_job(JOB_ID)) == b"{}"
        worker = Claims(dst.redis, dst.keys, "worker", lease_s=30)
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]
        assert said[0] == (
            f"mv: job {JOB_ID}: its copy on the new shard, held by another mover (paused past "
            "its lease), is this mover's now"
        )


class Resumes(Drain):
    """Mover A, paused once it took the job, past its lease on it; meanwhile mover `next`
    takes the job and queues its copy, then is paused itself (until `go`), and A resumes."""

    next: Drain
    go: asyncio.Event
    next_moved: asyncio.Task[bool | None]

    async def take(
        self, job_id: str, read: bytes, *, unless_begun: bool = False
    ) -> Taken | Literal[False] | None:
        taken = await super().take(job_id, read, unless_begun=unless_begun)
        await _lapsed(self.src)
        placed = asyncio.Event()
        go = self.go

        class PausedOncePlaced(Drain):
            async def place(self, taken: Taken) -> bool | None:
                answer = await super().place(taken)
                placed.set()
                await go.wait()
                return answer

        b = self.next
        paused = PausedOncePlaced(b.src, b.dst, b.project, b.token, b.alive, b.say)
        self.next_moved = asyncio.create_task(paused.move_job(job_id, read, unless_begun=False))
        await placed.wait()
        return taken


async def test_a_paused_mover_stops_before_it_removes_a_copy_another_mover_moved(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The other way round: mover A is paused past its lease on a job it took, mover B
    takes the job and queues its copy on the new shard, and is paused in turn before it
    removes the job from the old shard; A resumes and queues its copy over B's (a hold of
    another mover's: this one's now), then finds the job no longer its own on the old
    shard. Its lease lost, it stops before it removes the copy, which B's move needs: B
    removes the job from the old shard, and the copy, held by A, runs once A's hold
    lapses (here: ended at once). On one shard, never on neither (without the check of
    A's lease, A removed the copy: the job was on neither)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: now_ms()})
        a = Resumes(src, dst, "mv", MOVER + "a", lambda: None, lease_s=0.2, hold_s=HOLD_S)
        a.fence, a.go = _lease_lost, asyncio.Event()
        a.next = Drain(src, dst, "mv", MOVER + "b", lambda: None, lambda _: None)
        with pytest.raises(Unavailable, match="another mover took the lease"):
            await a.move_job(JOB_ID, b"{}", unless_begun=False)
        assert await _where(dst) == (True, (MOVER + "a").encode())
        a.go.set()
        assert await a.next_moved is True
        assert await _where(src) == (False, None)
        await dst.redis.delete(dst.keys.ARQ_IN_PROGRESS_PREFIX + JOB_ID)  # A's hold lapses:
        await dst.redis.zadd(dst.keys.QUEUE, {JOB_ID: now_ms()}, xx=True)  # its lease, its end
        worker = Claims(dst.redis, dst.keys, "worker", lease_s=30)
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]


async def test_a_moved_job_is_held_on_the_new_shard_until_it_left_the_old_one(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The copy the mover queues on the new shard is not due (its workers cannot claim it)
    until the job has left the old shard: then it is due when the job was."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        due = now_ms() - 1_000
        await src.redis.set(src.keys.arq_job(JOB_ID), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {JOB_ID: due})
        seen: list[tuple[float | None, bytes | None]] = []

        class Watched(Drain):
            async def place(self, taken: Taken) -> bool | None:
                placed = await super().place(taken)
                k = self.dst.keys
                held = await self.dst.redis.zscore(k.QUEUE, JOB_ID)
                seen.append((held, await self.dst.redis.get(k.ARQ_IN_PROGRESS_PREFIX + JOB_ID)))
                return placed

        drain = Watched(src, dst, "mv", "mover", lambda: None)
        assert await drain.move_job(JOB_ID, b"{}", unless_begun=False) is True
        ((held, holder),) = seen
        assert held is not None and held > now_ms() and holder == b"mover"
        worker = Claims(dst.redis, dst.keys, "worker", lease_s=30)
        assert await dst.redis.zscore(dst.keys.QUEUE, JOB_ID) == due
        assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]
        assert await _where(src) == (False, None)


def test_a_drain_waits_as_long_as_a_producer_may_retry_on_the_old_shard() -> None:
    """How long after its flip a move waits before it cleans the old shard: a producer
    routes by the placement it last read (every `DISPATCHER_PLACEMENT_REFRESH`) and tries
    that shard again for up to `DISPATCHER_EMIT_WAIT`, its last write answered within
    `DISPATCHER_REDIS_TIMEOUT`. With a long emit wait that is far past the two settles a
    drain took before (three refreshes each)."""
    from dispatcher.shards.drain import late_pushes_s

    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", placement_refresh=0.5, emit_wait=7, redis_timeout=3
    )
    assert late_pushes_s(settings) == 0.5 + 7 + 3
    assert late_pushes_s(settings) > 2 * SETTLE_REFRESHES * settings.placement_refresh


async def test_a_mover_told_to_wait_for_no_late_push_waits_for_none(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """`late_s=0` switches the wait for late pushes off (a fleet whose producers never
    retry on a shard); left out, it is what the settings say. Before, 0 was taken for
    "left out" and the mover waited the settings' bound all the same."""
    from dispatcher.shards.drain import late_pushes_s

    settings = two_empty_shards(shard_servers, emit_wait=7)
    async with Router.open(settings) as router:
        assert Mover(router, lambda _: None, late_s=0).late_s == 0
        assert Mover(router, lambda _: None).late_s == late_pushes_s(settings) > 7


class LatePush(Mover):
    """A mover during whose drain, well past the settles it took before, a producer that
    routes by the placement from before the flip emits `event` (`late_by` s after it)."""

    late_by = 0.0
    producer: Producer | None = None
    emitted: list[str]

    async def _finish(self, *args: object, **kwargs: object) -> None:
        async def late() -> None:
            await asyncio.sleep(self.late_by)
            assert self.producer is not None
            self.emitted += await self.producer.emit_many([("mv", "BUILD_END", {"late": True})])

        emitting = asyncio.create_task(late())
        await super()._finish(*args, **kwargs)  # type: ignore[arg-type]
        await emitting


async def test_a_drain_waits_for_the_pushes_a_producer_may_still_make(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A producer queues an event of the moving project on the old shard after the flip,
    later than the drain's quiet settle (its retries there, by the placement it read
    before: here, one it never read again). The drain waits `late_s` past the flip before
    it ends, so the event is moved and delivered on the new shard. Before, the drain ended
    a settle after it found none, the old shard was cleaned, and the late event found no
    callback there: no delivery, no record."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        registration = Registration("mv", receiver.url("/hook"), Region.DEVNET, "t")
        await router.shards[0].register(registration, "BUILD_END")
        stale = settings.model_copy(update={"placement_refresh": 60})
        async with Producer(stale) as producer:  # routes "mv" to shard 0 throughout
            mover = LatePush(router, lambda _: None, settle_s=0.1, late_s=3.0)
            mover.producer, mover.late_by, mover.emitted = producer, 1.0, []
            await mover.move("mv", 1)
        old, new = router.shards
        assert await old.redis.zcard(old.keys.QUEUE) == 0
        worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
        assert len(mover.emitted) == 1
        (delivered,) = receiver.requests("/hook")
        assert b'"late":true' in delivered.body
        assert (await new.callbacks("mv")).count == 1


async def _queued(services: Services, job: EventJob) -> None:
    """`job` emitted on the shard of `services` (as a producer routing it there does)."""
    (answer,) = await run_pipeline(services.redis, lambda pipe: services.queue.push(pipe, job))
    assert answer == 1


@pytest.mark.parametrize("stale", [False, True], ids=["new shard's after flip", "stale producer"])
async def test_an_event_whose_id_another_event_holds_on_the_new_shard_stays_on_the_old_one(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, stale: bool
) -> None:
    """Event A (`BUILD_START` under `build-42`) is queued on the project's old shard; after
    the flip a producer emits another event, B (`BUILD_END`), under the same id, queued on
    the new shard: it has no A there to compare with. Or the other way round: A moved,
    and B is queued on the old shard by a producer that still routes by the placement
    from before the flip (`stale`). The mover finds the id queued on the new shard, and
    the head of that job (its digest: `jobs.DIGEST_LEAD`) another event's: the job it took
    is let run on the old shard, as an event whose fan-out began there is, and a pass
    after it leaves it there. Both events are delivered. Before, the mover's placement
    kept the new shard's job and answered as if the job were there already, the mover
    removed its event from the old shard anyway, and the move counted it moved: an
    acknowledged event gone, with no record, log or metric (review)."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        src, dst = router.shards
        for shard in (src, dst):  # the callbacks, on the new shard as a move copies them
            for name in ("BUILD_START", "BUILD_END"):
                await shard.register(
                    Registration("mv", receiver.url("/hook"), Region.DEVNET, "t"), name
                )
        a = event_job("mv", "BUILD_START", {"build": 42}, "build-42")
        b = event_job("mv", "BUILD_END", {"build": 42, "ok": True}, "build-42")
        old, new = (b, a) if stale else (a, b)
        await _queued(src, old)
        await _queued(dst, new)
        said: list[str] = []
        drain = Drain(src, dst, "mv", MOVER + "a", lambda: None, said.append)
        read = await src.redis.get(src.keys.arq_job(old.job_id))
        assert read is not None
        assert await drain.move_job(old.job_id, read, unless_begun=True) is None
        assert await drain.one_pass() == (0, 0, 1)  # left there, waited for
        assert await src.redis.get(src.keys.arq_job(old.job_id)) == read
        assert await _where_job(src, old.job_id) == (True, None)  # free to run there
        assert said == [
            f"mv: job {old.job_id}: another event has its id on the new shard: it runs on the "
            "old one"
        ]
        worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
        try:
            await asyncio.wait_for(worker.main(), 30)
        finally:
            await worker.close()
    bodies = sorted(seen.body for seen in receiver.requests("/hook"))
    assert len(bodies) == 2, bodies
    assert b'"BUILD_END"' in bodies[0] + bodies[1] and b'"BUILD_START"' in bodies[0] + bodies[1]


async def _where_job(services: Services, job_id: str) -> tuple[bool, bytes | None]:
    k = services.keys
    queued = await services.redis.zscore(k.QUEUE, job_id) is not None
    return queued, await services.redis.get(k.ARQ_IN_PROGRESS_PREFIX + job_id)


async def test_the_same_event_on_both_shards_or_one_without_a_digest_moves_as_before(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The same event under its id on both shards (name and data: a producer's retry after
    the flip), or a job without a digest on either (queued by the version before; an event
    given a fresh id has none either): the new shard's job is kept, the old one's leaves,
    moved, as before."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        same = event_job("mv", "BUILD_START", {"build": 1}, "build-1")
        digested = event_job("mv", "BUILD_START", {"build": 2}, "build-2")
        undigested = EventJob(id="build-2", project_id="mv", event="BUILD_END", emitted_at=1)
        for old, new in ((same, same), (digested, undigested), (undigested, digested)):
            await _queued(src, old)
            await _queued(dst, new)
            read = await src.redis.get(src.keys.arq_job(old.job_id))
            assert read is not None
            drain = Drain(src, dst, "mv", MOVER + "a", lambda: None)
            assert await drain.move_job(old.job_id, read, unless_begun=True) is True
            assert await _where_job(src, old.job_id) == (False, None)
            assert await _where_job(dst, new.job_id) == (True, None)
            await dst.redis.delete(dst.keys.arq_job(new.job_id))
            await dst.redis.zrem(dst.keys.QUEUE, new.job_id)


@pytest.mark.parametrize("holder", ["this mover", "another mover"])
async def test_a_held_copy_of_another_event_is_never_written_over(
    shard_servers: list[EmbeddedRedis], holder: str
) -> None:
    """A copy on the new shard held by a mover (this one's, not settled: Redis failed as it
    was let run; or another's, paused) and another event under its id placed there (queued
    on the old shard by a stale producer once the first had left it): `PlaceJob` answers
    `OTHER_EVENT`, the held copy kept. It wrote the other event over it, the first lost
    (review); the same event again is written as before (a placement sent again)."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        dst = router.shards[1]
        d = dst.keys
        a = event_job("mv", "BUILD_START", {"build": 42}, "build-42")
        b = event_job("mv", "BUILD_END", {"build": 42, "ok": True}, "build-42")

        def place(job: EventJob, token: str) -> PlaceJob:
            key = d.arq_job(job.job_id)
            return PlaceJob(d.QUEUE, key, d.ARQ_IN_PROGRESS_PREFIX + job.job_id, key,
                            job.job_id, encode(job, 1), b"0", 60_000, token, 30_000)  # fmt: skip

        assert await place(a, MOVER + "a").run(dst.redis) == 1
        placing = MOVER + ("a" if holder == "this mover" else "b")
        assert await place(b, placing).run(dst.redis) == OTHER_EVENT
        assert await dst.redis.get(d.arq_job(a.job_id)) == encode(a, 1)
        assert await place(a, placing).run(dst.redis) == (1 if holder == "this mover" else 2)


class _Flaky(Drain):
    """A drain whose Redis fails as it lets the new shard's copy run (`let_run` times)
    and as it places a copy (`place_fails` times)."""

    let_run = 0
    place_fails = 0

    async def _let_run(self, services: Services, taken: Taken) -> None:
        if services is self.dst and self.let_run:
            self.let_run -= 1
            raise sync_redis.ConnectionError("injected: the new shard away as the copy is freed")
        await super()._let_run(services, taken)

    async def place(self, taken: Taken) -> bool | None:
        if self.place_fails:
            self.place_fails -= 1
            raise sync_redis.ConnectionError("injected: the new shard away as a copy is placed")
        return await super().place(taken)


@pytest.mark.parametrize("b_placed", [True, False], ids=["B placed", "B's placement fails"])
async def test_another_event_under_an_unsettled_jobs_id_waits_for_it_to_settle(
    shard_servers: list[EmbeddedRedis], b_placed: bool
) -> None:
    """A left the old shard, but letting its copy run on the new one failed (unsettled,
    held there); a stale producer then queues B under A's id on the old shard. The drain
    took B: its take cleared A's removal mark, and A's resettling, finding neither its
    lease nor its mark, removed A's copy (A on neither shard); or, B's placement failing,
    A's resettling removed B, under the mover's lease, as if it were A (review). An id
    of a job not settled is left until it is: A settles on the new shard, B is on the old
    one, each once."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        src, dst = router.shards
        a = event_job("mv", "BUILD_START", {"build": 42}, "build-42")
        b = event_job("mv", "BUILD_END", {"build": 42, "ok": True}, "build-42")
        await _queued(src, a)
        drain = _Flaky(src, dst, "mv", MOVER + "a", lambda: None, lambda _: None)
        drain.let_run = 2  # the settle of pass 1, the resettle of pass 2
        await drain.one_pass()
        await _queued(src, b)  # a stale producer
        drain.place_fails = 0 if b_placed else 1
        for _ in range(3):
            await drain.one_pass()
        held_a = await dst.redis.get(dst.keys.arq_job(a.job_id))
        held_b = await src.redis.get(src.keys.arq_job(b.job_id))
    assert held_a is not None and b'"BUILD_START"' in held_a
    assert held_b is not None and b'"BUILD_END"' in held_b
