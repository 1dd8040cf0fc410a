"""A master paused (SIGSTOP: a frozen VM, a stalled host) through its failover, then
resumed, on a real Sentinel group (a master, two replicas, three sentinels;
down-after-milliseconds 1000). Until the sentinels demote it (8 s and more after it answers
again) it still takes writes as a master; a process's pooled connections opened to it
before the pause must not go on with it: they follow the sentinels' `+switch-master`
(`dispatcher/master_switch.py`)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from dispatcher.connections import connect
from dispatcher.embedded import SentinelGroup
from dispatcher.keys import Keys, project_scoped
from dispatcher.master_switch import FollowingPool, MasterMoved
from dispatcher.producer import Producer
from tests.helpers import make_settings, until

pytestmark = pytest.mark.timeout(120)

keys = Keys()
PROJECT = "paused"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """Two replicas: once the paused master is replaced, the new one still has a replica
    to confirm emits with `DISPATCHER_REDIS_MIN_REPLICAS=1`."""
    group = SentinelGroup(tmp_path_factory.mktemp("paused-master"), replicas=2)
    group.start()
    yield group
    group.stop()


@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_a_master_paused_through_its_failover_takes_nothing_once_it_resumes(
    group: SentinelGroup, min_replicas: int
) -> None:
    """A producer with a connection to the master in its pool, idle; the master paused, a
    replica promoted, the old master resumed (still a master, not yet demoted): the
    process learns of the switch from the sentinels, and the next emit lands on the new
    master. Before, it went on the idle connection to the old master: with 0 replicas
    acknowledged there and lost when the sentinels demoted it; with 1, refused (503) until
    they did (~10 s) though the new master was up. A connection in use at the switch is
    closed before its next command (a lost connection: the command goes again, on the new
    master)."""
    old = await asyncio.to_thread(group.heal)
    await asyncio.to_thread(group.wait_for_replicas, 2)
    # an emit waits less than the sentinels take to demote the old master (8 s at least)
    settings = make_settings(
        group.url, redis_min_replicas=min_replicas, redis_timeout=1, emit_wait=5
    )
    redis = connect(settings)
    pool = redis.connection_pool
    assert isinstance(pool, FollowingPool)
    try:
        await redis.flushdb()
        producer = Producer(settings, redis)
        await producer.emit(PROJECT, "BUILD_END", {}, event_id="before")
        busy = await pool.get_connection()  # held, as a pipeline does
        group.signal(old, signal.SIGSTOP)
        new = await asyncio.to_thread(group.wait_for_new_master, old)
        group.signal(old, signal.SIGCONT)

        async def followed() -> bool:
            return pool.master_address == ("127.0.0.1", new)

        await until(followed, 20, f"the pool follows the switch to {new}")
        with pytest.raises(MasterMoved):
            await busy.send_command("PING")
        await pool.release(busy)
        await producer.emit(PROJECT, "BUILD_END", {}, event_id="after")
        on_new = Redis(host="127.0.0.1", port=new, socket_timeout=2)
        try:
            assert await on_new.exists(keys.arq_job(project_scoped(PROJECT, "after")))
        finally:
            await on_new.aclose()
    finally:
        await redis.aclose()
