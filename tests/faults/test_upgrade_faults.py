"""Start-up and upgrade under way, on real servers: a cluster with a node down or a replica
that would evict keys (the start-up check asks every node), and PostgreSQL history's
version 5 run on a table of 200,000 pairs while an older version reads and writes it.
A version 8 build held for seconds while this version ships and reads. They start several
servers, load a table or hold a migration: the fault tier's, out of the fast loop."""

from __future__ import annotations

import asyncio
from hashlib import md5
from pathlib import Path

import asyncpg
import pytest
import redis as redis_py
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.connections import preflight
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidSetting
from dispatcher.history import schema
from dispatcher.history.postgres import PostgresHistory
from dispatcher.history.schema import DAY_MS, ensure_partitions, schema_version, upgrade
from dispatcher.history.shipper import Shipper
from tests.cluster import LocalCluster
from tests.helpers import make_settings, until
from tests.service.test_embedded_redis import _evicting
from tests.service.test_history_postgres import URL, at_version_4, fresh_db, keys, record

__all__ = ["fresh_db"]  # the fixture, imported to be found here


def test_a_cluster_node_that_does_not_answer_is_named_in_a_warning(tmp_path: Path) -> None:
    """Each node of a cluster is asked (masters and replicas); one that does not answer is
    a warning naming it, and the others are checked all the same (review: any node down
    and the check passed in silence, checking none)."""
    cluster = LocalCluster(tmp_path)
    try:
        url = cluster.start()
        cluster.kill(2)  # (not the first: redis-py's client cannot start without it)
        (warning,) = asyncio.run(preflight(make_settings(url)))
        down = f"127.0.0.1:{cluster.ports[2]}"
        assert warning.startswith(f"node {down} of {url} did not answer"), warning
        assert "maxmemory-policy not checked" in warning
        _evicting(redis_py.Redis(port=cluster.ports[1]), "allkeys-lru")
        with pytest.raises(InvalidSetting, match="maxmemory-policy allkeys-lru"):
            asyncio.run(preflight(make_settings(url)))
    finally:
        cluster.stop()


def test_a_cluster_replica_that_would_evict_keys_stops_every_process(tmp_path: Path) -> None:
    """The replicas of a cluster are asked too (a failover makes one a master): one under
    `allkeys-lru` with a limit is refused like a master."""
    cluster = LocalCluster(tmp_path, masters=1)
    try:
        url = cluster.start()
        _evicting(redis_py.Redis(port=cluster.add_replica()), "allkeys-lru")
        with pytest.raises(InvalidSetting, match="maxmemory-policy allkeys-lru"):
            asyncio.run(preflight(make_settings(url)))
    finally:
        cluster.stop()


