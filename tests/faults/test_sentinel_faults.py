"""Redis without a single point of failure, on a real Sentinel group (a master, a replica,
three sentinels; down-after-milliseconds 1000): the master SIGKILLed under producers, two
worker processes and an API process; the replica down; and what
`DISPATCHER_REDIS_MIN_REPLICAS=0` loses, shown rather than hidden; and the PostgreSQL
history's shipper through a failover its processes follow at different moments. The tests
share one group, each starting from a master with its replica in sync."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher.clock import now_ms
from dispatcher.connections import REDIS_ERRORS, connect
from dispatcher.embedded import SentinelGroup
from dispatcher.errors import Unavailable
from dispatcher.history import open_history
from dispatcher.history.record import AttemptRecord
from dispatcher.history.shipper import Shipper
from dispatcher.keys import Keys, project_scoped
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.status import live_workers
from dispatcher.worker import create_worker
from tests.faults.chaos import FlakyReceiver, Verdict, all_records, judge, serving
from tests.faults.test_ordered_faults import FirstFails
from tests.helpers import UID, app_client, free_port, make_settings, start_process, stop, until

keys = Keys()  # today's key names (one shard)

pytestmark = pytest.mark.timeout(180)  # three processes start in up to 60 s on a loaded machine

PROJECT = "ha"
Emit = tuple[str, str, dict[str, object], str]  # (project, event, data, event id)
EMITS = f"/apigw/v4/projects/{PROJECT}/events"
# processes: replicated acknowledgements, leases shorter than a failover takes
ENV = {
    "DISPATCHER_REDIS_MIN_REPLICAS": "1",
    "DISPATCHER_EMIT_WAIT": "2",
    "DISPATCHER_REDIS_TIMEOUT": "2",
    "DISPATCHER_LEASE_SECONDS": "3",
    "DISPATCHER_OPEN_ACCESS": "true",
    "DISPATCHER_LOG_LEVEL": "INFO",
}


@pytest.fixture
def group(sentinel_group: SentinelGroup) -> SentinelGroup:
    sentinel_group.heal()
    return sentinel_group


async def fresh(settings: Settings, receiver: FlakyReceiver) -> tuple[Redis, int]:
    """The group's master emptied, and one callback of PROJECT on the receiver."""
    redis = connect(settings)
    await redis.flushdb()
    callback_id, _ = await Registry(redis).create(
        PROJECT, receiver.url("/hook"), Event.BUILD_END, Region.DEVNET, "s3cret"
    )
    return redis, callback_id


async def emit_over_http(port: int, count: int, every_s: float) -> list[str]:
    """`count` events through the API process's route, each sent again (same event id)
    until it is acknowledged; returns their ids."""
    acked = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
        for n in range(count):
            event_id = f"evt_http_{n}"
            for _ in range(100):
                answer = await api.post(
                    EMITS, headers=UID, json={"event": "BUILD_END", "eventId": event_id}
                )
                if answer.status_code == 200:
                    acked.append(event_id)
                    break
                assert answer.status_code == 503, answer.text
                assert "same event ids is safe" in answer.json()["message"]
                await asyncio.sleep(0.1)
            await asyncio.sleep(every_s)
    return acked


async def emit_in_python(settings: Settings, redis: Redis, count: int, every_s: float) -> list[str]:
    """The same through the Python producer, in twos (`emit_many`)."""
    producer, acked = Producer(settings, redis), []
    for n in range(0, count, 2):
        batch = [(PROJECT, "BUILD_END", {"n": i}, f"evt_py_{i}") for i in (n, n + 1)]
        for _ in range(100):
            try:
                acked += await producer.emit_many(batch)
                break
            except Unavailable:
                await asyncio.sleep(0.1)
        await asyncio.sleep(every_s)
    return acked


def start_fleet(url: str, port: int, log: Path, **env: str) -> list[subprocess.Popen[bytes]]:
    """Two worker processes and an API process on `port` (`env`: more settings)."""
    env = {**ENV, **env}
    workers = [start_process(["worker"], url, log, **env) for _ in range(2)]
    return [*workers, start_process(["api", "--port", str(port)], url, log, **env)]


