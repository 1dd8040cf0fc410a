"""The PostgreSQL history under faults, with real worker processes and a real PostgreSQL of
the test's own: a worker SIGKILLed after its attempts and before their shipment,
PostgreSQL frozen (SIGSTOP, every process of it) for 20 s under load, and the shipper that
holds the ship lock frozen (SIGSTOP) beside a standby one."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import FAST, EmbeddedPostgres
from dispatcher.history import open_history
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.status import live_workers
from tests.helpers import Receiver, make_settings, on_postgres, start_worker, until

keys = Keys()  # today's key names (one shard)

pytestmark = pytest.mark.timeout(150)

SHIPPING = {"DISPATCHER_HISTORY_TIMEOUT": "1", "DISPATCHER_LOG_LEVEL": "INFO"}


@pytest.fixture
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL this test may freeze, migrated."""
    with EmbeddedPostgres(settings=FAST) as server:
        on_postgres(server.url, "upgrade")
        yield server


def event_of(delivery_id: str) -> str:
    """The event id in a delivery id, `{project}:{event id}.{callback id}`."""
    return delivery_id.rsplit(".", 1)[0].partition(":")[2]


async def stored_rows(url: str) -> list[tuple[int, str, str]]:
    """(id, delivery id, status) of every stored attempt."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, delivery_id, doc::json->>'status' AS status FROM history_attempts"
        )
    finally:
        await conn.close()
    return [(r["id"], r["delivery_id"], r["status"]) for r in rows]


async def test_a_record_survives_a_worker_sigkill_between_the_attempt_and_the_shipment(
    settings: Settings, redis: Redis, receiver: Receiver, own_pg: EmbeddedPostgres,
    workers: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    url = receiver.url("/hook")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    ids = await Producer(settings, redis).emit_many(
        [("demo", "BUILD_END", {"n": i}) for i in range(20)]
    )
    log, env = tmp_path / "workers.log", {**SHIPPING, "DISPATCHER_HISTORY_URL": own_pg.url}
    own_pg.signal(signal.SIGSTOP)  # the worker's shipper cannot ship what it records
    try:
        workers.append(start_worker(settings.redis_url or "", log, **env))
        await receiver.wait_for(20, within=30)

        async def all_in_the_stream() -> bool:
            return int(await redis.xlen(keys.HISTORY_STREAM)) >= 20

        await until(all_in_the_stream, 10, "the 20 records appended to the stream")
        workers[0].kill()
        workers[0].wait(timeout=5)
    finally:
        own_pg.signal(signal.SIGCONT)
    assert await stored_rows(own_pg.url) == []  # shipped nothing: all of it waits in Redis

    workers.append(start_worker(settings.redis_url or "", log, **env))

    async def all_shipped() -> bool:
        return len(await stored_rows(own_pg.url)) >= 20

    await until(all_shipped, 30, "the next worker shipped the killed one's records")
    rows = await stored_rows(own_pg.url)
    assert len(rows) == 20 and len({r[0] for r in rows}) == 20  # each once
    assert {r[1] for r in rows} == {f"demo:{event_id}.1" for event_id in ids}
    assert {r[2] for r in rows} == {"SUCCESS"}
    assert await redis.xlen(keys.HISTORY_STREAM) == 0  # trimmed once committed


async def test_postgres_stopped_for_20_s_under_load_loses_no_record_and_delays_none(
    settings: Settings, redis: Redis, receiver: Receiver, own_pg: EmbeddedPostgres,
    workers: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """Two workers, 10 events a second for 30 s; PostgreSQL frozen from second 5 to 25:
    deliveries go on meanwhile (each within seconds of its event), the records wait in
    Redis, and once PostgreSQL is back every one of them is stored, once."""
    url = receiver.url("/hook")
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    log, env = tmp_path / "workers.log", {**SHIPPING, "DISPATCHER_HISTORY_URL": own_pg.url}
    workers += [start_worker(settings.redis_url or "", log, **env) for _ in range(2)]

    async def both_up() -> bool:
        return len(await live_workers(redis, keys)) == 2

    await until(both_up, 30, "two workers started")
    producer = Producer(settings, redis)
    emitted: dict[str, float] = {}  # event id -> when
    started = time.monotonic()
    frozen = (started + 5, started + 25)

    async def outage() -> int:
        """PostgreSQL frozen from second 5 to 25; returns the backlog just before."""
        await asyncio.sleep(frozen[0] - time.monotonic())
        own_pg.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(frozen[1] - time.monotonic())
            return int(await redis.xlen(keys.HISTORY_STREAM))
        finally:
            own_pg.signal(signal.SIGCONT)

    async def emit() -> None:
        for n in range(300):
            await asyncio.sleep(max(0.0, started + n / 10 - time.monotonic()))
            emitted[await producer.emit("demo", "BUILD_END", {"n": n})] = time.monotonic()

    backlog_seen, _ = await asyncio.gather(outage(), emit())
    await receiver.wait_for(300, within=30)
    assert all(w.poll() is None for w in workers), log.read_text()[-3000:]
    # deliveries did not wait for PostgreSQL: what was emitted during the outage arrived
    # during the outage (each within 5 s of its event)
    arrived = {event_of(s.headers["X-DEVOPS-DELIVERY-ID"]): s.at for s in receiver.requests()}
    during = [e for e, at in emitted.items() if frozen[0] + 1 <= at <= frozen[1] - 5]
    assert during and all(arrived[e] - emitted[e] < 5 for e in during)
    assert backlog_seen > 100  # the records waited in Redis meanwhile

    async def all_stored() -> bool:
        return len(await stored_rows(own_pg.url)) >= 300

    await until(all_stored, 15, "every record shipped soon after PostgreSQL was back")
    rows = await stored_rows(own_pg.url)
    assert len(rows) == 300 and len({r[0] for r in rows}) == 300
    assert {event_of(r[1]) for r in rows} == set(emitted)


# A shipper of its own, its session closed by the server past IDLE_S idle.
IDLE_S = 4.0
SHIPPER = f"""
import asyncio, sys
from redis.asyncio import Redis
from dispatcher.history.shipper import Shipper
from dispatcher.settings import Settings
settings = Settings(redis_url=sys.argv[1], history_url=sys.argv[2])
asyncio.run(Shipper(Redis.from_url(sys.argv[1]), settings, idle_s={IDLE_S}).run())
"""


async def sessions(url: str) -> tuple[int, int]:
    """The shippers' sessions, and the advisory locks held."""
    conn = await asyncpg.connect(url)
    try:
        return (
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'callback-dispatcher'"
            ),
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            ),
        )
    finally:
        await conn.close()


