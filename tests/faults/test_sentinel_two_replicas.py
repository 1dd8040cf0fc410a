"""Redis Sentinel with two replicas (three sentinels; down-after-milliseconds 1000): what
`DISPATCHER_REDIS_MIN_REPLICAS` guarantees through a planned failover (`SENTINEL
FAILOVER`), where the old master stays up until the sentinels repoint it. With it equal to
the number of replicas, nothing acknowledged is lost; with fewer, the promoted replica may
lack what the old master and the other replica went on confirming (measured: 160 of 2,062
emits, one every 5 ms, in one failover), and start-up says so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from dispatcher.connections import connect, preflight
from dispatcher.embedded import SentinelGroup
from dispatcher.errors import Unavailable
from dispatcher.keys import Keys, project_scoped
from dispatcher.producer import Producer
from tests.helpers import make_settings

keys = Keys()  # today's key names (one shard)

pytestmark = pytest.mark.timeout(120)  # a group of six processes, a failover, a resync

PROJECT = "ha2"


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path_factory.mktemp("two-replicas"), replicas=2)
    group.start()
    yield group
    group.stop()


@pytest.fixture
def group(two_replicas: SentinelGroup) -> SentinelGroup:
    two_replicas.heal()
    return two_replicas


async def test_start_up_warns_when_fewer_replicas_confirm_than_the_sentinels_list(
    group: SentinelGroup,
) -> None:
    (warning,) = await preflight(make_settings(group.url, redis_min_replicas=1))
    assert warning.startswith(
        "DISPATCHER_REDIS_MIN_REPLICAS=1, but 2 replicas of master 'dispatcher' (sentinels "
    ), warning
    assert ") are up: a crash of the master loses nothing acknowledged" in warning
    assert "a planned failover (SENTINEL FAILOVER) or a partition may lose emits" in warning
    assert "set it to 2 to lose nothing in any failover" in warning
    assert await preflight(make_settings(group.url, redis_min_replicas=2)) == []


async def test_a_planned_failover_loses_no_emit_every_replica_confirmed(
    group: SentinelGroup,
) -> None:
    """MIN_REPLICAS=2 with two replicas: a producer emits, one event every 5 ms, through
    an operator's `SENTINEL FAILOVER` and a second after the old master is a replica
    again; every emit acknowledged is on the new master (those refused meanwhile, 503,
    are not acknowledged)."""
    old = group.master_port()
    settings = make_settings(group.url, redis_min_replicas=2, redis_timeout=1, emit_wait=2)
    redis = connect(settings)
    await redis.flushdb()
    producer, acked, refused = Producer(settings, redis), [], 0
    stop = asyncio.Event()

    async def emitting() -> None:
        nonlocal refused
        deadline = time.monotonic() + 60  # (the test's own bound is the timeout above)
        for n in range(100_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                acked.append(await producer.emit(PROJECT, "BUILD_END", {}, event_id=f"e{n}"))
            except Unavailable:
                refused += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(emitting())
    try:
        await asyncio.sleep(1.0)
        sentinel = Redis(host="127.0.0.1", port=next(iter(group.sentinels)), socket_timeout=2)
        try:
            await sentinel.execute_command("SENTINEL", "FAILOVER", group.name)  # type: ignore[no-untyped-call]
        finally:
            await sentinel.aclose()
        new = await asyncio.to_thread(group.wait_for_new_master, old)
        await asyncio.to_thread(group.heal)  # the old master a replica again, in sync
        before = len(acked)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await task
    on_new = Redis(host="127.0.0.1", port=new, socket_timeout=2)
    try:
        held = await on_new.mget([keys.arq_job(project_scoped(PROJECT, e)) for e in acked])
    finally:
        await on_new.aclose()
        await redis.aclose()
    missing = [event_id for event_id, job in zip(acked, held, strict=True) if job is None]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged emits lost: {missing[:20]}"
    assert len(acked) > before, "emits were not acknowledged again after the failover"
    assert acked[0] == "e0" and refused < len(acked), (len(acked), refused)