def died(log: Path) -> str:
    """What the processes' shared log says of one that died: its first traceback (the
    log's tail is the others' deliveries), then the tail."""
    text = log.read_text()
    start = text.find("Traceback (most recent call last)")
    return (text[start : start + 6000] + "\n…\n" if start >= 0 else "") + text[-2000:]


async def fleet_up(redis: Redis, port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.TransportError:
        return False
    return ready.status_code == 200 and len(await live_workers(redis, keys)) == 2


async def kill_the_master(group: SentinelGroup, after_s: float) -> float:
    """SIGKILL the master `after_s` into the run; once the replica is promoted, the killed
    node comes back as its replica (so that emits can be confirmed again). Returns when
    it was killed (epoch ms)."""
    await asyncio.sleep(after_s)
    old = group.master_port()
    group.signal(old, signal.SIGKILL)
    killed = now_ms()
    new = await asyncio.to_thread(group.wait_for_new_master, old)
    await asyncio.to_thread(group.start_node, old, new)
    return killed


async def verdict_on(
    redis: Redis, settings: Settings, receiver: FlakyReceiver, expected: set[str]
) -> Verdict:
    records = await all_records(redis, settings, PROJECT, receiver.url("/hook"), "BUILD_END")
    return await judge(redis, records, expected, receiver, settings)


async def test_master_killed_under_emits_and_two_workers_loses_nothing_acknowledged(
    group: SentinelGroup, tmp_path: Path
) -> None:
    """SIGKILL the master while the API process and a Python producer emit and two worker
    processes deliver: the sentinels promote the replica within seconds, every process finds
    it by itself, every acknowledged event is delivered and recorded, none dies."""
    settings = make_settings(group.url, redis_min_replicas=1, emit_wait=2, redis_timeout=2)
    receiver = FlakyReceiver(max_delay=0.05)
    port, log = free_port(), tmp_path / "processes.log"
    async with serving(receiver):
        redis, callback_id = await fresh(settings, receiver)
        processes = start_fleet(group.url, port, log)
        try:
            await until(lambda: fleet_up(redis, port), 60, "two workers and the API up")
            over_http, in_python, killed = await asyncio.gather(
                emit_over_http(port, 40, every_s=0.1),
                emit_in_python(settings, redis, 40, every_s=0.2),
                kill_the_master(group, after_s=1.5),
            )
            expected = {f"{PROJECT}:{event_id}.{callback_id}" for event_id in over_http + in_python}
            assert len(expected) == 80

            async def delivered() -> bool:
                verdict = await verdict_on(redis, settings, receiver, expected)
                return not (verdict.lost or verdict.abandoned)

            await until(delivered, 40, "every acknowledged event delivered")
            (await verdict_on(redis, settings, receiver, expected)).assert_nothing_lost()
            after = [a for a in receiver.answers if a.arrived_ms > killed]
            assert len(after) >= 10, "deliveries did not resume after the failover"
            assert [p.poll() for p in processes] == [None] * 3, died(log)
        finally:
            for process in processes:
                stop(process)
            await redis.aclose()


async def emit_builds(settings: Settings, redis: Redis, builds: int, steps: int) -> list[str]:
    """Every build's steps in order, the builds interleaved (one `emit_many` per step, sent
    again until acknowledged); returns the event ids."""
    producer, acked = Producer(settings, redis), []
    for step in range(steps):
        batch: list[Emit] = [
            (PROJECT, "BUILD_END", {"buildId": f"b{b}", "step": step}, f"o{step}-{b}")
            for b in range(builds)
        ]
        for _ in range(100):
            try:
                acked += await producer.emit_many(batch)
                break
            except Unavailable:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.15)
    return acked


