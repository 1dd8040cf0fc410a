"""Start-up and upgrade under way, on real servers: a cluster with a node down or a replica
that would evict keys (the start-up check asks every node), and PostgreSQL history's
version 5 run on a table of 200,000 pairs while an older version reads and writes it.
They start several servers or load a table: the fault tier's, out of the fast loop."""

from __future__ import annotations

import asyncio
from hashlib import md5
from pathlib import Path

import asyncpg
import pytest
import redis as redis_py

from dispatcher.connections import preflight
from dispatcher.errors import InvalidSetting
from dispatcher.history import schema
from dispatcher.history.schema import upgrade
from tests.cluster import LocalCluster
from tests.helpers import make_settings
from tests.service.test_embedded_redis import _evicting
from tests.service.test_history_postgres import at_version_4, fresh_db

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