async def test_version_5_never_holds_pair_lookups_or_inserts_for_long(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5 hashed every pair in one transaction (ALTER TABLE, an UPDATE of every
    row, SET NOT NULL, a unique constraint and an index, none concurrent): the table was
    locked throughout, and a lookup of a pair waited 21 s on 1,000,000 pairs (tmpfs; every
    history read a 503 meanwhile), an hour's statement cap away from rolled back and
    started again at every start (review). It runs as version 4 does, step by step: the
    locks it takes are held for catalog changes only, the rows hashed in committed batches,
    the indexes built CONCURRENTLY. On 200,000 pairs (the old migration held the table
    ~4 s here), an older version's lookups by URL and its inserts of new pairs go on
    throughout; each may take 2 s, a bound no lookup of an indexed pair reaches unless
    held by a lock (far above a loaded machine's jitter, far below the old hold)."""
    await at_version_4(fresh_db, 200_000, monkeypatch)
    reader = await asyncpg.connect(fresh_db, server_settings={"statement_timeout": "2000"})
    migrating = await asyncpg.connect(fresh_db)
    done = asyncio.Event()
    lookups = 0

    async def look_up() -> None:
        nonlocal lookups
        while not done.is_set():
            n, g = lookups, lookups * 7 % 200_000 + 1  # one of those stored before
            url = (
                f"https://hooks.example-{g % 500}.com/callbacks/{md5(str(g).encode()).hexdigest()}"
            )
            assert await reader.fetchval(
                "SELECT pair_id FROM history_pairs WHERE project_id = $1 AND event = $2"
                " AND url = $3", f"p{g % 500}", "BUILD_END", f"{url}?tenant={g}",
            ) is not None  # fmt: skip
            await reader.execute(  # a pair an older worker's shipper adds meanwhile
                "INSERT INTO history_pairs (project_id, event, url) VALUES ($1, 'BUILD_END', $2)"
                " ON CONFLICT DO NOTHING", "new", f"http://new/{n}",
            )  # fmt: skip
            lookups += 1
            await asyncio.sleep(0.01)

    try:
        looking = asyncio.create_task(look_up())
        await asyncio.sleep(0.2)
        try:
            assert await upgrade(migrating) == [v for v, _ in schema.MIGRATIONS[4:]]
        finally:
            done.set()
            await looking  # a lookup held past 2 s raises QueryCanceledError here
        assert lookups > 10
        assert await migrating.fetchval(
            "SELECT count(*) FROM history_pairs WHERE url_hash = history_url_hash(url)"
        ) == 200_000 + lookups  # fmt: skip
    finally:
        await reader.close()
        await migrating.close()


# A build CONCURRENTLY waiting for the transactions older than it (a snapshot held).
_BUILD_WAITING = """
SELECT count(*) FROM pg_stat_progress_create_index
 WHERE command = 'CREATE INDEX CONCURRENTLY' AND phase LIKE 'waiting for%'
"""


async def test_this_version_ships_and_reads_while_version_8_builds_its_index(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 8 only adds an index, built CONCURRENTLY day by day so that inserts go on,
    and may run for hours. This version's shipper and reads required the latest version,
    8: while the build ran (here held by a long REPEATABLE READ transaction, as pg_dump or a
    report holds one) nothing shipped, reads answered 503, and records piled up in Redis up
    to the backlog limit, where every worker stops claiming (review). Each version states
    the lowest version its statements need (`schema.NEEDS`: 8 needs 7): the records ship
    and are read during the build, and the upgrade still ends at version 8."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:7])
    conn = await asyncpg.connect(fresh_db)
    assert await upgrade(conn) == [1, 2, 3, 4, 5, 6, 7]
    monkeypatch.undo()
    assert schema.needed() == 7
    now = now_ms()
    await ensure_partitions(conn, now - DAY_MS, now + DAY_MS)
    snapshot, watch = await asyncpg.connect(fresh_db), await asyncpg.connect(fresh_db)
    await snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    await snapshot.fetchval("SELECT count(*) FROM history_shipped")  # the snapshot taken
    migrating = asyncio.create_task(upgrade(conn))
    settings = make_settings(redis_server.url, history_url=fresh_db)
    history = PostgresHistory(redis, settings, keys)
    stop = asyncio.Event()
    shipper = Shipper(redis, settings, elect=False, stop=stop)
    running = asyncio.create_task(shipper.run(drain_on_stop=False))
    try:

        async def building() -> bool:
            return bool(await watch.fetchval(_BUILD_WAITING))

        await until(building, 20, "version 8's build waits for the snapshot")
        ids = [await history.add(record(now - 1000 + n, n)) for n in range(50)]

        async def stored() -> bool:
            return int(await watch.fetchval("SELECT count(*) FROM history_attempts")) == 50

        await until(stored, 20, "the records shipped while version 8 builds")
        page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
        assert page.count == 50 and page.records[0].id == ids[-1]
        assert await redis.xlen(keys.HISTORY_STREAM) == 0
        assert not migrating.done() and await building()  # all of it during the build
        assert await schema_version(watch) == 7
        await snapshot.execute("ROLLBACK")
        assert await asyncio.wait_for(migrating, 60) == [8]
        assert await schema_version(watch) == 8
    finally:
        stop.set()
        await running
        await history.close()
        if not migrating.done():
            await snapshot.execute("ROLLBACK")
            await asyncio.wait_for(migrating, 60)
        for c in (snapshot, watch, conn):
            await c.close()