async def test_ordered_lanes_keep_their_order_through_a_failover(
    group: SentinelGroup, tmp_path: Path
) -> None:
    """An ordered callback (`orderBy=buildId`) gets builds emitted interleaved while the
    master is SIGKILLed and the replica promoted: every build's first successful arrivals
    are in emit order, and every acknowledged event is delivered and recorded."""
    settings = make_settings(group.url, redis_min_replicas=1, emit_wait=2, redis_timeout=2)
    receiver = FirstFails(max_delay=0.02, seed=19)  # each delivery's first attempt fails
    port, log = free_port(), tmp_path / "processes.log"
    async with serving(receiver):
        redis = connect(settings)
        await redis.flushdb()
        callback_id, _ = await Registry(redis).create(
            PROJECT, receiver.url("/ordered"), Event.BUILD_END, Region.DEVNET,
            options=Options(order_by="buildId"),
        )  # fmt: skip
        # every first attempt fails: after the failover's pause, ten in a row would open the
        # host's breaker (its cooldown, 30 s, holds every lane: by design, not this test's)
        schedule, threshold = "[0.1, 0.3, 1]", "100000"
        processes = start_fleet(
            group.url,
            port,
            log,
            DISPATCHER_RETRY_SCHEDULE=schedule,
            DISPATCHER_CIRCUIT_THRESHOLD=threshold,
        )
        try:
            await until(lambda: fleet_up(redis, port), 60, "two workers and the API up")
            emitted, _ = await asyncio.gather(
                emit_builds(settings, redis, builds=8, steps=8), kill_the_master(group, 1.0)
            )
            expected = {f"{PROJECT}:{event_id}.{callback_id}" for event_id in emitted}
            assert len(expected) == 64
            url = receiver.url("/ordered")

            async def verdict() -> Verdict:
                records = await all_records(redis, settings, PROJECT, url, "BUILD_END")
                return await judge(redis, records, expected, receiver, settings)

            async def delivered() -> bool:
                now = await verdict()
                return not (now.lost or now.abandoned)

            await until(delivered, 40, "every acknowledged event delivered")
            (await verdict()).assert_nothing_lost()
            assert receiver.out_of_order("/ordered") == []
            assert [p.poll() for p in processes] == [None] * 3, died(log)
        finally:
            for process in processes:
                stop(process)
            await redis.aclose()


async def test_replica_down_emits_answer_503_in_time_and_nothing_acknowledged_is_lost(
    group: SentinelGroup,
) -> None:
    """With the replica gone, an emit (Python, HTTP) answers 503 within
    `DISPATCHER_EMIT_WAIT`; deliveries go on; once it is back, the same event ids are
    taken, and every acknowledged event is delivered."""
    settings = make_settings(group.url, redis_min_replicas=1, emit_wait=1)
    receiver = FlakyReceiver()
    async with serving(receiver):
        redis, callback_id = await fresh(settings, receiver)
        try:
            producer = Producer(settings, redis)
            patient = Producer(settings.model_copy(update={"emit_wait": 10}), redis)
            # before the fault, acknowledged once the replica has it, however loaded the
            # machine (a 1 s wait was missed once with other suites running beside it)
            before = await patient.emit_many([(PROJECT, "BUILD_END", {}) for _ in range(20)])
            (replica,) = [p for p in group.nodes if p != group.master_port()]
            group.signal(replica, signal.SIGKILL)
            down: list[Emit] = [(PROJECT, "BUILD_END", {}, f"evt_down_{n}") for n in range(20)]
            started = time.monotonic()
            with pytest.raises(Unavailable, match="0 of 1 replicas"):
                await producer.emit_many(down)
            async with app_client(settings, redis) as api:
                answer = await api.post(EMITS, headers=UID, json={"event": "BUILD_END"})
            assert answer.status_code == 503 and "same event ids" in answer.json()["message"]
            assert time.monotonic() - started < 2 * (1 + 0.5)  # two emits, each within the wait
            worker = create_worker(settings, burst=True, handle_signals=False)
            try:  # the worker's writes do not wait for replicas: deliveries go on
                await asyncio.wait_for(worker.main(), 30)
            finally:
                await worker.close()
            # (a refused emit may be delivered too: the master has it, unconfirmed)
            assert {f"{PROJECT}:{e}.{callback_id}" for e in before} <= receiver.answered_2xx()
            await asyncio.to_thread(group.heal)
            after = await producer.emit_many(down)
            assert after == [event_id for *_, event_id in down]
        finally:
            await redis.aclose()


