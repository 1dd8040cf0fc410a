"""Growing from one Redis to two under load: `grow` pins the projects the new shard would
take, `rebalance` moves them while events keep coming and a worker keeps delivering;
every event ends in one SUCCESS record on its project's shard, the history from before the
move included, and nothing of a moved project stays on its old shard."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import redis as sync_redis

from dispatcher import bodies
from dispatcher.auth import Role
from dispatcher.bodies import body_key
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidInput, Unavailable
from dispatcher.history.moving import copy_project, forget_project
from dispatcher.history.redis import RedisHistory
from dispatcher.jobs import DeliveryJob, EventJob
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.placement import Placed, rendezvous
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registration
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.shards.drain import Drain
from dispatcher.shards.holdings import holds
from dispatcher.shards.lanes import hold, hold_source, let_go
from dispatcher.shards.lease import MoveLease
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.shards.stale import forget_copy
from dispatcher.worker import create_worker
from tests.helpers import Receiver, answer, make_settings, until

PROJECTS = [f"grow-{n}" for n in range(8)]
# a drain's wait for late pushes after its flip: the tests' producers are not late (what a
# fleet's settings make of it: `test_a_drain_waits_for_the_pushes_a_producer_may_still_make`)
LATE_S = 0.3


async def _emit_until(settings: Settings, stop: asyncio.Event, emitted: list[str]) -> None:
    """Every project's event every 20 ms, through a producer of the longer list (which
    reads the placements as a process of the fleet would)."""
    async with Producer(settings) as producer:
        n = 0
        while not stop.is_set():
            emitted += await producer.emit_many([(p, "BUILD_END", {"n": n}) for p in PROJECTS])
            n += 1
            await asyncio.sleep(0.02)


async def _frozen(router: Router, project: str) -> bool:
    await router.placement.load()
    if not router.placement.moving(project):
        return False
    try:
        router.writing(project)
    except Unavailable:
        return True
    return False


async def _all_recorded(router: Router, emitted: list[str], receiver: Receiver) -> bool:
    await router.placement.load()
    now = now_ms()
    succeeded: set[str | None] = set()
    for project in PROJECTS:
        page_no, url = 1, receiver.url(f"/{project}")
        while True:
            page = await router.of(project).history.query(
                project, url, "BUILD_END", start_ms=now - 600_000, end_ms=now + 60_000,
                page=page_no, page_size=100,
            )  # fmt: skip
            succeeded |= {r.event_id for r in page.records if r.status.value == "SUCCESS"}
            if page_no >= page.total_pages:
                break
            page_no += 1
    return succeeded >= set(emitted)


async def _only_on_new_shard(router: Router, project: str) -> None:
    old, new = router.shards[0], router.shards[1]
    assert router.placement.shard_of(project) == 1
    assert (await new.callbacks(project)).count == 1
    assert (await old.callbacks(project)).count == 0
    assert await new.roles.list(project) == {"alice": Role.ADMIN}
    assert await old.roles.list(project) == {}
    assert await old.redis.exists(old.keys.history_dead(project)) == 0
    prefix = old.keys.HISTORY_INDEX_PREFIX + project + ":"
    indexes = [i.decode() async for i in old.redis.sscan_iter(old.keys.HISTORY_INDEXES)]
    assert [i for i in indexes if i.startswith(prefix)] == []


async def test_a_moved_jobs_progress_mark_keeps_its_expiry(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A queued retry moved to another shard takes its progress mark with the time it has
    left: a re-run reads when a mark was written from its TTL (`worker.marks`), and a
    mark given a fresh day looked written at the move (third review)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        mover = Mover(router, lambda _: None)
        job_id = "mv:e.1@5"
        await src.redis.set(src.keys.arq_job(job_id), b"{}", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {job_id: now_ms()})
        await src.redis.set(src.keys.delivery(job_id), "1", ex=1_000)
        await src.redis.set(src.keys.pushed(job_id), "nonce", ex=2_000)  # queued once
        drain = mover.drain_of(src, dst, "mv", lambda: None)
        assert await drain.move_job(job_id, b"{}", unless_begun=False)
        assert await dst.redis.get(dst.keys.delivery(job_id)) == b"1"
        assert 990_000 < await dst.redis.pttl(dst.keys.delivery(job_id)) <= 1_000_000
        assert await dst.redis.zscore(dst.keys.QUEUE, job_id) is not None
        # a window redelivery's queued-once key goes along: one asked on the new shard
        # before its attempt is shipped to PostgreSQL history queued it again (review)
        assert await dst.redis.get(dst.keys.pushed(job_id)) == b"nonce"
        assert 1_990_000 < await dst.redis.pttl(dst.keys.pushed(job_id)) <= 2_000_000


async def test_a_moved_retry_takes_the_body_it_refers_to(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A retry that refers to its event's kept body (`dispatcher.bodies`) finds it on the
    new shard, its reference given back on the old one (the last out: the body goes)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        event = EventJob(id="e", project_id="mv", event="BUILD_END", emitted_at=now_ms())
        body = b"{" + b" " * 2_000 + b"}"
        job = DeliveryJob.first(event, 1, body, shared=True)
        await run_pipeline(src.redis, lambda pipe: Queue(src.redis, src.keys).push(pipe, job))
        mover = Mover(router, lambda _: None)
        read = await src.redis.get(src.keys.arq_job(job.job_id))
        drain = mover.drain_of(src, dst, "mv", lambda: None)
        assert await drain.move_job(job.job_id, read, unless_begun=False)
        assert await src.redis.exists(body_key(src.keys, job)) == 0
        found = await bodies.read(dst.redis, dst.keys, job, 1_000)
        assert found is not None and found.body == body
        assert await dst.redis.hexists(body_key(dst.keys, job), job.job_id)  # type: ignore[misc]

        # another retry of the event: its copy already on the new shard (a move done
        # before) is kept as it is and takes no reference; the old shard's body stays
        # for the event's retry still there
        moving, staying = (DeliveryJob.first(event, n, body, shared=True) for n in (2, 3))
        for shard, jobs in ((src, (moving, staying)), (dst, (moving,))):
            queue = Queue(shard.redis, shard.keys)
            for one in jobs:
                await queue.enqueue(one)
        await dst.redis.hdel(body_key(dst.keys, moving), moving.job_id)  # type: ignore[misc]
        read = await src.redis.get(src.keys.arq_job(moving.job_id))
        assert await drain.move_job(moving.job_id, read, unless_begun=False)
        assert not await dst.redis.hexists(body_key(dst.keys, moving), moving.job_id)  # type: ignore[misc]
        assert await src.redis.hget(body_key(src.keys, staying), "body") == body  # type: ignore[misc]


async def test_a_moved_projects_history_keeps_its_bodies_apart_on_the_new_shard(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A record whose body the Redis store keeps once for its emission (`history.kept`)
    is copied with its body: served whole on the new shard, kept apart there too."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        body = '{"log": "' + "x" * 2_000 + '"}'
        assert isinstance(src.history, RedisHistory) and isinstance(dst.history, RedisHistory)
        record_id = await src.history.add({
            "projectId": "mv", "callBackUrl": "http://127.0.0.1:9/h", "events": "BUILD_END",
            "status": "SUCCESS", "createdTime": now_ms(), "startTime": 1, "endTime": 2,
            "requestBody": body,
            "requestBodyOf": "mv:e@1", "deliveryId": "mv:e.1",
        })  # fmt: skip
        assert await copy_project(src.history, dst.history, "mv", lambda: None) == 1
        assert (await dst.history.get(record_id, "mv")).request_body == body
        stored = await dst.redis.get(dst.keys.history_record(record_id))
        assert stored is not None and b'requestBody"' not in stored
        assert await dst.redis.get(dst.keys.HISTORY_BODY_PREFIX + "mv:e@1") == body.encode()


class FirstPassThenDue(Mover):
    """A mover that makes `job_id` due, wherever it is queued, once its first pass over the
    old shard's queue has decided where it goes (so that no worker runs it before)."""

    job_id = ""

    def drain_of(
        self,
        src: Services,
        dst: Services,
        project: str,
        alive: Callable[[], None],
        until: float = 0.0,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> Drain:
        job_id = self.job_id

        class ThenDue(Drain):
            async def one_pass(self) -> tuple[int, int, int]:
                found = await super().one_pass()
                for shard in (self.src, self.dst):
                    await shard.redis.zadd(shard.keys.QUEUE, {job_id: now_ms()}, xx=True, lt=True)
                return found

        return ThenDue(
            src, dst, project, self.token, alive, self.say, self.settle_s, until, fence=fence
        )


@pytest.mark.parametrize("began", ["claimed", "a re-run's chunk"])
async def test_an_event_whose_fan_out_began_finishes_on_its_old_shard(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, began: str
) -> None:
    """An event whose fan-out began on the old shard stays there through a move and runs
    again there, where the progress marks of what its run before sent are: that delivery is
    not sent again. It began when a run of it was claimed (its claims counted: that run
    died half-way), or it is a re-run's next chunk (its claims start again at each chunk,
    and that run may have drawn other chunk bounds: review). Moved, it ran on the new shard
    without those marks and sent that delivery twice."""
    settings = two_empty_shards(shard_servers)
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with Router.open(settings) as router:
        src = router.of(project)
        ids = {
            name: await src.register(
                Registration(project, receiver.url(f"/{name}"), Region.DEVNET, "t"), "BUILD_END"
            )
            for name in ("sent", "left")
        }
        async with Producer(settings) as producer:
            (event_id,) = await producer.emit_many([(project, "BUILD_END", {"n": 1})])
        job_id = f"{project}:{event_id}"
        wire = orjson.loads(await src.redis.get(src.keys.arq_job(job_id)) or b"")
        progress = f"{job_id}.{ids['sent']}@{wire['a'][0]['emittedAt']}"
        await src.redis.set(src.keys.delivery(progress), "done", ex=86_400)
        if began == "claimed":
            await src.redis.set(src.keys.ARQ_RETRY_PREFIX + job_id, 1)
        else:
            wire["a"][0]["rerun"] = True
            await src.redis.set(src.keys.arq_job(job_id), orjson.dumps(wire), keepttl=True)
        await src.redis.zadd(src.keys.QUEUE, {job_id: now_ms() + 3_600_000})
        mover = FirstPassThenDue(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
        mover.job_id = job_id
        worker = create_worker(settings, poll_delay=0.01, handle_signals=False)
        delivering = asyncio.create_task(worker.main())
        try:
            await mover.move(project, 1)
            await until(lambda: _got(receiver, "/left"), 10, "the delivery left to send")
        finally:
            worker.stop()
            await asyncio.wait_for(delivering, 20)
            await worker.close()
        assert receiver.requests("/sent") == []
        assert len(receiver.requests("/left")) == 1
        old, new = router.shards
        assert (await old.callbacks(project)).count == 0
        assert (await new.callbacks(project)).count == 2
        assert await old.redis.zcard(old.keys.QUEUE) == await new.redis.zcard(new.keys.QUEUE) == 0


async def _got(receiver: Receiver, path: str) -> bool:
    return bool(receiver.requests(path))


@pytest.mark.parametrize(
    ("hashed", "legacy"),
    [(True, False), (True, True), (False, False)],
    ids=["to its hash's shard", "a hold of the version before", "elsewhere"],
)
async def test_a_move_that_died_after_its_flip_is_finished_by_the_next(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, hashed: bool, legacy: bool
) -> None:
    """A mover died after it flipped the project's placement, shard 0 -> 1 (its hold on
    shard 1 left, naming shard 0; `legacy`: the version before's, which names none): an
    event it had not drained is delivered on shard 0, its record written there, and another
    one was queued there just before the flip. `rebalance` finishes that move (drains and
    cleans shard 0, copies its history, lifts the hold), then, when the hash puts the
    project on shard 0 (not `hashed`), moves it there: every record where the project is,
    nothing left elsewhere. Before, a move run again did not look at shard 0 (review)."""
    settings = two_empty_shards(shard_servers)
    project = next(p for p in PROJECTS if rendezvous(p, 2) == (1 if hashed else 0))
    url = receiver.url("/hook")
    async with Router.open(settings) as router:
        old, new = router.shards
        await old.register(Registration(project, url, Region.DEVNET, "t"), "BUILD_END")
        async with Producer(settings) as producer:
            (first,) = await producer.emit_many([(project, "BUILD_END", {"n": 1})])
        dead = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
        assert await dead.grow() == ([project] if hashed else [])  # pinned where its data is
        await dead_before(dead, project, flipped=True, legacy=legacy)
        await run_burst(settings)
        assert len(receiver.requests("/hook")) == 1  # delivered on the old shard
        async with Producer(settings) as producer:
            (second,) = await producer.emit_many([(project, "BUILD_END", {"n": 2})])
        await queued_on(old, new, f"{project}:{second}")  # by a producer yet to see the flip
        said: list[str] = []
        with pytest.raises(Unavailable, match=f"not moved .*: {project}$"):
            await Mover(router, said.append, settle_s=0.3).rebalance()  # its lease is on
        assert said[0].startswith(f"not moved: {project}: another move of it is under way")
        await lapsed(router, project)
        assert await Mover(router, said.append, settle_s=0.3, late_s=LATE_S).rebalance() == 1
        await run_burst(settings)
        home, away = (new, old) if hashed else (old, new)
        assert sorted(await recorded(home, project, url)) == sorted([first, second])
        assert len(receiver.requests("/hook")) == 2
        assert (await home.callbacks(project)).count == 1
        assert not await holds(away, project)
        assert await hold_source(old, project) is None and await hold_source(new, project) is None
        assert router.placement.explicit == {}
        assert f"{project}: finishing its move from shard 0" in said


async def test_a_move_that_died_before_its_flip_is_undone_by_a_move_elsewhere(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A mover died before its flip, shard 0 -> 1: its copies and its hold are on shard 1,
    the project on shard 0. Moving it to shard 0 (where it is) undoes that move: nothing of
    it stays on shard 1, its lanes there wait no more (third review)."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with registered_on_0(shard_servers, receiver, project) as router:
        old, new = router.shards
        dead = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
        await dead_before(dead, project, flipped=False)
        assert (await new.callbacks(project)).count == 1  # its copy
        said: list[str] = []
        await lapsed(router, project)
        await Mover(router, said.append, settle_s=0.3, late_s=LATE_S).move(project, 0)
        assert not await holds(new, project) and await hold_source(new, project) is None
        assert (await old.callbacks(project)).count == 1
        assert said[0] == f"{project}: undoing its move to shard 1"


async def test_one_mover_at_a_time_and_one_that_lost_its_lease_stops(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A project's move lease: a second mover is refused while the first holds it; a mover
    whose lease another took (it was paused past it) stops at its next fence, and gives
    back nothing it no longer holds."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        first, second = (MoveLease(router.home, "p", token) for token in ("one", "two"))
        async with first.held():
            with pytest.raises(Unavailable, match="another move"):
                async with second.held():
                    pass
            await first.fence()  # still its own
            await router.home.redis.set(first.key, "two", px=30_000)  # taken over
            with pytest.raises(Unavailable, match="another mover took"):
                await first.fence()
            with pytest.raises(Unavailable, match="another mover took"):
                first.alive()  # lost for good
        assert await router.home.redis.get(first.key) == b"two"  # not given back: not its own
        third = MoveLease(router.home, "q", "three")
        async with third.held():
            await router.home.redis.delete(third.key)  # lapsed, taken by none
            with pytest.raises(Unavailable, match="lease lapsed"):
                await third.fence()
        assert not await router.home.redis.exists(third.key)


async def test_a_lease_is_renewed_while_its_move_runs_and_given_back(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """Held past its length, a mover's lease is still its own (renewed meanwhile); given
    back when the move ends."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        lease = MoveLease(router.home, "p", "one", lease_s=2.0)
        async with lease.held():
            await asyncio.sleep(2.5)
            assert await router.home.redis.get(lease.key) == b"one"
            lease.alive()
            await lease.fence()
        assert not await router.home.redis.exists(lease.key)


async def test_a_mover_whose_lease_is_lost_stops_at_its_next_step(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A renewal that finds another mover's token marks the lease lost: the mover's next
    step stops (it is not cancelled mid-step); a placement written under a lease that is
    not the writer's is refused in its script; a mover paused past its lease (its clock
    says so) stops at its next step without asking Redis."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        lease = MoveLease(router.home, "p", "one", lease_s=2.0)
        async with lease.held():
            await router.home.redis.set(lease.key, "two", px=30_000)

            async def stopped() -> bool:
                try:
                    lease.alive()
                except Unavailable as exc:
                    return "another mover took the lease" in exc.message
                return False

            await until(stopped, 5, "the keeper's renewal to find the lease taken")
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        placement = router.placement
        assert not await placement.write("p", Placed(1), lease=(lease.key, "one"))
        await placement.load()
        assert "p" not in placement.explicit
        assert await placement.write("p", Placed(1), lease=(lease.key, "two"))
        now = [time.monotonic()]
        paused = MoveLease(router.home, "q", "three", clock=lambda: now[0])
        async with paused.held():
            paused.alive()
            now[0] += paused.lease_s  # its process was stopped that long
            with pytest.raises(Unavailable, match="it was paused"):
                paused.alive()


async def test_a_history_copy_or_removal_stops_when_its_mover_does(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """The history of a project is copied and removed a page at a time, its mover's lease
    checked before each page: a mover that lost it writes and removes nothing more."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with registered_on_0(shard_servers, receiver, project) as router:
        old, new = router.shards
        async with Producer(router.settings) as producer:
            await producer.emit_many([(project, "BUILD_END", {"n": 1})])
        await run_burst(router.settings)
        assert isinstance(old.history, RedisHistory) and isinstance(new.history, RedisHistory)

        def lost() -> None:
            raise Unavailable(f"{project}: this mover stopped: another mover took the lease")

        with pytest.raises(Unavailable):
            await copy_project(old.history, new.history, project, lost)
        with pytest.raises(Unavailable):
            await forget_project(old.history, project, lost)
        assert not await holds(new, project)  # no record copied
        now = now_ms()
        found = await old.history.query(
            project, receiver.url("/hook"), "BUILD_END", start_ms=now - 600_000, end_ms=now + 1
        )
        assert len(found.records) == 1  # none removed


class Usurped(Mover):
    """A mover paused past its lease at its first settle, which another mover took."""

    async def settle(self) -> None:
        await super().settle()
        home = self.router.home
        for key in [k async for k in home.redis.scan_iter(match=home.keys.move_lease("*"))]:
            await home.redis.set(key, "another", px=60_000)


async def test_a_mover_that_lost_its_lease_stops_before_its_next_write(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A mover whose lease another took while it waited for the freeze to settle stops
    there: no hold, no copy on the target, the placement as it left it (frozen) for the
    mover that took over."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with registered_on_0(shard_servers, receiver, project) as router:
        _, new = router.shards
        with pytest.raises(Unavailable, match="another mover took"):
            await Usurped(router, lambda _: None, settle_s=0.1).move(project, 1)
        assert router.placement.explicit[project] == Placed(0, 1)
        assert await hold_source(new, project) is None
        assert (await new.callbacks(project)).count == 0
        key = router.home.keys.move_lease(project)
        assert await router.home.redis.get(key) == b"another"  # not given back: not its own


async def lapsed(router: Router, project: str) -> None:
    """The move lease of a mover that died lapses (now, rather than in 30 s)."""
    key = router.home.keys.move_lease(project)
    assert await router.home.redis.pexpire(key, 1)

    async def gone() -> bool:
        return not await router.home.redis.exists(key)

    await until(gone, 5, "the dead mover's lease to lapse")


async def dead_before(dead: Mover, project: str, *, flipped: bool, legacy: bool = False) -> None:
    """A move of `project` from shard 0 to 1 up to its flip (`flipped`: and the flip), by
    `dead`, which then dies (`legacy`: its hold is the version before's)."""
    router = dead.router
    old, new = router.shards
    await router.home.redis.set(router.home.keys.move_lease(project), dead.token, px=60_000)
    await router.placement.write(project, Placed(0, 1))
    await dead.settle()
    if legacy:
        await new.redis.set(new.keys.lanes_hold(project), "1")
    else:
        await hold(new, project, 0)
    await dead._copy(old, new, project, lambda: None)
    if flipped:
        await router.placement.write(project, Placed(1))
        await dead.settle()


async def test_a_window_redelivery_waits_while_its_project_moves_to_its_shard(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """After a move's flip and before its last history copy, the new shard sees neither
    the old shard's newest attempts nor its queued-once keys: a window's redelivery there
    could send again what was just redelivered (the README listed it as not covered). It
    is refused with a clear error until the move lets the project's shard go."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    url = receiver.url("/hook")
    async with registered_on_0(shard_servers, receiver, project) as router:
        dead = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
        await router.placement.write(project, Placed(0, 1))  # the move's start
        await dead.settle()
        with pytest.raises(Unavailable, match="is moving to another shard: a window's"):
            await views.redeliver_failed(router, project, url, "BUILD_END")
        with pytest.raises(Unavailable, match="moving to another shard: a record's redelivery"):
            await views.redeliver(router, project, 1)  # it went on, unchecked (review)
        await dead_before(dead, project, flipped=True)
        with pytest.raises(Unavailable, match="is moving to another shard: a window's"):
            await views.redeliver_failed(router, project, url, "BUILD_END")  # its lease on
        await lapsed(router, project)  # the mover died: the operator is told what to run
        with pytest.raises(Unavailable, match=rf"died after its flip; finish it \(dispatcher "
                           rf"shards move {project} --to 1\)"):  # fmt: skip
            await views.redeliver_failed(router, project, url, "BUILD_END")
        await let_go(router.shards[1], project)
        assert (await views.redeliver_failed(router, project, url, "BUILD_END")).queued == 0


async def test_a_window_redelivery_stops_before_its_next_batch_once_a_move_begins(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long window call that began before a move went on queueing on the old shard
    after the move's drain, where nothing moves it again (review): each batch checks."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    settings = two_empty_shards(shard_servers).model_copy(update={"retry_schedule": ()})
    url = receiver.script("/hook", answer(404))
    async with Router.open(settings) as router:
        await router.shards[0].register(Registration(project, url, Region.DEVNET, "t"), "BUILD_END")
        async with Producer(settings) as producer:
            await producer.emit_many([(project, "BUILD_END", {"n": n}) for n in range(2)])
        await run_burst(settings)
        monkeypatch.setattr("dispatcher.redelivery.BATCH", 1)

        def a_move_begins(_: int) -> None:
            router.placement.explicit[project] = Placed(0, 1)

        with pytest.raises(Unavailable, match=r"\(1 queued before it stopped\)$"):
            await views.redeliver_failed(router, project, url, "BUILD_END", on_queued=a_move_begins)
        assert await router.shards[0].redis.zcard(settings.queue_name) == 1


async def test_a_move_to_where_a_project_is_leaves_its_data_elsewhere_alone(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A project placed on a shard, its callbacks on another with no move under way (no
    hold: say, registered by a process that did not see the placement yet): moving it
    where it is destroys nothing (finishing a move drains and forgets the old shard's)."""
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with registered_on_0(shard_servers, receiver, project) as router:
        old, _ = router.shards
        await router.placement.write(project, Placed(1))
        said: list[str] = []
        await Mover(router, said.append, settle_s=0.3, late_s=LATE_S).move(project, 1)
        assert (await old.callbacks(project)).count == 1
        assert said == [f"{project}: on shard 1"]


async def test_a_job_is_moved_only_as_it_was_read_and_an_event_that_began_stays(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """The mover takes a job in one script with what it checks: a job whose bytes changed
    since its pass read them (a worker ran it meanwhile: a re-run's next chunk, say) is
    looked at again, and an event to fan out whose claims are counted (a worker claimed it
    meanwhile) stays (review: both were read before the take)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        drain = Mover(router, lambda _: None).drain_of(src, dst, "mv", lambda: None)
        job_id = "mv:e"
        await src.redis.set(src.keys.arq_job(job_id), b"now", px=60_000)
        await src.redis.zadd(src.keys.QUEUE, {job_id: now_ms()})
        assert await drain.move_job(job_id, b"then", unless_begun=False) is False
        await src.redis.set(src.keys.ARQ_RETRY_PREFIX + job_id, 1)
        assert await drain.move_job(job_id, b"now", unless_begun=True) is None
        assert not await src.redis.exists(src.keys.ARQ_IN_PROGRESS_PREFIX + job_id)
        assert await drain.move_job(job_id, b"now", unless_begun=False) is True
        assert await dst.redis.get(dst.keys.arq_job(job_id)) == b"now"


@contextlib.asynccontextmanager
async def registered_on_0(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, project: str
) -> AsyncIterator[Router]:
    """A router over the two shards, emptied, `project` with one callback on shard 0."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        url = receiver.url("/hook")
        await router.shards[0].register(Registration(project, url, Region.DEVNET, "t"), "BUILD_END")
        yield router


def two_empty_shards(shard_servers: list[EmbeddedRedis]) -> Settings:
    """Settings for the two shards, emptied."""
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)


async def queued_on(old: Services, new: Services, job_id: str) -> None:
    """The job `job_id` queued on `new` goes to `old`'s queue instead."""
    data = await new.redis.get(new.keys.arq_job(job_id))
    assert data is not None
    await new.redis.delete(new.keys.arq_job(job_id))
    await new.redis.zrem(new.keys.QUEUE, job_id)
    await old.redis.set(old.keys.arq_job(job_id), data, ex=86_400)
    await old.redis.zadd(old.keys.QUEUE, {job_id: now_ms()})


async def recorded(services: Services, project: str, url: str) -> list[str]:
    """The event ids of the project's records to `url` on that shard (the last ten
    minutes: one page)."""
    now = now_ms()
    page = await services.history.query(
        project, url, "BUILD_END", start_ms=now - 600_000, end_ms=now + 60_000
    )
    return [str(r.event_id) for r in page.records]


async def run_burst(settings: Settings) -> None:
    """A burst worker over every shard, until their queues are empty."""
    worker = create_worker(settings, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        await asyncio.wait_for(worker.main(), 20)
    finally:
        await worker.close()


async def test_a_project_id_is_looked_for_literally_on_a_shard(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """Whether a shard holds a project's data: a project id with glob characters matches
    itself only (its history indexes are found by a SSCAN pattern)."""
    (shard,) = shard_servers[:1]
    sync_redis.Redis.from_url(shard.url).flushall()
    async with Router.open(make_settings(shard.url)) as router:
        (services,) = router.shards
        k = services.keys
        index = k.history_index("p-x", "BUILD_END", "u")
        await services.redis.sadd(k.HISTORY_INDEXES, index)  # type: ignore[misc]  # sync|async
        assert await holds(services, "p-x")
        for hostile in ("p-*", "p-?", "p-[x]", "*"):
            assert not await holds(services, hostile), hostile
        index = k.history_index("p-*", "BUILD_END", "u")
        await services.redis.sadd(k.HISTORY_INDEXES, index)  # type: ignore[misc]  # sync|async
        assert await holds(services, "p-*")


async def test_growing_pins_a_project_where_the_hash_put_it_not_where_a_stale_copy_is(
    shard_servers: list[EmbeddedRedis], tmp_path: Path
) -> None:
    """Two shards grow to three. A project the hash put on shard 1 also has a stale copy
    on shard 0 (a move of the version before, undone halfway): `grow` pins it to shard 1,
    where its data and events are. It pinned it to the lowest shard holding anything of
    it, shard 0, and its events went to the stale copy (fourth review)."""
    async with three_shards(shard_servers, tmp_path) as urls:
        two = make_settings(urls[0], redis_shards=urls[:2])
        async with Router.open(two) as router:
            await Mover(router, lambda _: None, settle_s=0.001).grow()
            project = "p3"  # on shard 1 over two shards, elsewhere over three
            assert router.of(project).shard.index == 1
            for services in router.shards:  # its data, and a stale copy on shard 0
                await services.register(
                    Registration(project, "http://127.0.0.1:9/x", Region.DEVNET, "t"), "BUILD_END"
                )
        async with Router.open(make_settings(urls[0], redis_shards=urls)) as router:
            assert rendezvous(project, 3) != 1
            assert await Mover(router, lambda _: None, settle_s=0.001).grow() == [project]
            assert router.placement.explicit[project] == Placed(1)


async def test_a_move_that_died_before_its_flip_is_undone_by_a_move_to_a_third_shard(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, tmp_path: Path
) -> None:
    """Three shards, the project on shard 0 with a delivered event. A mover died before its
    flip, shard 0 -> 1 (its copies and its hold on shard 1), and another event was queued
    on shard 0 meanwhile. Moving the project to shard 2 undoes that move, then moves it from
    shard 0, where its data and events are: both events delivered once, their records and
    its callback on shard 2, nothing of it on shards 0 and 1, no hold left."""
    async with three_shards(shard_servers, tmp_path) as urls:
        settings = make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)
        project, url = PROJECTS[0], receiver.url("/hook")
        async with Router.open(settings) as router:
            zero, one, two = router.shards
            await zero.register(Registration(project, url, Region.DEVNET, "t"), "BUILD_END")
            async with Producer(settings) as producer:
                (first,) = await producer.emit_many([(project, "BUILD_END", {"n": 1})])
            await run_burst(settings)
            dead = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
            await router.home.redis.set(router.home.keys.move_lease(project), dead.token, px=60_000)
            await router.placement.write(project, Placed(0, 1))
            await dead.settle()
            await hold(one, project, 0)
            await dead._copy(zero, one, project, lambda: None)  # then it dies
            async with Producer(settings) as producer:
                (second,) = await producer.emit_many([(project, "BUILD_END", {"n": 2})])
            assert await zero.redis.zscore(zero.keys.QUEUE, f"{project}:{second}") is not None
            assert await holds(one, project)  # the dead move's copy
            await lapsed(router, project)
            said: list[str] = []
            with pytest.raises(InvalidInput, match="died before its flip"):
                await Mover(router, said.append, late_s=LATE_S).move(project, 2, came_from=0)
            assert await Mover(router, said.append, settle_s=0.3, late_s=LATE_S).move(project, 2)
            await run_burst(settings)
            assert sorted(await recorded(two, project, url)) == sorted([first, second])
            assert len(receiver.requests("/hook")) == 2
            assert (await two.callbacks(project)).count == 1
            assert not await holds(zero, project) and not await holds(one, project)
            for services in router.shards:
                assert await hold_source(services, project) is None
            assert router.placement.explicit == {project: Placed(2)}
            assert said[0] == f"{project}: undoing its move to shard 1"


async def test_the_operator_says_where_a_move_of_the_version_before_came_from(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, tmp_path: Path
) -> None:
    """Three shards. A mover of the version before died after its flip, shard 0 -> 1: its
    hold names no shard and an event is still queued on shard 0. With a stale copy on
    shard 2 too, a move is refused (which shard did it come from?) until the operator says:
    `came_from=0` finishes that move (the event delivered, its record on shard 1, nothing
    left on shard 0). Refused: a shard that holds nothing of the project (its hold would go
    and the real source stay unfinished: review), the one it is on, one its hold
    contradicts, and `came_from` when no move of it died after its flip."""
    async with three_shards(shard_servers, tmp_path) as urls:
        settings = make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)
        project, url = PROJECTS[0], receiver.url("/hook")
        registration = Registration(project, url, Region.DEVNET, "t")
        async with Router.open(settings) as router:
            zero, one, two = router.shards
            await zero.register(registration, "BUILD_END")
            async with Producer(settings) as producer:
                (event,) = await producer.emit_many([(project, "BUILD_END", {"n": 1})])
            await router.placement.write(project, Placed(1))  # the flip; then it died
            await one.redis.set(one.keys.lanes_hold(project), "1")
            await Mover(router, lambda _: None)._copy(zero, one, project, lambda: None)
            mover = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
            for wrong, says in ((2, r"not one of \[0\]"), (1, "not one of"), (3, "no shard 3")):
                with pytest.raises(InvalidInput, match=says):
                    await mover.move(project, 1, came_from=wrong)
            await two.register(registration, "BUILD_END")  # a stale copy on shard 2
            with pytest.raises(Unavailable, match=r"shards \[0, 2\] all hold .*--came-from"):
                await mover.move(project, 1)
            assert await hold_source(one, project) == -1  # nothing done
            assert await mover.move(project, 1, came_from=0)
            await run_burst(settings)
            assert len(receiver.requests("/hook")) == 1
            assert await recorded(one, project, url) == [event]
            assert not await holds(zero, project) and await hold_source(one, project) is None
            assert await holds(two, project)  # a stale copy is left alone
            with pytest.raises(InvalidInput, match="no move of it died after its flip"):
                await mover.move(project, 1, came_from=0)
            await hold(one, project, 0)  # a hold of this version, naming shard 0
            with pytest.raises(InvalidInput, match="its hold says shard 0"):
                await mover.move(project, 1, came_from=2)


@contextlib.asynccontextmanager
async def three_shards(
    shard_servers: list[EmbeddedRedis], tmp_path: Path
) -> AsyncIterator[list[str]]:
    """The URLs of three shards, emptied: the two of `shard_servers` and one more."""
    third = EmbeddedRedis(tmp_path / "shard2", persist=False)
    third.start()
    try:
        servers = [*shard_servers, third]
        for server in servers:
            sync_redis.Redis.from_url(server.url).flushall()
        yield [server.url for server in servers]
    finally:
        third.stop()


async def test_the_operator_forgets_a_stale_copy_and_nothing_else(
    shard_servers: list[EmbeddedRedis], receiver: Receiver, tmp_path: Path
) -> None:
    """`dispatcher shards forget P --shard N` removes P's stale copy on shard N (callbacks,
    roles, Redis history, a record only it had and its drops copied first to where P
    lives, the drops after P's own there) and nothing of P where it lives. Refused: the
    shard it lives on, a shard not listed, a copy that may be P's only one (its own shard
    holds nothing), while N still has a job of it queued, while it moves, and while a move
    of it that died after its flip is unfinished (the copy may be where that move came
    from). Its drops there were deleted uncopied (review)."""
    async with three_shards(shard_servers, tmp_path) as urls:
        settings = make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)
        project, url = PROJECTS[0], receiver.url("/hook")
        registration = Registration(project, url, Region.DEVNET, "t")
        async with Router.open(settings) as router:
            zero, _, two = router.shards
            await router.placement.write(project, Placed(0))
            await two.register(registration, "BUILD_END")  # a stale copy
            await two.roles.grant(project, "alice", Role.ADMIN)
            said: list[str] = []
            with pytest.raises(InvalidInput, match="holds nothing of it: the copy on shard 2"):
                await forget_copy(router, project, 2, said.append)  # its only copy
            await zero.register(registration, "BUILD_END")
            await zero.roles.grant(project, "alice", Role.ADMIN)
            assert isinstance(two.history, RedisHistory)
            left = await two.history.add({  # a record only the stale copy has
                "projectId": project, "callBackUrl": url, "events": "BUILD_END",
                "status": "SUCCESS", "createdTime": now_ms(), "startTime": 1, "endTime": 2,
            })  # fmt: skip
            drop = [
                orjson.dumps({"deliveryId": f"{project}:e{n}.1", "reason": "r"}) for n in (1, 2)
            ]
            await zero.redis.rpush(zero.keys.dropped(project), drop[0])  # type: ignore[misc]
            await two.redis.rpush(two.keys.dropped(project), drop[1])  # type: ignore[misc]
            for shard, says in ((0, "lives on shard 0"), (3, "no shard 3")):
                with pytest.raises(InvalidInput, match=says):
                    await forget_copy(router, project, shard, said.append)
            await two.redis.zadd(two.keys.QUEUE, {f"{project}:evt_left": now_ms()})
            with pytest.raises(Unavailable, match="still runs 1 of its job"):
                await forget_copy(router, project, 2, said.append)
            await two.redis.zrem(two.keys.QUEUE, f"{project}:evt_left")
            await router.placement.write(project, Placed(0, 1))
            with pytest.raises(InvalidInput, match=r"is moving \(shard 0 -> 1\)"):
                await forget_copy(router, project, 2, said.append)
            await router.placement.write(project, Placed(0))
            await hold(zero, project, 2)  # a move 2 -> 0 died after its flip
            with pytest.raises(InvalidInput, match="died after its flip"):
                await forget_copy(router, project, 2, said.append)
            await let_go(zero, project)
            assert await holds(two, project)  # every refusal left it
            assert await forget_copy(router, project, 2, said.append)
            assert not await holds(two, project)
            assert (await zero.callbacks(project)).count == 1
            assert await zero.roles.list(project) == {"alice": Role.ADMIN}
            assert (await zero.history.get(left, project)).id == left  # kept where it lives
            assert await zero.redis.lrange(zero.keys.dropped(project), 0, -1) == drop  # type: ignore[misc]
            assert not await two.redis.exists(two.keys.dropped(project))
            assert not await forget_copy(router, project, 1, said.append)  # nothing there
            assert said == [
                f"{project}: its copy on shard 2 is gone (it lives on shard 0)",
                f"{project}: shard 1 holds nothing of it",
            ]


async def test_a_process_of_the_shorter_list_refuses_a_project_moved_past_it(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A project moved to shard 1 before `grow` (which the README's first step of Growing
    allows while processes still run with one URL): such a process refuses its events
    (503, the emitter sends again) and says why. It hashed the project onto shard 0
    instead, where the move had removed its callbacks: its events fanned out to nothing,
    with no record and no drop (review)."""
    settings = two_empty_shards(shard_servers)
    one_url = make_settings(shard_servers[0].url, placement_refresh=0.05)
    said: list[str] = []
    async with Router.open(settings) as router:
        src, _ = router.shards
        assert router.placement.active == 1  # shard 1 listed, not in use
        await src.register(
            Registration("p1", receiver.url("/hook"), Region.DEVNET, "t"), "BUILD_END"
        )
        await Mover(router, said.append, settle_s=0.2, late_s=0.2).move("p1", 1)
        assert any("not in use yet" in line for line in said)
        async with Producer(one_url) as producer:  # a process not rolled out yet
            with pytest.raises(Unavailable, match=r"moved to shard 1.*given 1 shard"):
                await producer.emit("p1", "BUILD_END", {"n": 1})
            await producer.emit("p2", "BUILD_END", {"n": 1})  # other projects go on
        assert await src.redis.zcard(src.keys.QUEUE) == 1
        async with Producer(settings) as producer:  # one given the whole list
            await producer.emit("p1", "BUILD_END", {"n": 2})
        await run_burst(settings)
        assert [orjson.loads(r.body)["data"]["n"] for r in receiver.requests("/hook")] == [2]