async def test_a_frozen_shipper_loses_its_lock_to_a_standby_and_ships_nothing_when_back(
    settings: Settings, redis: Redis, own_pg: EmbeddedPostgres,
    workers: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:  # fmt: skip
    """The shipper holding the ship lock is frozen (SIGSTOP: a hung loop, a paused VM; its
    kernel still answers TCP keepalives): its session, idle, is closed by the server, which
    frees the lock, and the standby ships. It used to keep the lock for ever: nothing was
    stored, and at the backlog limit every worker stopped claiming. Resumed, the old
    leader finds its connection gone and stands by."""
    history = open_history(make_settings(settings.redis_url or "", history_url=own_pg.url),
                           redis, keys)  # fmt: skip
    now = now_ms()
    rec = {"projectId": "demo", "callBackUrl": "http://127.0.0.1:9/h", "events": "BUILD_END",
           "status": "SUCCESS", "createdTime": now, "deliveryId": "evt.1"}  # fmt: skip

    async def add(n: int) -> None:
        await history.add({**rec, "createdTime": now + n, "deliveryId": f"evt_{n}.1"})  # type: ignore[typeddict-item]

    def shipper() -> subprocess.Popen[bytes]:
        with (tmp_path / "shippers.log").open("ab") as out:
            args = [sys.executable, "-c", SHIPPER, settings.redis_url or "", own_pg.url]
            return subprocess.Popen(args, stdout=out, stderr=out)

    def stored(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(await stored_rows(own_pg.url)) >= n

        return check

    workers.append(leader := shipper())
    await add(1)
    await until(stored(1), 30, "the first shipper ships")
    workers.append(shipper())

    async def both_connected() -> bool:
        return (await sessions(own_pg.url)) == (2, 1)

    await until(both_connected, 30, "the second shipper stands by")
    leader.send_signal(signal.SIGSTOP)
    try:
        for n in range(2, 12):
            await add(n)
        await until(stored(11), 6 * IDLE_S, "the standby took the lock and shipped")
    finally:
        leader.send_signal(signal.SIGCONT)
    await add(12)
    await until(stored(12), 6 * IDLE_S, "shipping goes on with the old leader back")
    assert leader.poll() is None, (tmp_path / "shippers.log").read_text()[-3000:]
    assert (await sessions(own_pg.url))[1] == 1  # one leader
    rows = await stored_rows(own_pg.url)
    assert len(rows) == 12 and len({r[0] for r in rows}) == 12
    await history.close()