async def test_with_0_replicas_an_unreplicated_acknowledged_emit_is_lost_with_1_none_is(
    group: SentinelGroup,
) -> None:
    """What `DISPATCHER_REDIS_MIN_REPLICAS=0` means: the replica falls behind (paused, its
    link cut), the master acknowledges events it alone holds, and dies: the replica the
    sentinels promote never had them. With 1, the same emits answered 503 instead, and,
    emitted again after the failover, they are there."""
    master = group.heal()
    (replica,) = [p for p in group.nodes if p != master]
    lax = make_settings(group.url, redis_min_replicas=0)
    strict = make_settings(group.url, redis_min_replicas=1, emit_wait=0.3)
    redis = connect(lax)
    old = Redis(host="127.0.0.1", port=master)
    try:
        await redis.flushdb()
        group.signal(replica, signal.SIGSTOP)
        await old.client_kill_filter(_type="slave")  # redis-py says slave
        zero: list[Emit] = [(PROJECT, "BUILD_END", {}, f"evt_zero_{n}") for n in range(10)]
        one: list[Emit] = [(PROJECT, "BUILD_END", {}, f"evt_one_{n}") for n in range(10)]
        acknowledged = await Producer(lax, redis).emit_many(zero)
        jobs = [keys.arq_job(project_scoped(PROJECT, e)) for e in acknowledged]
        assert await old.exists(*jobs) == len(jobs)  # the master holds them, alone
        with pytest.raises(Unavailable, match="0 of 1 replicas"):
            await Producer(strict, redis).emit_many(one)
        group.signal(master, signal.SIGKILL)  # before the replica may catch up
        group.signal(replica, signal.SIGCONT)
        assert await asyncio.to_thread(group.wait_for_new_master, master) == replica
        await asyncio.to_thread(group.heal)  # the old master back as a replica
        patient = strict.model_copy(update={"emit_wait": 10})
        try:
            await Producer(patient, redis).emit_many(one)  # the 503 said: emit again
        except Unavailable as exc:  # seen once in CI, not since: say what the nodes say
            raise AssertionError(f"{exc}\n{await asyncio.to_thread(group.report)}") from exc
        queued = {
            m.decode().removeprefix(f"{PROJECT}:")
            for m in await redis.zrange(lax.queue_name, 0, -1)
        }
        assert not queued & set(acknowledged), "expected the unreplicated events to be lost"
        assert {event_id for *_, event_id in one} <= queued
        assert not await redis.exists(*jobs)
    finally:
        await old.aclose()
        await redis.aclose()


UNACKNOWLEDGED: tuple[type[Exception], ...] = (Unavailable, *REDIS_ERRORS)  # a 503


async def test_callbacks_deleted_through_a_planned_failover_stay_deleted(
    group: SentinelGroup,
) -> None:
    """`DISPATCHER_REDIS_MIN_REPLICAS=1`: callbacks deleted one after the other through
    `Services` (what the API, the console and the CLI call) while an operator runs
    `SENTINEL FAILOVER`: none whose deletion returned is back on the new master. A deletion
    made on the old master after the promotion is refused (its replica is now the master:
    none confirms it); it returned, and came back with the failover (review)."""
    old = group.master_port()
    settings = make_settings(group.url, redis_min_replicas=1, redis_timeout=1, emit_wait=1)
    redis = connect(settings)
    await redis.flushdb()
    registry = Registry(redis)
    ids = [
        (await registry.create(PROJECT, f"https://e.com/{n}", Event.BUILD_END, Region.DEVNET))[0]
        for n in range(1500)
    ]
    await asyncio.to_thread(group.wait_for_replicas, 1)
    deleted: list[int] = []
    refused = 0

    async def deleting(services: Services) -> None:
        nonlocal refused
        for callback_id in ids:
            try:
                await services.delete(callback_id, PROJECT)
                deleted.append(callback_id)
            except UNACKNOWLEDGED:
                refused += 1
            await asyncio.sleep(0.003)

    async with Services.open(settings, redis) as services:
        task = asyncio.create_task(deleting(services))
        try:
            await asyncio.sleep(0.5)
            sentinel = Redis(host="127.0.0.1", port=next(iter(group.sentinels)), socket_timeout=2)
            try:
                await sentinel.execute_command("SENTINEL", "FAILOVER", group.name)  # type: ignore[no-untyped-call]
            finally:
                await sentinel.aclose()
            await asyncio.to_thread(group.wait_for_new_master, old)
            await asyncio.to_thread(group.heal)  # the old master a replica again
        finally:
            await task
    try:
        held = [c for c in deleted if await redis.exists(keys.callback(c))]
    finally:
        await redis.aclose()
    assert deleted and not held, f"{len(held)} of {len(deleted)} deleted callbacks are back"
    assert refused < len(ids) // 2, refused


