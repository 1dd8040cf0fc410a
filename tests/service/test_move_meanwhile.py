"""What changes on a moving project's old shard while its move runs, and what the move
makes of it, on two real shards: a worker disabling a callback the move has copied (the
worker's writes do not read the move's freeze), whatever its clock says, and by a move
finished by another mover; the retention sweep removing the oldest records of an index the
move is copying."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from dispatcher.clock import now_ms
from dispatcher.errors import Unavailable
from dispatcher.history.moving import copy_project
from dispatcher.history.redis import RedisHistory
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.placement import rendezvous
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.shards.disables import Carried, carry_disables, copy_callbacks
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.worker.engine import GONE_REASON
from tests.helpers import Receiver, answer
from tests.service.test_shard_growth import LATE_S, PROJECTS, run_burst, two_empty_shards

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dispatcher.embedded import EmbeddedRedis
    from dispatcher.history.record import AttemptRecord
    from dispatcher.models import Callback
    from dispatcher.services import Services

DEVNET = Region.DEVNET
DAY_MS = 86_400_000
URL = "http://127.0.0.1:9/h"


class GoneAfterTheCopy(Mover):
    """A mover right after whose copy of the callbacks (before its flip) an event of the
    project is queued on the old shard (by a producer that routed it by the placement from
    before) and delivered there: its receiver answers 410 Gone, and the worker disables
    callback `callback_id` on the old shard (`gone`, as it is then)."""

    callback_id = 0
    gone: Callback | None = None

    async def _copy(
        self, src: Services, dst: Services, project: str, alive: Callable[[], None]
    ) -> None:
        await super()._copy(src, dst, project, alive)
        settings = self.router.settings
        async with Producer(settings, src.redis, shard=src.shard) as producer:
            await producer.emit(project, "BUILD_END", {"n": 1})
        await run_burst(settings)
        self.gone = await src.callback(self.callback_id, project)


async def test_a_callback_disabled_on_the_old_shard_during_a_move_stays_disabled(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    """A receiver answers 410 Gone to an event delivered on the old shard after the move
    copied the callbacks: the worker disables the callback there. The move disables it on
    the new shard too, with the same reason and time, before it removes the old shard's
    copy: the next event sends nothing to the receiver. Before, the new shard kept the
    copy made before the 410, enabled, and delivered to the receiver again (review)."""
    settings = two_empty_shards(shard_servers)
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    url = receiver.script("/gone", *[answer(410)] * 3)
    said: list[str] = []
    async with Router.open(settings) as router:
        src, dst = router.shards
        registration = Registration(project, url, DEVNET, "t")
        callback_id = await src.register(registration, "BUILD_END")
        mover = GoneAfterTheCopy(router, said.append, settle_s=0.2, late_s=LATE_S)
        mover.callback_id = callback_id
        await mover.move(project, 1)
        assert mover.gone is not None and mover.gone.disabled_reason == GONE_REASON
        assert len(receiver.requests("/gone")) == 1
        moved = await dst.callback(callback_id, project)
        assert (moved.enabled, moved.disabled_reason) == (False, GONE_REASON)
        assert moved.updated_time == mover.gone.updated_time
        assert f"{project}: 1 callback(s) disabled on shard 0 meanwhile" in said
        async with Producer(settings) as producer:
            await producer.emit(project, "BUILD_END", {"n": 2})
        await run_burst(settings)
        assert len(receiver.requests("/gone")) == 1


async def worker_disables(src: Services, callback_id: int) -> None:
    """What a worker of `src` writes when a receiver answers 410 Gone (it does not read
    the move's freeze)."""
    queue = src.registry.queue_set_enabled
    await run_pipeline(src.redis, lambda pipe: queue(pipe, callback_id, False, GONE_REASON))


async def test_a_disable_is_carried_over_unless_the_new_shard_changed_the_callback_since(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of three callbacks copied to the new shard: one disabled on the old shard after
    the copy is disabled on the new one (its reason and time kept); one disabled there too,
    but enabled on the new shard since (after the flip, by its project's admin), stays
    enabled: the later change stands; one disabled before the copy, copied disabled, is
    left as it is. The match sets follow: only the enabled one is matched on the new
    shard. The changes after the registration need no millisecond of their own: what the
    copy wrote tells them apart, not their times (before, the test slept 2 ms between
    them)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        registrations = [
            Registration("mv", f"http://127.0.0.1:9/{n}", DEVNET, "t") for n in range(3)
        ]
        # registered before the move: a change on the new shard stamped with the copied
        # `updatedTime` itself is taken for none (a freeze's settle, the copy, the flip and
        # its settle come between them)
        earlier = now_ms() - 60_000
        monkeypatch.setattr("dispatcher.registry.store.now_ms", lambda: earlier)
        ids = [await src.register(registration, "BUILD_END") for registration in registrations]
        monkeypatch.undo()
        carried, enabled_since, before = ids
        await src.registry.set_enabled(before, False, "before the copy")
        await copy_callbacks(src, dst, "mv", lambda: None)  # the move's copy
        for callback_id in (carried, enabled_since):
            await worker_disables(src, callback_id)
        await dst.enable(enabled_since, project_id="mv")
        said: list[str] = []
        assert await carry_disables(src, dst, "mv", said.append) == Carried(1, 0)
        assert said == ["mv: 1 callback(s) disabled on shard 0 meanwhile"]
        old, new = await src.callback(carried, "mv"), await dst.callback(carried, "mv")
        assert (new.enabled, new.disabled_reason) == (False, GONE_REASON)
        assert new.updated_time == old.updated_time
        assert (await dst.callback(enabled_since, "mv")).enabled
        assert (await dst.callback(before, "mv")).disabled_reason == "before the copy"
        matched = await dst.redis.zrange(dst.keys.match("mv", "BUILD_END"), 0, -1)
        assert matched == [str(enabled_since).encode()]


@pytest.mark.parametrize("behind_ms", [1_000, 0], ids=["a-second-behind", "same-millisecond"])
async def test_a_disable_by_a_worker_whose_clock_is_behind_is_carried_over(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch, behind_ms: int
) -> None:
    """A callback registered by an API host, then copied by the move; a worker of the old
    shard disables it there (a 410 Gone) at a time its clock gives `behind_ms` before the
    registration's (or in the registration's very millisecond). The move disables it on
    the new shard too, at the worker's time. Before, the carry compared the two hosts'
    clocks (a row on the new shard with an `updatedTime` at or after the disable's time
    was taken for changed there since): the disable was not carried, and the new shard
    went on delivering to a receiver that had answered Gone (review)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        registration = Registration("mv", URL, DEVNET, "t")
        callback_id = await src.register(registration, "BUILD_END")  # by an API host
        registered = await src.callback(callback_id, "mv")
        await copy_callbacks(src, dst, "mv", lambda: None)  # the move's copy
        worker_ms = registered.updated_time - behind_ms  # the worker's clock
        monkeypatch.setattr("dispatcher.registry.store.now_ms", lambda: worker_ms)
        await worker_disables(src, callback_id)
        monkeypatch.undo()
        assert await carry_disables(src, dst, "mv", lambda _: None) == Carried(1, 0)
        moved = await dst.callback(callback_id, "mv")
        assert (moved.enabled, moved.disabled_reason) == (False, GONE_REASON)
        assert moved.updated_time == worker_ms
        assert not await dst.redis.zrange(dst.keys.match("mv", "BUILD_END"), 0, -1)


async def test_a_disable_with_no_note_of_its_copy_is_left_and_said(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A callback copied with no note (by a version before, or a note lapsed: a move
    finished over a day after its copy) and disabled on the old shard since: the carry
    cannot tell whether the new shard changed it, leaves it enabled there, and says so."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        callback_id = await src.register(Registration("mv", URL, DEVNET, "t"), "BUILD_END")
        await copy_callbacks(src, dst, "mv", lambda: None)
        await dst.redis.delete(dst.keys.callbacks_copied("mv"))
        await worker_disables(src, callback_id)
        said: list[str] = []
        assert await carry_disables(src, dst, "mv", said.append) == Carried(0, 1)
        assert (await dst.callback(callback_id, "mv")).enabled
        assert len(said) == 1 and "no note of their copy" in said[0]


class DiesAfterItsFlip(Mover):
    """A mover that dies right after its flip, before its drain: another mover (another
    process, its own token) finishes the move."""

    async def _finish(self, *args: Any, **kwargs: Any) -> None:
        raise Unavailable("died after its flip")


async def test_a_move_finished_by_another_mover_carries_the_disables_over(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mover copies a callback, flips the project and dies; a worker of the old shard,
    its clock a second behind, disables the callback there (a 410 Gone). Another mover
    finishes the move: it finds the note of the copy on the new shard (in Redis), disables
    the callback there too, and removes the note once the move is done."""
    settings = two_empty_shards(shard_servers)
    project = next(p for p in PROJECTS if rendezvous(p, 2) == 0)
    async with Router.open(settings) as router:
        src, dst = router.shards
        callback_id = await src.register(Registration(project, URL, DEVNET, "t"), "BUILD_END")
        with pytest.raises(Unavailable, match="died after its flip"):
            await DiesAfterItsFlip(router, lambda _: None, settle_s=0.1).move(project, 1)
        note = dst.keys.callbacks_copied(project)
        noted = await dst.redis.hkeys(note)  # type: ignore[misc]  # sync|async
        assert noted == [str(callback_id).encode()]
        worker_ms = now_ms() - 1_000
        monkeypatch.setattr("dispatcher.registry.store.now_ms", lambda: worker_ms)
        await worker_disables(src, callback_id)
        monkeypatch.undo()
        said: list[str] = []
        assert await Mover(router, said.append, settle_s=0.1, late_s=LATE_S).move(project, 1)
        assert f"{project}: 1 callback(s) disabled on shard 0 meanwhile" in said
        moved = await dst.callback(callback_id, project)
        assert (moved.enabled, moved.updated_time) == (False, worker_ms)
        assert not await dst.redis.exists(note)


def _record(created_ms: int) -> AttemptRecord:
    return {
        "projectId": "mv", "callBackUrl": URL, "events": "BUILD_END", "status": "SUCCESS",
        "createdTime": created_ms, "startTime": created_ms, "endTime": created_ms,
        "requestBody": "{}", "deliveryId": "mv:e.1",
    }  # fmt: skip


async def test_a_history_copy_misses_no_record_when_the_retention_sweep_runs_meanwhile(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index of 1,000 records, the 20 oldest past the retention; the old shard's
    retention sweep (a cron job every 5 minutes) runs between two reads of the index by
    the copy, and removes those 20. Every one of the 980 within the retention is copied.
    Before, the copy read the index by position (ZRANGE start..start+499): its second page
    began 20 records late, those 20 were never read, and the move then removed them from
    the old shard: gone from both (review)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        assert isinstance(src.history, RedisHistory) and isinstance(dst.history, RedisHistory)
        now = now_ms()
        for n in range(20):
            await src.history.add(_record(now - 7 * DAY_MS - 60_000 + n))
        for n in range(980):
            await src.history.add(_record(now - DAY_MS + n))
        real: Callable[..., Awaitable[Any]] = src.redis.execute_command
        reads: list[str] = []
        swept: list[int] = []

        async def sweeping(*args: Any, **options: Any) -> Any:
            """The sweep runs before the copy's second read of an index, whatever read."""
            name = args[1] if len(args) > 1 else ""
            if args[0] in ("ZRANGE", "ZSCAN", "ZRANGEBYSCORE") and str(name).startswith(
                src.keys.HISTORY_INDEX_PREFIX
            ):
                reads.append(args[0])
                if len(reads) == 2:
                    swept.append(await src.history.sweep())
            return await real(*args, **options)

        monkeypatch.setattr(src.redis, "execute_command", sweeping)
        await copy_project(src.history, dst.history, "mv", lambda: None)
        monkeypatch.undo()
        assert swept == [20]  # between two reads
        page = await dst.history.query(
            "mv", URL, "BUILD_END", start_ms=now - 2 * DAY_MS, end_ms=now, page=1, page_size=1
        )
        assert page.count == 980


async def test_a_moved_history_keeps_each_deliverys_newest_attempt_newest(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """40 deliveries each failed for good then redelivered with success, in an index of
    340 records (past Redis's 128-entry listpack: a hash table, which ZSCAN reads in hash
    order): on the new shard none is a dead letter and each one's newest attempt is its
    success. Copied in a scan's order, 17 of 40 read FAILED as their newest attempt, were
    dead letters again, and a window's redelivery sent them again (review)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        assert isinstance(src.history, RedisHistory) and isinstance(dst.history, RedisHistory)
        now = now_ms()

        def attempt(ms: int, delivery: str, status: str) -> AttemptRecord:
            return {**_record(ms), "deliveryId": delivery, "status": status, "final": True,
                    "callbackId": 1}  # fmt: skip

        for d in range(40):
            await src.history.add(attempt(now - 60_000 + d, f"mv:e.{d}", "FAILED"), dead=True)
            await src.history.add(attempt(now - 30_000 + d, f"mv:e.{d}", "SUCCESS"))
        for n in range(300):
            await src.history.add(attempt(now - 90_000 + n, f"mv:f.{n}", "SUCCESS"))
        assert await src.history.dead("mv") == []
        assert await copy_project(src.history, dst.history, "mv", lambda: None) == 380
        assert await dst.history.dead("mv", limit=100) == []
        for d in range(40):
            [newest] = await dst.history.attempts(f"mv:e.{d}", "mv", limit=1)
            assert newest.status.value == "SUCCESS", d
