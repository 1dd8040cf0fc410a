"""Moves with `DISPATCHER_REDIS_MIN_REPLICAS=1`, on real shards that each have a real
replica: what the mover writes to the new shard is on its replica before anything of the
project leaves the old shard. A replica that stops confirming (paused here) stops the move
with nothing removed from the old shard, so that a failover of the new shard to that
replica, its master killed, loses nothing acknowledged."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
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
from dispatcher.shards.holdings import holds
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


class PausesAfterItsFlip(Mover):
    """A mover whose new shard's replica is cut off once the project's events go there:
    before the old shard's jobs are taken across."""

    node: Node | None = None

    async def _finish(self, *args: Any, **kwargs: Any) -> None:
        if self.node is not None:
            self.node.cut_replica()
        await super()._finish(*args, **kwargs)


async def _queued(redis: Redis, queue: str, job_ids: list[str]) -> set[str]:
    scores = [await redis.zscore(queue, job_id) for job_id in job_ids]
    return {job_id for job_id, score in zip(job_ids, scores, strict=True) if score is not None}


@pytest.mark.parametrize("when", ["before its copy", "after its flip"])
async def test_a_move_its_new_shard_does_not_confirm_removes_nothing_from_the_old(
    shards: list[Node], when: str
) -> None:
    """The new shard's replica stops confirming: before the move copies the project's
    callbacks, or once its events go there and its queued jobs are to be taken across.
    The move stops (NotReplicated) and removes nothing from the old shard: its
    callbacks, roles and every acknowledged event's job are still there, the jobs free to
    run (no lease of the mover's left on them). Then the new shard's master dies and its
    replica, which never confirmed the moved jobs, takes its place: every acknowledged
    event is still queued somewhere. Before, the move completed unconfirmed and cleaned
    the old shard: the promoted replica had none of them, so they were lost."""
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
        mover = PausesAfterItsFlip(router, lambda _: None, settle_s=0.2)
        if when == "before its copy":
            shards[1].cut_replica()
        else:
            mover.node = shards[1]
        stopped = "shard 1: .* not confirmed .* nothing of the project removed from its old"
        with pytest.raises(NotReplicated, match=stopped):
            await mover.move(PROJECT, 1)
        assert await _queued(src.redis, src.keys.QUEUE, job_ids) == set(job_ids)
        leases = [src.keys.ARQ_IN_PROGRESS_PREFIX + job_id for job_id in job_ids]
        assert await src.redis.exists(*leases) == 0  # given back: its workers run them now
        assert (await src.callbacks(PROJECT)).count == 1
        assert await src.roles.list(PROJECT) == {"alice": Role.ADMIN}
        assert await holds(src, PROJECT)
    promoted, old = Redis.from_url(shards[1].promote_replica()), Redis.from_url(urls[0])
    try:
        on_new = await _queued(promoted, dst.keys.QUEUE, job_ids)
        on_old = await _queued(old, src.keys.QUEUE, job_ids)
        assert on_new | on_old == set(job_ids), "acknowledged events lost"
    finally:
        await promoted.aclose()
        await old.aclose()