async def test_a_record_written_on_the_new_master_before_the_shipper_switched_is_shipped(
    group: SentinelGroup, pg_url: str
) -> None:
    """PostgreSQL history through a failover whose old master stays up (an operator's
    `SENTINEL FAILOVER`; a master cut off from the sentinels, or paused, that resumes):
    processes follow the switch at different moments. A worker that switched records r1 on
    the new master; a moment later one that has not yet records r2 on the old; the
    shipper's process, not switched either, ships r2 (its watermark now past r1's id), then
    its pool follows the switch (modelled by giving the same Shipper the new master's
    client). It skipped r1 and trimmed it away unstored: a delivery without its record.
    Now the node behind the stream changed, so it reads the stream again from its start."""
    old = group.master_port()
    settings = make_settings(group.url, history_url=pg_url)
    on_old = Redis(host="127.0.0.1", port=old, socket_timeout=2)
    await on_old.flushdb()
    await asyncio.to_thread(group.wait_for_replicas, 1)
    shipper = Shipper(on_old, settings, elect=False)
    hist_old = open_history(settings, on_old, keys)
    clients: list[Redis] = [on_old]
    rec = {"projectId": PROJECT, "callBackUrl": "http://127.0.0.1:9/h", "events": "BUILD_END",
           "status": "SUCCESS", "deliveryId": "evt.1"}  # fmt: skip

    def attempt(n: int) -> AttemptRecord:
        return {**rec, "createdTime": now_ms(), "deliveryId": f"evt_{n}.1"}  # type: ignore[typeddict-item]

    try:
        await shipper.open()
        ids = [await hist_old.add(attempt(0))]
        assert await shipper.ship_once() == 1
        await asyncio.to_thread(group.wait_for_replicas, 1)  # r0 on the replica too
        sentinel = Redis(host="127.0.0.1", port=next(iter(group.sentinels)), socket_timeout=2)
        await sentinel.execute_command("SENTINEL", "FAILOVER", group.name)  # type: ignore[no-untyped-call]
        await sentinel.aclose()
        new = await asyncio.to_thread(group.wait_for_new_master, old)
        clients.append(on_new := Redis(host="127.0.0.1", port=new, socket_timeout=2))
        hist_new = open_history(settings, on_new, keys)
        ids.append(await hist_new.add(attempt(1)))  # a worker that switched
        await asyncio.sleep(0.01)
        ids.append(await hist_old.add(attempt(2)))  # one that has not yet
        with capture_logs() as logs:
            assert await shipper.ship_once() == 1  # r2, from the old master
            shipper.redis = on_new  # its pool follows the switch
            ids.append(await hist_new.add(attempt(3)))
            assert await shipper.drain() == 2  # r1 and r3
        assert [e["now"] for e in logs if e["event"] == "history.ship_node_changed"]
        assert await on_new.xlen(keys.HISTORY_STREAM) == 0  # trimmed once stored
        await hist_new.close()
        conn = await asyncpg.connect(pg_url)
        try:
            stored = [r["id"] for r in await conn.fetch("SELECT id FROM history_attempts")]
        finally:
            await conn.close()
        assert sorted(stored) == sorted(ids), "every record stored, none twice"
    finally:
        await shipper.close()
        await hist_old.close()
        for client in clients:
            await client.aclose()
        await asyncio.to_thread(group.heal)  # the old master a replica again
