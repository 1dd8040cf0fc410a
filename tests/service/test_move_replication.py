"""Moves with `DISPATCHER_REDIS_MIN_REPLICAS=1`, on real shards that each have a real
replica: what the mover writes to the new shard is on its replica before anything of the
project leaves the old shard. A replica that stops confirming (paused here) stops the move
with nothing removed from the old shard but what it confirmed, so that a failover of the
new shard to that replica, its master killed, loses nothing acknowledged."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from dispatcher.auth import Role
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import NotReplicated
from dispatcher.keys import project_scoped
from dispatcher.models import Region
from dispatcher.placement import rendezvous
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.services import Services
from dispatcher.shards.drain import STOPPED, STOPPED_FLIPPED, Drain, Taken
from dispatcher.shards.holdings import holds
from dispatcher.shards.lanes import hold_source
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from tests.helpers import make_settings

PROJECT = next(p for p in (f"rep-{n}" for n in range(100)) if rendezvous(p, 2) == 0)


@dataclass
class Node:
    """A master and its replica: one shard."""

    master: EmbeddedRedis
    replica: EmbeddedRedis

    def cut_replica(self) -> None:
        """The replica paused (SIGSTOP) and its link cut: it gets no more writes."""
        os.kill(self.replica.pid, signal.SIGSTOP)
        sync_redis.Redis.from_url(self.master.url).client_kill_filter(_type="slave")

    def promote_replica(self) -> str:
        """The master killed (SIGKILL) and its replica, resumed, made the master: what a
        failover to a replica that fell behind leaves. Returns its URL."""
        os.kill(self.master.pid, signal.SIGKILL)
        os.kill(self.replica.pid, signal.SIGCONT)
        sync_redis.Redis.from_url(self.replica.url).replicaof("NO", "ONE")
        return self.replica.url


def _replicating(master: EmbeddedRedis, replica: EmbeddedRedis) -> bool:
    state = cast("dict[str, Any]", sync_redis.Redis.from_url(replica.url).info("replication"))
    seen = cast("dict[str, Any]", sync_redis.Redis.from_url(master.url).info("replication"))
    return state.get("master_link_status") == "up" and seen.get("connected_slaves") == 1


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[list[Node]]:
    """Two shards, each a master with a replica in sync."""
    nodes = []
    try:
        for n in (0, 1):
            master = EmbeddedRedis(tmp_path / f"m{n}", persist=False)
            replica = EmbeddedRedis(tmp_path / f"r{n}", persist=False)
            nodes.append(Node(master, replica))
            master.start()
            replica.start()
            sync_redis.Redis.from_url(replica.url).replicaof("127.0.0.1", master.port)
        for _ in range(200):
            if all(_replicating(node.master, node.replica) for node in nodes):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the replicas are not in sync")
        yield nodes
    finally:
        for node in nodes:
            for server in (node.replica, node.master):
                if server.port is not None:
                    try:
                        os.kill(server.pid, signal.SIGCONT)
                    except (ProcessLookupError, RuntimeError):
                        pass
                    server.stop()


class CutsItsReplica(Mover):
    """A mover whose new shard's replica (`node`'s) is cut off once the project's events go
    there: right after its flip ("after its flip"), before the old shard's jobs are taken
    across, or once the first of them has moved ("a job moved")."""

    node: Node | None = None
    after = ""

    async def _finish(self, *args: Any, **kwargs: Any) -> None:
        if self.node is not None and self.after == "after its flip":
            self.node.cut_replica()
        await super()._finish(*args, **kwargs)

    def drain_of(
        self,
        src: Services,
        dst: Services,
        project: str,
        alive: Callable[[], None],
        until: float = 0.0,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> Drain:
        node = self.node if self.after == "a job moved" else None

        class CutOnceOneMoved(Drain):
            async def settle(self, taken: Taken, placed: bool) -> bool:
                nonlocal node
                moved = await super().settle(taken, placed)
                if moved and node is not None:
                    node.cut_replica()
                    node = None
                return moved

        return CutOnceOneMoved(
            src, dst, project, self.token, alive, self.say, self.settle_s, until, fence=fence
        )


async def _queued(redis: Redis, queue: str, job_ids: list[str]) -> set[str]:
    scores = [await redis.zscore(queue, job_id) for job_id in job_ids]
    return {job_id for job_id, score in zip(job_ids, scores, strict=True) if score is not None}


STOPPED_THEN = {  # what the move says it leaves, and the writes it says were not confirmed
    "before its copy": (STOPPED, f"{PROJECT}'s hold, callbacks, roles and history"),
    "after its flip": (STOPPED_FLIPPED, f"{PROJECT}'s job {PROJECT}:\\S+"),
    "a job moved": (STOPPED_FLIPPED, f"{PROJECT}'s job {PROJECT}:\\S+"),
}


@pytest.mark.parametrize("when", list(STOPPED_THEN))
async def test_a_move_its_new_shard_does_not_confirm_removes_nothing_from_the_old(
    shards: list[Node], when: str
) -> None:
    """The new shard's replica stops confirming: before the move copies the project's
    callbacks, once its events go there and its queued jobs are to be taken across, or
    once the first of them moved. The move stops (NotReplicated) and says what it leaves:
    nothing removed from the old shard but the jobs moved so far (each confirmed on the
    new shard), its callbacks, roles and every other acknowledged event's job there, free
    to run (no lease of the mover's left on them); after the flip, its lanes held on the
    new shard. Then the new shard's master dies and its replica, which never confirmed
    the rest, takes its place: every acknowledged event is still queued somewhere.
    Before, the move completed unconfirmed and cleaned the old shard: the promoted
    replica had none of them, so they were lost; and the message said nothing was removed
    from the old shard, also once some jobs had moved."""
    urls = [node.master.url for node in shards]
    settings = make_settings(
        urls[0], redis_shards=urls, placement_refresh=0.05, redis_min_replicas=1
    )
    async with Router.open(settings) as router:
        src, dst = router.shards
        registration = Registration(PROJECT, "http://127.0.0.1:9/hook", Region.DEVNET, "t")
        await src.register(registration, "BUILD_END")
        await src.roles.grant(PROJECT, "alice", Role.ADMIN)
        async with Producer(settings) as producer:  # acknowledged: on shard 0's replica
            emitted = await producer.emit_many(
                [(PROJECT, "BUILD_END", {"n": n}) for n in range(20)]
            )
        job_ids = [project_scoped(PROJECT, event_id) for event_id in emitted]
        mover = CutsItsReplica(router, lambda _: None, settle_s=0.2)
        if when == "before its copy":
            shards[1].cut_replica()
        else:
            mover.node, mover.after = shards[1], when
        then, what = STOPPED_THEN[when]
        stopped = rf"^shard 1: {what} not confirmed \(.*\): {re.escape(then)}; run it again "
        with pytest.raises(NotReplicated, match=stopped + "once the replicas are back$"):
            await mover.move(PROJECT, 1)
        moved = await _queued(dst.redis, dst.keys.QUEUE, job_ids)
        assert len(moved) == (1 if when == "a job moved" else 0)
        assert await _queued(src.redis, src.keys.QUEUE, job_ids) == set(job_ids) - moved
        leases = [src.keys.ARQ_IN_PROGRESS_PREFIX + job_id for job_id in job_ids]
        assert await src.redis.exists(*leases) == 0  # given back: its workers run them now
        assert (await src.callbacks(PROJECT)).count == 1
        assert await src.roles.list(PROJECT) == {"alice": Role.ADMIN}
        assert await holds(src, PROJECT)
        if then == STOPPED_FLIPPED:
            assert await hold_source(dst, PROJECT) == 0  # its lanes there wait
    promoted, old = Redis.from_url(shards[1].promote_replica()), Redis.from_url(urls[0])
    try:
        on_new = await _queued(promoted, dst.keys.QUEUE, job_ids)
        on_old = await _queued(old, src.keys.QUEUE, job_ids)
        assert on_new == moved  # confirmed there before they left the old shard
        assert on_new | on_old == set(job_ids), "acknowledged events lost"
    finally:
        await promoted.aclose()
        await old.aclose()
