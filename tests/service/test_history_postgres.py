"""What only the PostgreSQL history has: migrations, day partitions and their retention, the
shipper's idempotence, the exact count against a brute-force read, `dispatcher db upgrade`
and `dispatcher history migrate`, an unreachable database, and the backlog bound. (The
contract shared with the Redis store is in tests/service/test_history.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from structlog.testing import capture_logs
from typer.testing import CliRunner

from dispatcher import clock
from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.embedded import FAST, EmbeddedPostgres, EmbeddedRedis
from dispatcher.errors import Unavailable
from dispatcher.history import online, open_history, schema
from dispatcher.history.entries import read_entries
from dispatcher.history.loader import Loader, parse_row
from dispatcher.history.postgres import PostgresHistory
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.history.schema import DAY_MS, ensure_partitions, partitions, upgrade
from dispatcher.history.shipper import Shipper
from dispatcher.history.stream import stream_fields
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import DeliveryStatus, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker import backlog_bytes
from dispatcher.worker.shipping import Shipping
from tests.helpers import (
    UID,
    Receiver,
    RunWorker,
    answer,
    app_client,
    free_port,
    make_settings,
    ship_all,
    until,
)

keys = Keys()  # today's key names (one shard)

URL = "http://127.0.0.1:9000/hook"
# Another client's script: Redis answers BUSY past lua-time-limit, until SCRIPT KILL
SPIN_UNTIL_KILLED = "while true do end"
KEPT = '{"log": "' + "x" * 2_000 + '"}'  # a body the Redis store keeps once (history.kept)


def record(created: int, n: int, **extra: Any) -> AttemptRecord:
    return {  # `extra`: fields overridden
        "projectId": "demo", "callBackUrl": URL, "events": "BUILD_END", "status": "SUCCESS",
        "errorMsg": None, "requestHeaders": [], "requestBody": f'{{"n": {n}}}',
        "responseCode": 200, "responseBody": "ok", "startTime": created - 5,
        "endTime": created, "createdTime": created, "attempt": 1, "deliveryId": f"evt_{n}.1",
        **extra,  # type: ignore[typeddict-item]
    }  # fmt: skip


@pytest.fixture
async def fresh_db(pg_server: EmbeddedPostgres) -> AsyncIterator[str]:
    """A database of its own (empty: no schema), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.url_of(name)
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture
def pg_settings(redis_server: EmbeddedRedis, pg_url: str) -> Settings:
    return make_settings(redis_server.url, history_url=pg_url)


async def catalog(conn: asyncpg.Connection) -> list[Any]:
    """Every relation, index and function of the public schema, with its definition."""
    return [
        tuple(r)
        for r in await conn.fetch(
            """SELECT c.relname, c.relkind, coalesce(pg_get_indexdef(c.oid), '')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'public'
               UNION ALL
               SELECT p.proname, 'f', pg_get_functiondef(p.oid)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'public'
                ORDER BY 1, 2"""
        )
    ]


async def test_migrations_run_twice_are_a_no_op(fresh_db: str, pg_server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await upgrade(conn) == [1, 2, 3, 4, 5, 6, 7, 8]
        before = await catalog(conn)
        assert await upgrade(conn) == []
        assert await catalog(conn) == before
        # at once from three sessions (every process may run it at start): applied once
        await conn.execute("DROP TABLE history_pairs, history_attempts, history_counts,"
                           " history_shipped, history_set_aside, history_schema"
                           " CASCADE")  # fmt: skip
        await conn.execute("DROP FUNCTION history_locate, history_minute_of, history_url_hash,"
                           " history_pairs_hashed")  # fmt: skip
        sessions = [await asyncpg.connect(fresh_db) for _ in range(3)]
        results = await asyncio.gather(*(upgrade(s) for s in sessions))
        assert sorted(results) == [[], [], [1, 2, 3, 4, 5, 6, 7, 8]]
        assert await catalog(conn) == before
        for session in sessions:
            await session.close()
    finally:
        await conn.close()


async def test_version_4_builds_each_day_partitions_index_and_goes_on_after_a_crash(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's failures index is built partition by partition, CONCURRENTLY and
    outside a transaction (a build over the whole history held the shipper's inserts): on
    a history at version 3 with day partitions, each gets its index attached and the
    parent's is valid. A run a crash stopped goes on: the parent made alone (invalid), a
    day's build finished but not attached (attached as it is), a day's build stopped or
    failed (invalid: made again), and an index of that name that is not this one (made
    again). A day made after has its own; three sessions at once apply it once."""
    conn = await asyncpg.connect(fresh_db)
    try:
        monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
        assert await upgrade(conn) == [1, 2, 3]
        now = now_ms()
        await ensure_partitions(conn, now - 2 * DAY_MS, now + DAY_MS)
        made_days = await partitions(conn)
        days = [(n, low) for n, low, _ in made_days if n.startswith("history_attempts_")]
        assert len(days) == 4
        monkeypatch.undo()
        (failed_day, low), (stopped_day, _), (finished_day, _), (other_day, _) = days
        await conn.execute(  # the crash's state: the parent alone, then three days' leftovers
            "CREATE INDEX history_attempts_project_failed ON ONLY history_attempts"
            " (project_id, created_ms DESC, id DESC) WHERE failed"
        )
        await conn.execute(
            f'CREATE INDEX "{finished_day}_project_failed" ON "{finished_day}"'
            " (project_id, created_ms DESC, id DESC) WHERE failed"
        )
        finished = await conn.fetchval("SELECT $1::regclass::oid", f"{finished_day}_project_failed")
        await conn.execute(f'CREATE INDEX "{other_day}_project_failed" ON "{other_day}" (id)')
        await conn.execute(  # a build stopped (killed) before its end: invalid, as it would be
            f'CREATE INDEX "{stopped_day}_project_failed" ON "{stopped_day}"'
            " (project_id, created_ms DESC, id DESC) WHERE failed"
        )
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass",
            f"{stopped_day}_project_failed",
        )
        for n in range(2):  # a build that fails half-way leaves its index invalid
            await conn.execute(
                "INSERT INTO history_attempts (id, created_ms, pair_id, project_id, dead, doc)"
                " VALUES ($1, $2, 1, 'p', false, '{}')", n, low + 1,
            )  # fmt: skip
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                f'CREATE UNIQUE INDEX CONCURRENTLY "{failed_day}_project_failed"'
                f' ON "{failed_day}" (project_id)'
            )
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass"
        assert not await conn.fetchval(valid, f"{failed_day}_project_failed")
        assert not await conn.fetchval(valid, "history_attempts_project_failed")

        unindexed = (online.UNINDEXED_SQL, "history_attempts_project_failed")
        assert await upgrade(conn) == [4, 5, 6, 7, 8]
        assert await conn.fetch(*unindexed) == []
        assert await conn.fetchval(valid, "history_attempts_project_failed")
        for day in (failed_day, stopped_day, other_day):
            made = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1",
                                       f"{day}_project_failed")  # fmt: skip
            assert made.endswith("(project_id, created_ms DESC, id DESC) WHERE failed"), made
        assert (
            await conn.fetchval("SELECT $1::regclass::oid", f"{finished_day}_project_failed")
            == finished
        )  # attached as it was, not built again
        await ensure_partitions(conn, now + 2 * DAY_MS, now + 2 * DAY_MS)
        assert await conn.fetch(*unindexed) == []  # a day made after: its own
        assert await upgrade(conn) == []
        # again from three sessions at once, the others waiting for the lock while one
        # builds: a session waiting inside a statement held a snapshot that CONCURRENTLY
        # waits for, while it waited for the lock (a deadlock)
        await conn.execute("DROP INDEX history_attempts_project_failed")
        await conn.execute("DELETE FROM history_schema WHERE version = 4")
        sessions = [await asyncpg.connect(fresh_db) for _ in range(3)]
        try:
            results = await asyncio.gather(*(upgrade(s) for s in sessions))
        finally:
            for session in sessions:
                await session.close()
        assert sorted(results) == [[], [], [4]]
        assert await conn.fetch(*unindexed) == []
    finally:
        await conn.close()


async def test_version_8_indexes_each_days_attempts_by_delivery_newest_first(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead letters test each row for a later attempt of its delivery: version 8
    builds that index (delivery id, time, id) day partition by day partition, as version
    4 does, and drops the index on the delivery id alone it replaces."""
    conn = await asyncpg.connect(fresh_db)
    try:
        monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:7])
        assert await upgrade(conn) == [1, 2, 3, 4, 5, 6, 7]
        monkeypatch.undo()
        now = now_ms()
        await ensure_partitions(conn, now - DAY_MS, now + DAY_MS)
        assert await upgrade(conn) == [8]
        unindexed = (online.UNINDEXED_SQL, "history_attempts_delivery_newest")
        assert await conn.fetch(*unindexed) == []
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass"
        assert await conn.fetchval(valid, "history_attempts_delivery_newest")
        assert await conn.fetchval("SELECT to_regclass('history_attempts_delivery')") is None
        await ensure_partitions(conn, now + 2 * DAY_MS, now + 2 * DAY_MS)
        assert await conn.fetch(*unindexed) == []  # a day made after: its own
    finally:
        await conn.close()


async def test_version_5_finds_the_pairs_stored_before_it_by_their_urls_hash(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A history of version 4 (pairs unique by their URL): version 5 gives each pair its
    URL's hash, so what was stored before is found by every read, and a record shipped
    after it for the same pair joins it (no second pair)."""
    conn = await asyncpg.connect(fresh_db)
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
    now = now_ms()
    try:
        assert await upgrade(conn) == [1, 2, 3, 4]
        await ensure_partitions(conn, now, now)
        pair = await conn.fetchval(  # as version 4's shipper stored it
            "INSERT INTO history_pairs (project_id, event, url)"
            " VALUES ('demo', 'BUILD_END', $1) RETURNING pair_id", URL,
        )  # fmt: skip
        before = {"id": 7, **record(now - 20, 7, status="FAILED", final=True)}
        await conn.execute(
            "INSERT INTO history_attempts (id, created_ms, pair_id, project_id, delivery_id,"
            " dead, failed, doc) VALUES (7, $1, $2, 'demo', 'evt_7.1', true, true, $3)",
            now - 20, pair, orjson.dumps(before).decode(),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO history_counts (pair_id, span, bucket_ms, n)"
            " SELECT $1, s, $2::bigint - $2::bigint % s, 1 FROM unnest('{60000,3600000}'::int[]) s",
            pair, now - 20,
        )  # fmt: skip
        monkeypatch.undo()
        assert await upgrade(conn) == [5, 6, 7, 8]
        settings = make_settings(redis_server.url, history_url=fresh_db)
        history = open_history(settings, redis, keys)
        after = await history.add(record(now - 10, 8))
        assert await ship_all(settings, redis) == 1
        window: dict[str, Any] = {"start_ms": now - 60_000, "end_ms": now}
        page = await history.query("demo", URL, "BUILD_END", **window)
        recent = await history.recent("demo", [URL], **window)
        finals = [r.id async for r in history.final_failures("demo", URL, "BUILD_END", **window)]
        await history.close()
        assert (page.count, [r.id for r in page.records]) == (2, [after, 7])
        assert [r.id for r in recent.records] == [after, 7] and finals == [7]
        assert await conn.fetchval("SELECT count(*) FROM history_pairs") == 1
    finally:
        await conn.close()


async def at_version_4(url: str, pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database at `url` at version 4, holding `pairs` pairs (as version 4 stored them:
    500 projects, URLs of ~90 characters)."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
    conn = await asyncpg.connect(url)
    try:
        assert await upgrade(conn) == [1, 2, 3, 4]
        await conn.execute(
            "INSERT INTO history_pairs (project_id, event, url)"
            " SELECT 'p' || (g % 500), 'BUILD_END', 'https://hooks.example-' || (g % 500)"
            "  || '.com/callbacks/' || md5(g::text) || '?tenant=' || g"
            f" FROM generate_series(1, {pairs}) g"
        )
        await conn.execute("VACUUM ANALYZE history_pairs")
    finally:
        await conn.close()
    monkeypatch.undo()


PAIRS_SHAPE = """
SELECT 'index', c.relname, x.indisvalid, pg_get_indexdef(c.oid)
  FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
 WHERE x.indrelid = 'history_pairs'::regclass
UNION ALL
SELECT 'constraint', conname, convalidated, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE conrelid = 'history_pairs'::regclass
UNION ALL
SELECT 'column', attname, attnotnull, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'history_pairs'::regclass AND attnum > 0
UNION ALL
SELECT 'trigger', tgname, tgenabled = 'O', pg_get_triggerdef(oid)
  FROM pg_trigger WHERE tgrelid = 'history_pairs'::regclass
 ORDER BY 1, 2
"""


async def test_version_5_run_again_after_a_crash_ends_as_a_fresh_build(
    fresh_db: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5 stopped after its first step (the hash column, its function and trigger)
    and with what index builds a crash stopped leave (invalid indexes of its indexes'
    names, one of them not its definition): an older version's insert meanwhile is hashed
    by the trigger, and run again, it ends at the latest version with every index and
    constraint valid, `history_pairs` as a database built fresh has it (and as version 5
    in one transaction left it: unique by the hash, the URL unindexed)."""
    await at_version_4(fresh_db, 1000, monkeypatch)
    conn = await asyncpg.connect(fresh_db)
    try:

        async def killed(_: object) -> None:
            raise RuntimeError("killed")

        monkeypatch.setattr(online, "_backfill", killed)
        with pytest.raises(RuntimeError, match="killed"):
            await upgrade(conn)
        monkeypatch.undo()
        assert await schema.schema_version(conn) == 4
        await conn.execute(  # an older version's shipper, meanwhile
            "INSERT INTO history_pairs (project_id, event, url) VALUES ('p1', 'BUILD_END', 'x')"
        )
        with pytest.raises(asyncpg.UniqueViolationError):  # a build that failed half-way
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY history_pairs_url_hash_key"
                " ON history_pairs (event)"
            )
        await conn.execute(  # a build killed before its end: invalid, as it would be
            "CREATE INDEX history_pairs_url_hash ON history_pairs (project_id, url_hash)"
        )
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'history_pairs_url_hash'::regclass"
        )
        assert await upgrade(conn) == [v for v, _ in schema.MIGRATIONS[4:]]
        shape = [tuple(r) for r in await conn.fetch(PAIRS_SHAPE)]
        assert await conn.fetchval(
            "SELECT count(*) FROM history_pairs WHERE url_hash = history_url_hash(url)"
        ) == 1001  # fmt: skip
    finally:
        await conn.close()
    fresh = await asyncpg.connect(pg_url)  # the session's database: built fresh
    try:
        assert shape == [tuple(r) for r in await fresh.fetch(PAIRS_SHAPE)]
    finally:
        await fresh.close()
    assert all(valid for kind, _, valid, _ in shape if kind != "trigger")
    named = [(kind, name) for kind, name, _, _ in shape if kind != "column"]
    assert [n for n in named if not n[1].endswith("_not_null")] == [  # PostgreSQL 18's too
        ("constraint", "history_pairs_pkey"),
        ("constraint", "history_pairs_url_hash_key"),
        ("index", "history_pairs_pkey"),
        ("index", "history_pairs_url_hash"),
        ("index", "history_pairs_url_hash_key"),
        ("trigger", "history_pairs_hashed"),
    ]
    assert ("column", "url_hash", True, "bytea") in shape  # NOT NULL


def test_db_upgrade_command_twice(
    fresh_db: str, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", fresh_db)
    first = CliRunner().invoke(app, ["db", "upgrade"])
    assert (
        first.exit_code == 0
        and "applied migrations 1, 2, 3, 4, 5, 6, 7, 8: version 8" in first.output
    )
    second = CliRunner().invoke(app, ["db", "upgrade"])
    assert second.exit_code == 0 and "up to date: version 8" in second.output


def test_db_upgrade_if_reachable_lets_the_api_start_while_postgres_is_away(
    fresh_db: str, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's pre-start step (an init container, systemd's ExecStartPre) ran `db
    upgrade`, which exits 1 when PostgreSQL is unreachable: during an outage an API restart
    crash-looped, though the API works without PostgreSQL (review). `--if-reachable` warns
    and exits 0 then; PostgreSQL reachable, it upgrades as before, and a refusal that is no
    outage (no such database) still fails."""
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_TIMEOUT", "2")
    away = f"postgresql://dispatcher:x@127.0.0.1:{free_port()}/dispatcher"
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", away)
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 1
    tolerant = CliRunner().invoke(app, ["db", "upgrade", "--if-reachable"])
    assert tolerant.exit_code == 0, tolerant.output
    assert "PostgreSQL is unreachable" in tolerant.output and "not upgraded" in tolerant.output
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", fresh_db)
    done = CliRunner().invoke(app, ["db", "upgrade", "--if-reachable"])
    assert done.exit_code == 0 and "applied migrations 1, 2, 3, 4, 5, 6, 7, 8" in done.output
    nowhere = fresh_db.rsplit("/", 1)[0] + "/no_such_database"
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", nowhere)
    assert CliRunner().invoke(app, ["db", "upgrade", "--if-reachable"]).exit_code != 0


async def test_db_upgrade_if_reachable_does_not_wait_for_another_processs_upgrade(
    fresh_db: str, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process upgrading (a migration may run for hours: an index a day) holds the
    migrations' lock: the API's pre-start step waited for it, and every API pod restarted
    or rolled out meanwhile stayed in its init container (review). With --if-reachable it
    warns and exits 0 (the API serves; history reads answer 503 until the schema is done)."""
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", fresh_db)
    holder = await asyncpg.connect(fresh_db)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", schema._LOCK)  # the migrations'
        said = await asyncio.wait_for(
            asyncio.to_thread(CliRunner().invoke, app, ["db", "upgrade", "--if-reachable"]), 30
        )
    finally:
        await holder.close()
    assert said.exit_code == 0, said.output
    assert "another process is upgrading the schema" in " ".join(said.output.split())
    done = await asyncio.to_thread(CliRunner().invoke, app, ["db", "upgrade", "--if-reachable"])
    assert done.exit_code == 0 and "applied migrations 1," in done.output, done.output


async def test_retention_drops_a_days_partition_and_nothing_newer(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, history_url=fresh_db)
    conn = await asyncpg.connect(fresh_db)
    await upgrade(conn)
    now = now_ms()
    await ensure_partitions(conn, now - 10 * DAY_MS, now)  # every day: "nothing newer" counts
    created = [now - 9 * DAY_MS, now - 8 * DAY_MS, now - 7 * DAY_MS - 1, now - 6 * DAY_MS]
    history = open_history(settings, redis, keys)
    try:
        for n, at in enumerate(created):
            await history.add(record(at, n))
            await ship_all(settings, redis, now_ms=at + 1000)  # each shipped in its time
        await history.add(record(now - 1000, 9))
        await ship_all(settings, redis)
        cutoff = now - settings.retention_ms
        before = await partitions(conn)
        expired = {name for name, _, high in before if high <= cutoff}
        assert len(expired) == 6  # 10, 9 and 8 days ago; attempts and counts

        assert await history.sweep(now_ms=now) == 6
        after = await partitions(conn)
        assert {name for name, _, _ in before} - {name for name, _, _ in after} == expired
        assert all(high > cutoff for _, _, high in after)  # everything newer is kept
        ahead = {low for _, low, _ in after}
        assert {now // DAY_MS * DAY_MS + d * DAY_MS for d in (1, 2)} <= ahead  # made ahead
        kept_days = {name for name, low, high in after if low < cutoff}  # the cutoff's own day
        assert len(kept_days) == 2
        assert await conn.fetchval("SELECT count(*) FROM history_attempts") == 3
        page = await history.query("demo", URL, "BUILD_END", start_ms=0, end_ms=now, now_ms=now)
        # the record 1 ms past the retention stays in its day's partition but is not shown
        assert sorted(r.created_time for r in page.records) == [now - 6 * DAY_MS, now - 1000]
        assert page.count == 2
        assert await history.sweep(now_ms=now) == 0
    finally:
        await history.close()
        await conn.close()


async def test_a_day_partition_dropped_under_a_running_leader_is_made_again(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The leader caches the days whose partitions it made. A partition dropped under it
    (by hand, or by a sweep whose clock runs ahead) stayed cached: every entry of that day
    was refused ("no partition of relation found for row") and set aside, again and again
    until the leader restarted. Refused so, the leader looks its days up again and makes
    the partition anew: the entry is stored, none set aside."""
    settings = make_settings(redis_server.url, history_url=fresh_db)
    conn = await asyncpg.connect(fresh_db)
    await upgrade(conn)
    now = now_ms()
    history = PostgresHistory(redis, settings, keys)
    shipper = Shipper(redis, settings, elect=False)
    await shipper.open()
    try:
        await history.add(record(now - 20, 1))
        assert await shipper.drain() == 1
        day = f"history_attempts_{schema.day_suffix(now // DAY_MS)}"
        await conn.execute(f"DROP TABLE {day}")
        second = [await history.add(record(now - 10 + n, 2 + n)) for n in range(2)]
        assert await shipper.drain() == 2
        assert await set_aside(fresh_db) == []
        ids = [r[0] for r in await conn.fetch(f"SELECT id FROM {day} ORDER BY id")]
        assert ids == second
    finally:
        await shipper.close()
        await history.close()
        await conn.close()


async def test_processes_making_the_same_day_partitions_at_once_all_succeed(
    fresh_db: str,
) -> None:
    """Workers and shippers make tomorrow's partitions when they see a record for it: every
    one of them at once must succeed (the losers of `CREATE TABLE IF NOT EXISTS` raced to
    "relation already exists" or a unique violation in pg_type)."""
    conns = [await asyncpg.connect(fresh_db) for _ in range(6)]
    try:
        await upgrade(conns[0])
        now = now_ms()
        for week in range(3):  # a fresh range each round: every creator races for it
            low = now + (1 + 7 * week) * DAY_MS
            made = await asyncio.gather(
                *(ensure_partitions(c, low, low + 6 * DAY_MS) for c in conns)
            )
            made_now = {n for names in made for n in names}
            days = {
                n for n, start, _ in await partitions(conns[0]) if start >= low // DAY_MS * DAY_MS
            }
            assert made_now == days and len(days) == 14  # 7 days of both tables
    finally:
        for conn in conns:
            await conn.close()


async def stream_twice(redis: Redis, settings: Settings, rec: AttemptRecord) -> int:
    history = PostgresHistory(redis, settings, keys)
    await history.assign_ids([rec])
    for _ in range(2):  # a worker's pipeline sent again after its answer was lost
        await run_pipeline(redis, lambda pipe: history.record(pipe, rec))
    return int(rec["id"])


async def test_a_record_sent_twice_is_stored_once(pg_settings: Settings, redis: Redis) -> None:
    now = now_ms()
    first = await stream_twice(redis, pg_settings, record(now - 10, 1))  # in one batch
    assert await ship_all(pg_settings, redis) == 1
    second = await stream_twice(redis, pg_settings, record(now - 5, 2))
    one_by_one = pg_settings.model_copy(update={"history_ship_batch": 1})  # in two batches
    assert await ship_all(one_by_one, redis) == 1
    history = open_history(pg_settings, redis, keys)
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    await history.close()
    assert page.count == 2 and sorted(r.id for r in page.records) == [first, second]
    assert await redis.xlen(keys.HISTORY_STREAM) == 0


async def test_two_shippers_at_once_store_each_record_once(
    pg_settings: Settings, redis: Redis
) -> None:
    now = now_ms()
    settings = pg_settings.model_copy(update={"history_ship_batch": 100})
    history = open_history(settings, redis, keys)
    for n in range(1500):
        await history.add(record(now - 60_000 + n, n))
    shippers = [Shipper(redis, settings, elect=False) for _ in range(2)]
    for shipper in shippers:
        await shipper.open()
    stored = await asyncio.gather(*(s.drain() for s in shippers))
    for shipper in shippers:
        await shipper.close()
    assert sum(stored) == 1500
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 120_000, end_ms=now)
    assert isinstance(history, PostgresHistory)
    pool = await history.pool()
    rows = await pool.fetchval("SELECT count(DISTINCT id) FROM history_attempts")
    await history.close()
    assert page.count == 1500 and rows == 1500


async def test_a_shipper_dead_between_commit_and_trim_ships_nothing_twice(
    pg_settings: Settings, redis: Redis
) -> None:
    now = now_ms()
    history = open_history(pg_settings, redis, keys)
    for n in range(10):
        await history.add(record(now - 100 + n, n))
    dying = Shipper(redis, pg_settings, elect=False)
    await dying.open()
    entries = (await redis.xread({keys.HISTORY_STREAM: "0-0"}))[0][1]
    batch, _ = read_entries(entries)
    assert await dying._commit(batch, batch[-1].sid) == 10  # committed, then "killed"
    await dying.close()
    assert await redis.xlen(keys.HISTORY_STREAM) == 10  # never trimmed

    assert await ship_all(pg_settings, redis) == 0  # the next shipper trims, stores nothing
    assert await redis.xlen(keys.HISTORY_STREAM) == 0
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    await history.close()
    assert page.count == 10 and len({r.id for r in page.records}) == 10


async def test_counts_and_deep_pages_match_a_brute_force_read(
    pg_settings: Settings, redis: Redis
) -> None:
    """The counts-based locator against COUNT(*) and OFFSET on random windows and pages:
    windows under a minute, across minutes, across hours, past the data."""
    rng = random.Random(12)
    now = now_ms()
    span = 5 * 3_600_000
    times = sorted(now - rng.randrange(span) for _ in range(4000))
    times += [times[100]] * 5  # equal times order by id
    conn = await asyncpg.connect(pg_settings.history_url or "")
    loader = Loader(conn)
    rows = [parse_row(_doc(i, at)) for i, at in enumerate(times, start=1)]
    rows += [parse_row(_doc(10_000 + i, at, url=URL + "/x")) for i, at in enumerate(times[:500])]
    assert await loader.store(rows) == len(rows)
    history = open_history(pg_settings, redis, keys)
    pair = await conn.fetchval("SELECT pair_id FROM history_pairs WHERE url = $1", URL)
    try:
        for _ in range(60):
            start = now - rng.choice([span + 60_000, rng.randrange(span), 3_600_000])
            end = start + rng.choice([30_000, 61_000, 7_200_000, rng.randrange(span)])
            size = rng.choice([1, 7, 20, 100])
            expected = await conn.fetchval(
                "SELECT count(*) FROM history_attempts"
                " WHERE pair_id = $1 AND created_ms BETWEEN $2 AND $3", pair, start, end,
            )  # fmt: skip
            for page in {1, 2, max(1, expected // size), max(1, (expected + size) // size), 3}:
                got = await history.query("demo", URL, "BUILD_END", start_ms=start, end_ms=end,
                                          page=page, page_size=size, now_ms=now)  # fmt: skip
                truth = await conn.fetch(
                    "SELECT id FROM history_attempts WHERE pair_id = $1 AND created_ms"
                    " BETWEEN $2 AND $3 ORDER BY created_ms DESC, id DESC OFFSET $4 LIMIT $5",
                    pair, start, end, (page - 1) * size, size,
                )  # fmt: skip
                assert got.count == expected, (start, end)
                assert [r.id for r in got.records] == [r["id"] for r in truth], (start, end, page)
    finally:
        await history.close()
        await conn.close()


def _doc(n: int, at: int, url: str = URL) -> bytes:
    import orjson

    return orjson.dumps({"id": n, **record(at, n, callBackUrl=url)})


def test_history_migrate_copies_the_redis_history(
    pg_settings: Settings, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = now_ms()
    redis_settings = make_settings(redis_server.url)

    async def seed() -> list[int]:
        redis = Redis.from_url(redis_server.url)
        await redis.flushdb()
        history = RedisHistory(redis, redis_settings, keys)
        ids = [await history.add(record(now - 3000 + n, n)) for n in range(2500)]
        failed = record(
            now - 1,
            9999,
            status="FAILED",
            final=True,
            requestBody=KEPT,
            requestBodyOf="demo:evt_9999@1",
        )  # its body kept apart: migrated whole
        ids.append(await history.add(failed, dead=True))
        await redis.aclose()
        return ids

    ids = asyncio.run(seed())
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", pg_settings.history_url or "")
    first = CliRunner().invoke(app, ["history", "migrate"])
    assert first.exit_code == 0 and "copied 2501 records (0 were there already)" in first.output
    again = CliRunner().invoke(app, ["history", "migrate"])
    assert "copied 0 records (2501 were there already)" in again.output

    async def read() -> tuple[Any, Any]:
        redis = Redis.from_url(redis_server.url)
        history = open_history(pg_settings, redis, keys)
        page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now,
                                   page_size=100)  # fmt: skip
        dead = await history.dead("demo")
        await history.close()
        await redis.aclose()
        conn = await asyncpg.connect(pg_settings.history_url)
        doc = await conn.fetchval("SELECT doc FROM history_attempts WHERE id = $1", ids[-1])
        await conn.close()
        assert "requestBodyOf" not in orjson.loads(doc)  # whole: named by nothing
        return page, dead

    page, dead = asyncio.run(read())
    assert page.count == 2501 and page.records[0].id == max(ids)
    assert [r.id for r in dead] == [ids[-1]]
    assert dead[0].request_body == KEPT


def test_history_migrate_skips_what_it_cannot_read_and_sets_aside_what_is_refused(
    pg_settings: Settings, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dispatcher history migrate` stopped at the first record it could not read (edited
    by hand, another version's fields) with a bare KeyError, exit 1, and at the same one at
    every run: nothing after it was copied (review). As the shipper does, it skips a record
    it cannot read (logged with its key, counted), sets aside one PostgreSQL refuses alone
    (listed by `set-aside list`, its fields an entry the shipper reads), copies the others
    and says the counts."""
    now = now_ms()

    async def seed() -> tuple[list[int], int]:
        redis = Redis.from_url(redis_server.url)
        await redis.flushdb()
        history = RedisHistory(redis, make_settings(redis_server.url), keys)
        ids = [await history.add(record(now - 3000 + n, n)) for n in range(1500)]
        no_event = {"id": ids[1234], **record(now - 5, 1234)}
        del no_event["events"]
        await redis.set(keys.HISTORY_RECORD_PREFIX + str(ids[1234]), orjson.dumps(no_event))
        await redis.set(keys.HISTORY_RECORD_PREFIX + str(ids[10]), b"not JSON")
        nul = record(now - 2, 2000, projectId="p\x009", status="FAILED", final=True)
        refused = await history.add(nul, dead=True)  # a NUL: PostgreSQL's text refuses it
        await redis.aclose()
        return ids, refused

    ids, refused = asyncio.run(seed())
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", pg_settings.history_url or "")
    for run, there in enumerate((0, 1498)):
        out = CliRunner().invoke(app, ["history", "migrate"])
        assert out.exit_code == 0, (out.output, out.exception)
        assert f"copied {1498 - there} records ({there} were there already)" in out.output
        assert "2 records unreadable" in out.output, out.output
        assert "1 records refused by PostgreSQL: set aside" in out.output
        if run == 0:
            assert "history.migrate_unreadable" in out.output
            assert keys.HISTORY_RECORD_PREFIX + str(ids[1234]) in out.output

    async def stored() -> tuple[set[int], list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(pg_settings.history_url or "")
        rows = {r[0] for r in await conn.fetch("SELECT id FROM history_attempts")}
        await conn.close()
        return rows, await set_aside(pg_settings.history_url)

    rows, kept = asyncio.run(stored())
    assert rows == set(ids) - {ids[10], ids[1234]}
    ((record_id, project, error, _, fields),) = kept
    assert (record_id, project, fields["d"]) == (str(refused), "p\ufffd9", "1")
    assert "CharacterNotInRepertoire" in error or "0x00" in error, error
    (entry,), aside = read_entries([(b"1-0", {k.encode(): v.encode() for k, v in fields.items()})])
    assert aside == [] and entry.dead and entry.created_ms == now - 2
    listed = CliRunner().invoke(app, ["history", "set-aside", "list"])
    assert str(refused) in listed.output and "1 entries" in listed.output, listed.output


async def test_an_unreachable_database_is_a_503_with_a_message(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    with EmbeddedPostgres(settings=FAST) as server:
        url = server.url
    settings = make_settings(redis_server.url, history_url=url, history_timeout=1)
    async with Services.open(settings, redis) as services:
        with pytest.raises(Unavailable, match=r"PostgreSQL\) is unreachable"):
            await services.history_page("demo", URL, "BUILD_END")
        with pytest.raises(Unavailable):
            await services.dead_letters("demo")


async def test_a_schema_older_than_this_version_is_a_503_saying_to_upgrade(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This version's code on a database at version 4 (`dispatcher db upgrade` not run):
    reads looked pairs up by a column version 5 adds, and answered 500 with a stack trace
    (UndefinedColumnError), the shipper failing the same way with no hint (review). The
    version is checked once per pool and at each shipper's start: a history page is a 503
    naming `dispatcher db upgrade`, and the shipper's failure says so too. (The API
    upgrades it by itself, `dispatcher.history.heal`: here another process's migration holds
    the migrations' lock meanwhile, so the schema stays behind for the test.)"""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await upgrade(conn) == [1, 2, 3, 4]
        monkeypatch.undo()
        await conn.execute("SELECT pg_advisory_lock($1)", schema._LOCK)
        await _behind_reads_and_shipper_say_to_upgrade(fresh_db, redis_server, redis)
    finally:
        await conn.close()


async def _behind_reads_and_shipper_say_to_upgrade(
    fresh_db: str, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, history_url=fresh_db)
    async with app_client(settings, redis) as api:
        page = await api.get(
            "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history",
            params={"url": URL, "event": "BUILD_END"},
            headers=UID,
        )
    assert page.status_code == 503, page.text
    assert "version 4" in page.text and "`dispatcher db upgrade`" in page.text
    history = open_history(settings, redis, keys)
    await history.add(record(now_ms() - 10, 1))
    await history.close()
    stop = asyncio.Event()
    shipper = Shipper(redis, settings, elect=False, stop=stop)
    with capture_logs() as logs:
        running = asyncio.create_task(shipper.run(drain_on_stop=False))

        async def failed() -> bool:
            return any(e["event"] == "history.ship_failed" for e in logs)

        await until(failed, 10, "the shipper failed")
        stop.set()
        await running
    said = next(e for e in logs if e["event"] == "history.ship_failed")
    assert said["hint"] == "run `dispatcher db upgrade`" and "version 4" in said["error"], said
    assert await redis.xlen(keys.HISTORY_STREAM) == 1  # waits for the upgrade


async def test_the_byte_bound_is_a_share_of_maxmemory_and_the_bytes_a_metric(
    redis: Redis, pg_settings: Settings
) -> None:
    """A quarter of the Redis' maxmemory (a gigabyte without one); the stream's bytes, read
    whole, are the worker's gauge."""
    assert await backlog_bytes.bound(redis) == backlog_bytes.NO_MAXMEMORY_BYTES
    await redis.config_set("maxmemory", 400_000_000)
    try:
        assert await backlog_bytes.bound(redis) == 100_000_000
    finally:
        await redis.config_set("maxmemory", 0)
    history = open_history(pg_settings, redis, keys)
    await history.add(record(now_ms() - 100, 1))
    await history.close()
    async with Services.open(pg_settings, redis) as services:
        shipping = Shipping([services])
        await shipping.check()
    held = await redis.memory_usage(keys.HISTORY_STREAM, samples=0)
    assert REGISTRY.get_sample_value("dispatcher_history_backlog_bytes") == held
    assert not shipping.full


async def commands_run(redis: Redis) -> Counter[str]:
    """How many times Redis ran or refused each command (a subcommand counted as its
    command), as of before this INFO."""
    ran: Counter[str] = Counter()
    for name, stat in (await redis.info("commandstats")).items():
        command = name.removeprefix("cmdstat_").split("|")[0]
        ran[command] += int(stat["calls"]) + int(stat.get("rejected_calls", 0))
    return ran


async def test_a_redis_that_refuses_memory_usage_leaves_the_record_count_bound(
    redis: Redis, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user whose ACL denies MEMORY (a managed Redis may): no byte bound, said once; the
    worker's backlog watch goes on (an error other than an outage ended it), and a read
    that failed leaves the fleet's walk to the next check. Refused, it is not asked again
    at the next check (it was every second) but a minute later, then twice as long, and
    the bound is back once Redis answers."""
    await redis.acl_setuser("nomem", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                            commands=["+@all", "-memory"])  # fmt: skip
    limited = Redis.from_url(redis_server.url.replace("redis://", "redis://nomem:pw@"))
    clock = [1000.0]
    monkeypatch.setattr(backlog_bytes, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    measured = backlog_bytes.StreamBytes()

    async def asked_after(seconds: float) -> int:
        """MEMORY commands of a check `seconds` later."""
        clock[0] += seconds
        before = await commands_run(redis)
        assert await measured.over(limited, keys.HISTORY_STREAM, 3) == (0, False)
        return (await commands_run(redis))["memory"] - before["memory"]

    try:
        with capture_logs() as logs:
            assert [await asked_after(s) for s in (0, 1, 58.5, 0.5, 119.5, 0.5)] == [
                1, 0, 0, 1, 0, 1]  # fmt: skip
        assert [e["event"] for e in logs] == ["history.backlog_bytes_unread"]
        # the walk it could not make is left to the next check (held 60 s before: review)
        assert not await redis.exists(f"{keys.HISTORY_STREAM}:bytes:walk")
        await redis.acl_setuser("nomem", commands=["+memory"])
        clock[0] += 240
        assert await measured.over(limited, keys.HISTORY_STREAM, 3) == (0, False)  # no stream
        assert not measured.refused and measured.limit == backlog_bytes.NO_MAXMEMORY_BYTES
    finally:
        await limited.aclose()
        await redis.acl_deluser("nomem")


async def test_a_full_redis_keeps_the_byte_bound_and_is_asked_again_at_the_next_check(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis at `maxmemory` refuses the walk's SET NX (OOM): not a refusal for good (an
    ACL's) but "not now". The check keeps its last answer, past the bound, and reads again
    at the next check: taken for a refusal, the bound was off for a minute (then up to
    16), just when Redis was full (review)."""
    monkeypatch.setattr(backlog_bytes, "MAXMEMORY_SHARE", 0.001)  # a bound of a few KB
    for _ in range(10):
        await redis.xadd(keys.HISTORY_STREAM, {"r": "x" * 100_000})
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used + 10_000_000)
    try:
        measured = backlog_bytes.StreamBytes()
        size, past = await measured.over(redis, keys.HISTORY_STREAM, 10)
        assert size > 1_000_000 and past
        await redis.delete(f"{keys.HISTORY_STREAM}:bytes")  # the fleet's read lapsed: a walk
        await redis.config_set("maxmemory", used // 2)  # full: writes refused (OOM)
        before = await commands_run(redis)
        with capture_logs() as logs:
            assert await measured.over(redis, keys.HISTORY_STREAM, 10) == (size, True)
        assert (await commands_run(redis))["memory"] == before["memory"]  # the walk refused
        assert not measured.refused and not logs, logs
        await redis.config_set("maxmemory", used + 10_000_000)  # room again
        assert await measured.over(redis, keys.HISTORY_STREAM, 10) == (size, True)
        assert (await commands_run(redis))["memory"] == before["memory"] + 1  # asked at once
    finally:
        await redis.config_set("maxmemory", 0)


async def test_an_empty_stream_is_no_byte_read_and_the_bound_comes_with_the_count(
    redis: Redis, pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check of every worker read the bytes (a GET, the walk each time the fleet's
    read had lapsed) and INFO memory, for an empty stream as for a full one (review). An
    empty stream is its XLEN and XRANGE alone. With records, the bound (INFO memory) is
    read at every check: in the round trip of XLEN and XRANGE from the second on (on its
    own at the first, the check before found none), so a lowered maxmemory is the bound at
    the next check (it was read once in 30 s: review)."""
    alone = 0

    async def bound(client: Redis) -> int:
        nonlocal alone
        alone += 1
        return await read_bound(client)

    read_bound = backlog_bytes.bound
    monkeypatch.setattr(backlog_bytes, "bound", bound)
    async with Services.open(pg_settings, redis) as services:
        shipping = Shipping([services])
        before = await commands_run(redis)
        for _ in range(2):
            await shipping.check()
        assert await commands_run(redis) - before == Counter(xlen=2, xrange=2, info=1)  # (its own)
        history = open_history(pg_settings, redis, keys)
        await history.add(record(now_ms() - 100, 1))
        await history.close()
        before = await commands_run(redis)
        for _ in range(3):
            await shipping.check()
        assert (await commands_run(redis))["info"] - before["info"] == 3 + 1  # (its own)
        assert alone == 1 and not shipping.full  # two INFO went with the count
        monkeypatch.setattr(backlog_bytes, "MAXMEMORY_SHARE", 0.000_001)  # a few bytes
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used + 10_000_000)
        try:
            await shipping.check()
        finally:
            await redis.config_set("maxmemory", 0)
        assert shipping.full


@contextlib.asynccontextmanager
async def watching(settings: Settings, redis: Redis) -> AsyncIterator[Shipping]:
    """A worker's backlog watch (started, not shipping) reading with `redis`."""
    async with Services.open(settings, redis) as services:
        shipping = Shipping([services])
        shipping.start()
        try:
            yield shipping
        finally:
            await shipping.stop(1)


async def test_the_backlog_watch_outlives_a_busy_redis(
    redis: Redis, redis_server: EmbeddedRedis, pg_url: str
) -> None:
    """Another client's script past `lua-time-limit` makes Redis answer BUSY: the watch's
    XLEN got it, a ResponseError, and the watch ended for good, `full` frozen (a held
    worker never claimed again; review). It is an outage to the watch: it checks again,
    and goes on once the script is killed."""
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False,
                             history_backlog_limit=1)  # fmt: skip
    await redis.xadd(keys.HISTORY_STREAM, {"r": "x"})
    spinner = Redis.from_url(redis_server.url)
    await redis.config_set("lua-time-limit", 100)
    try:
        async with watching(settings, redis) as shipping:

            async def full() -> bool:
                return shipping.full

            await until(full, 10, "the watch found the backlog at its limit")
            spinning = asyncio.create_task(spinner.eval(SPIN_UNTIL_KILLED, 0))
            await asyncio.sleep(2.5)  # (checks every second: held, so not idle)
            await redis.script_kill()
            with contextlib.suppress(ResponseError):
                await spinning
            await redis.delete(keys.HISTORY_STREAM)  # shipped meanwhile

            async def resumed() -> bool:
                return not shipping.full

            await until(resumed, 10, "the watch went on after BUSY and found the stream empty")
    finally:
        await redis.config_set("lua-time-limit", 5000)
        await spinner.aclose()


async def test_the_backlog_watch_says_an_error_once_and_goes_on(
    redis: Redis, redis_server: EmbeddedRedis, pg_url: str
) -> None:
    """An error that is no outage (an ACL refusing XLEN) ended the watch for good (review):
    it is said once, and the watch checks again every second, working once XLEN is let."""
    settings = make_settings(redis_server.url, history_url=pg_url, history_ship=False,
                             history_backlog_limit=1)  # fmt: skip
    await redis.xadd(keys.HISTORY_STREAM, {"r": "x"})
    await redis.acl_setuser("noxlen", enabled=True, passwords=["+pw"], keys=["*"],
                            channels=["*"], commands=["+@all", "-xlen"])  # fmt: skip
    limited = Redis.from_url(redis_server.url.replace("redis://", "redis://noxlen:pw@"))
    try:
        with capture_logs() as logs:
            async with watching(settings, limited) as shipping:
                before = (await commands_run(redis))["xlen"]

                async def refused_thrice() -> bool:
                    return (await commands_run(redis))["xlen"] >= before + 3

                await until(refused_thrice, 10, "the watch's XLEN refused three times")
                await redis.acl_setuser("noxlen", commands=["+xlen"])

                async def full() -> bool:
                    return shipping.full

                await until(full, 10, "the watch went on and found the backlog at its limit")
        said = [e for e in logs if e["event"] == "history.backlog_unchecked"]
        assert len(said) == 1 and "NoPermissionError" in said[0]["error"], said
    finally:
        await limited.aclose()
        await redis.acl_deluser("noxlen")


async def test_the_backlog_is_a_metric(pg_settings: Settings, redis: Redis) -> None:
    """What waits in Redis for PostgreSQL shows at /metrics (the alert's input)."""
    now = now_ms()
    history = open_history(pg_settings, redis, keys)
    for n in range(3):
        await history.add(record(now - 100 + n, n))
    await history.close()
    async with app_client(pg_settings, redis) as api:
        assert "dispatcher_history_backlog 3.0" in (await api.get("/metrics")).text
        await ship_all(pg_settings, redis)
        assert "dispatcher_history_backlog 0.0" in (await api.get("/metrics")).text


async def test_a_stream_made_anew_below_the_watermark_is_read_from_its_start(
    pg_settings: Settings, redis: Redis
) -> None:
    """Redis lost its data and its clock is behind the last shipment: the new stream's ids
    fall below the watermark; its records are shipped all the same."""
    now = now_ms()
    history = open_history(pg_settings, redis, keys)
    await history.add(record(now - 10, 1))
    assert await ship_all(pg_settings, redis) == 1
    conn = await asyncpg.connect(pg_settings.history_url or "")
    await conn.execute("UPDATE history_shipped SET last_id = $1", f"{now + DAY_MS}-0")
    await conn.close()
    for n in range(2, 5):
        await history.add(record(now - 10 + n, n))
    assert await ship_all(pg_settings, redis) == 3
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    await history.close()
    assert page.count == 4


def test_history_ship_drain_command(
    pg_settings: Settings, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = now_ms()

    async def seed() -> None:
        redis = Redis.from_url(redis_server.url)
        await redis.flushdb()
        history = open_history(pg_settings, redis, keys)
        for n in range(5):
            await history.add(record(now - 100 + n, n))
        await history.close()
        await redis.aclose()

    asyncio.run(seed())
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", pg_settings.history_url or "")
    result = CliRunner().invoke(app, ["history", "ship", "--drain"])
    assert result.exit_code == 0 and "shipped 5 records" in result.output, result.output
    again = CliRunner().invoke(app, ["history", "ship", "--drain"])
    assert "shipped 0 records" in again.output


async def test_an_entry_that_is_no_record_does_not_stop_the_others(
    pg_settings: Settings, redis: Redis
) -> None:
    """Something else on the stream (a bug, a hand-made XADD): logged and set aside (in
    `history_set_aside`, as it came); the records around it are stored. JSON that is no
    object (null, a list, a string, a number, in an older worker's entry or with columns
    but no status) made the reading of the record raise AttributeError, which nothing
    caught: the same batch was tried again for ever, every project's records waited, and
    at the backlog limit the workers stopped claiming (review)."""
    now = now_ms()
    history = open_history(pg_settings, redis, keys)
    await history.add(record(now - 30, 1))
    await redis.xadd(keys.HISTORY_STREAM, {"r": b'{"id": 5, "createdTime": 1}', "t": str(now)})
    await redis.xadd(keys.HISTORY_STREAM, {"r": b"not json", "t": str(now)})
    await redis.xadd(keys.HISTORY_STREAM, {"x": b"no record field"})
    no_object = [b"null", b"[]", b'"x"', b"5"]
    for doc in no_object:  # an older worker's entry: the JSON only
        await redis.xadd(keys.HISTORY_STREAM, {"r": doc, "d": b"0"})
    no_status = {"r": "[1]", "d": "0", "t": str(now), "i": "6", "p": "p6", "e": "BUILD_END",
                 "u": URL, "v": ""}  # fmt: skip
    await redis.xadd(keys.HISTORY_STREAM, no_status)  # type: ignore[arg-type]
    await redis.xadd(keys.HISTORY_STREAM, {"r": b"[]", "d": b"0", "t": str(now)})  # time only
    await history.add(record(now - 10, 2))
    wrote = await written(redis)
    assert await ship_all(pg_settings, redis) == 2
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    await history.close()
    assert page.count == 2 and await redis.xlen(keys.HISTORY_STREAM) == 0
    kept = await set_aside(pg_settings.history_url)
    assert [r[4] for r in kept] == wrote[1:-1]  # each entry's fields, as they came
    assert [(r[0], r[1], r[3]) for r in kept] == [
        ("5", None, b'{"id": 5, "createdTime": 1}'),
        (None, None, b"not json"),
        (None, None, b'{"x":"no record field"}'),
        *((None, None, doc) for doc in no_object),
        ("6", "p6", b"[1]"),
        (None, None, b"[]"),
    ]
    assert all("not a record" in r[2] for r in kept[3:]), kept


# 678 characters of four bytes (CJK Extension B, at random: nothing to compress): 2,731
# bytes of UTF-8 that fit the API's 8 KB query string percent-encoded, past the 2,704 bytes
# a btree entry of PostgreSQL holds
_RNG = random.Random(2)
LONG_PATH = [chr(_RNG.randrange(0x20000, 0x2A6DF)) for _ in range(678)]
LONG_URL = "http://127.0.0.1:9/" + "".join(LONG_PATH)


async def test_a_url_past_a_btree_entry_stops_no_ones_shipping_and_is_found(
    pg_settings: Settings, redis: Redis
) -> None:
    """A pair was unique by (project, event, url) and indexed by (project, url): a URL of
    678 four-byte characters (the registry counted characters) was too big for the
    index, the shipper's batch failed at every try, every project's records waited, and
    past the backlog limit the workers stopped claiming (review). Pairs are keyed by the
    URL's hash: its records are stored and found by every read, from a worker's entry and
    from an older worker's (the JSON only), and the other project's are stored beside."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    long = {"projectId": "attacker", "callBackUrl": LONG_URL, "status": "FAILED", "final": True}
    first = await history.add(record(now - 30, 1, **long), dead=True)
    older = record(now - 20, 2, **long)  # an older worker's entry: the JSON only
    await history.assign_ids([older])
    await redis.xadd(keys.HISTORY_STREAM, {"r": orjson.dumps(older), "d": b"0"})
    victim = await history.add(record(now - 10, 3))
    try:
        assert await ship_all(pg_settings, redis) == 3
        assert await redis.xlen(keys.HISTORY_STREAM) == 0
        assert (await history.get(victim, "demo")).id == victim
        window: dict[str, Any] = {"start_ms": now - 60_000, "end_ms": now}
        page = await history.query("attacker", LONG_URL, "BUILD_END", **window)
        assert (page.count, [r.id for r in page.records]) == (2, [older["id"], first])
        recent = await history.recent("attacker", [LONG_URL, URL], **window)
        assert [r.id for r in recent.records] == [older["id"], first]
        finals = [r.id async for r in history.final_failures("attacker", LONG_URL, "BUILD_END",
                                                             **window)]  # fmt: skip
        assert finals == [first]
        assert [r.id for r in await history.dead("attacker")] == [first]
    finally:
        await history.close()


async def set_aside(url: str | None) -> list[tuple[Any, ...]]:
    """(record id, project, error, record JSON, the entry's fields) of each entry the
    shipper set aside, in stream order."""
    conn = await asyncpg.connect(url or "")
    try:
        rows = await conn.fetch(
            "SELECT record_id, project_id, error, entry, fields FROM history_set_aside"
            " ORDER BY split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint"
        )
    finally:
        await conn.close()
    return [
        (
            r["record_id"], r["project_id"], r["error"], bytes(r["entry"]),
            None if r["fields"] is None else orjson.loads(r["fields"]),
        )
        for r in rows
    ]  # fmt: skip


async def written(redis: Redis) -> list[dict[str, str]]:
    """The fields of each entry of the stream, as the workers wrote them."""
    entries = await redis.xrange(keys.HISTORY_STREAM)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def test_an_entry_postgresql_refuses_alone_is_set_aside_and_the_others_shipped(
    pg_settings: Settings, redis: Redis
) -> None:
    """One entry that PostgreSQL refuses failed its whole batch, which the shipper tried
    again for ever (it caught data and integrity errors only, and read the same entries
    again): every project's records waited (review). A batch failing for an entry's own
    reason (its data, an integrity rule, a limit such as an index entry's size, a value the
    driver cannot send) is stored again entry by entry; an entry refused alone is set
    aside in `history_set_aside` with why, logged with its project and record id, and
    counted; the others are stored, the stream trimmed, and nothing is set aside twice. What
    is set aside is kept for the retention."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    first = await history.add(record(now - 50, 1))
    long_delivery = "".join(LONG_PATH)  # past a btree entry of the delivery id's index
    too_long = await history.add(record(now - 40, 2, projectId="p1", deliveryId=long_delivery))
    nul = record(now - 30, 3, projectId="p\x002")  # an older worker's entry: the JSON only
    await history.assign_ids([nul])
    await redis.xadd(keys.HISTORY_STREAM, {"r": orjson.dumps(nul), "d": b"0"})
    past_bigint = {**record(now - 20, 4, projectId="p3"), "id": 2**63}
    await redis.xadd(keys.HISTORY_STREAM, stream_fields(past_bigint, False))  # type: ignore[arg-type]
    last = await history.add(record(now - 10, 5))
    wrote = await written(redis)
    before = REGISTRY.get_sample_value("dispatcher_history_set_aside_total") or 0
    try:
        with capture_logs() as logs:
            assert await ship_all(pg_settings, redis) == 2
        assert await redis.xlen(keys.HISTORY_STREAM) == 0
        page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
        assert [r.id for r in page.records] == [last, first]
    finally:
        await history.close()
    kept = await set_aside(pg_settings.history_url)
    assert [(r[0], r[1]) for r in kept] == [
        (str(too_long), "p1"), (str(nul["id"]), "p\ufffd2"), (str(2**63), "p3")
    ]  # fmt: skip
    assert "index row size" in kept[0][2] and long_delivery.encode() in kept[0][3]
    assert kept[1][3] == orjson.dumps(nul)  # the record's JSON as the worker wrote it
    assert [r[4] for r in kept] == wrote[1:4]  # and the whole entry, every field
    said = [e for e in logs if e["event"] == "history.ship_set_aside"]
    assert [(e["project_id"], e["record_id"]) for e in said] == [(r[1], r[0]) for r in kept]
    assert REGISTRY.get_sample_value("dispatcher_history_set_aside_total") == before + 3
    assert await ship_all(pg_settings, redis) == 0
    assert len(await set_aside(pg_settings.history_url)) == 3
    conn = await asyncpg.connect(pg_settings.history_url or "")  # kept for the retention
    await conn.execute("UPDATE history_set_aside SET set_aside_at = now() - interval '8 days'"
                       " WHERE record_id = $1", str(too_long))  # fmt: skip
    await conn.close()
    history = PostgresHistory(redis, pg_settings, keys)
    await history.sweep()
    await history.close()
    assert [r[0] for r in await set_aside(pg_settings.history_url)] == [str(nul["id"]), str(2**63)]


async def test_records_of_a_clock_days_off_are_stored_or_set_aside_never_dropped(
    pg_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipper kept the records whose createdTime fell within [its own clock - the
    retention, its own clock + 1 day] and dropped the others for good, with a warning alone:
    a worker whose clock ran 2 days ahead lost its records, and a leading shipper whose
    clock ran 2 days behind dropped every correct worker's (review). Each entry is judged by
    the time Redis added it (its stream id): one whose createdTime is more than a day from
    it is set aside with why (counted, alerted on, listed), the others stored whatever the
    shipper's clock; `retry` ships the ones set aside, judged by their createdTime then."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    ahead = await history.add(record(now + 2 * DAY_MS, 1))  # a worker 2 days ahead
    behind = await history.add(record(now - 2 * DAY_MS, 2, projectId="p2"))  # 2 days behind
    normal = await history.add(record(now - 10, 3))
    before = REGISTRY.get_sample_value("dispatcher_history_set_aside_total") or 0
    with capture_logs() as logs:
        assert await ship_all(pg_settings, redis) == 1
    assert await redis.xlen(keys.HISTORY_STREAM) == 0
    kept = await set_aside(pg_settings.history_url)
    assert [(r[0], r[1]) for r in kept] == [(str(ahead), "demo"), (str(behind), "p2")]
    assert "48.0 h ahead of the time Redis added its entry" in kept[0][2], kept[0][2]
    assert "48.0 h behind the time Redis added its entry" in kept[1][2], kept[1][2]
    assert REGISTRY.get_sample_value("dispatcher_history_set_aside_total") == before + 2
    said = [e for e in logs if e["event"] == "history.ship_set_aside"]
    assert [e["record_id"] for e in said] == [str(ahead), str(behind)]
    # a leader whose own clock runs 2 days behind stores every correct worker's record
    monkeypatch.setattr(clock, "now_ms", lambda: now - 2 * DAY_MS)
    late = [await history.add(record(now - 20 + n, 10 + n)) for n in range(10)]
    assert await ship_all(pg_settings, redis) == 10
    monkeypatch.undo()
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 60_000, end_ms=now)
    assert {r.id for r in page.records} == {normal, *late}
    monkeypatch.setenv("DISPATCHER_REDIS_URL", pg_settings.redis_url or "")
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", pg_settings.history_url or "")
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["history", "set-aside", "list"])
    assert listed.exit_code == 0 and "2 entries" in listed.output, listed.output
    assert str(ahead) in listed.output and str(behind) in listed.output
    again = await asyncio.to_thread(
        CliRunner().invoke, app, ["history", "set-aside", "retry", "--all"]
    )
    assert again.exit_code == 0 and "appended 2 entries" in again.output, again.output
    assert await ship_all(pg_settings, redis) == 2  # asked for: stored at their createdTime
    assert (await history.get(ahead)).created_time == now + 2 * DAY_MS
    assert (await history.get(behind, "p2")).created_time == now - 2 * DAY_MS
    assert await set_aside(pg_settings.history_url) == []
    await history.close()


async def test_only_a_record_past_the_retention_by_redis_clock_is_dropped_and_counted(
    pg_settings: Settings, redis: Redis
) -> None:
    """A record that waited in the stream past the retention (Redis added it longer ago
    than that, by the newest stream id) is dropped, as its day may be gone: now logged with
    its record id and counted (`dispatcher_history_past_retention_total`); it was a warning
    alone, counted nowhere (review). The others of its batch are stored."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    old_at = now - pg_settings.retention_ms - DAY_MS
    old = record(old_at, 1)
    await history.assign_ids([old])
    await redis.xadd(keys.HISTORY_STREAM, stream_fields(old, False), id=f"{old_at}-0")  # type: ignore[arg-type]
    fresh = await history.add(record(now - 10, 2))
    before = REGISTRY.get_sample_value("dispatcher_history_past_retention_total") or 0
    with capture_logs() as logs:
        assert await ship_all(pg_settings, redis) == 1
    assert await redis.xlen(keys.HISTORY_STREAM) == 0
    assert REGISTRY.get_sample_value("dispatcher_history_past_retention_total") == before + 1
    (said,) = [e for e in logs if e["event"] == "history.ship_past_retention"]
    assert said["records"] == 1 and said["record_ids"] == [str(old["id"])], said
    assert said["first_stream_id"] == f"{old_at}-0"
    assert await set_aside(pg_settings.history_url) == []
    assert (await history.get(fresh)).id == fresh
    await history.close()


async def test_the_shippers_pair_ids_are_bounded_and_those_let_go_ship_right(
    pg_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leading shipper kept the id of every (project, event, URL) it met for the life
    of its process: 8.5 KB a pair of a long URL, 32 MiB for 4,000 (review). It keeps the
    `PAIRS_KEPT` used last (16,384; 8 here). A batch of more pairs than that, and the pairs
    met again after they were let go, are stored and counted under their own pair."""
    monkeypatch.setattr("dispatcher.history.loader.PAIRS_KEPT", 8, raising=False)
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    shipper = Shipper(redis, pg_settings, elect=False)
    await shipper.open()
    urls = [f"{URL}/{n}/" + "\U00020000" * 500 for n in range(20)]  # long: 2 KB a URL
    try:
        for again in range(2):
            for n, url in enumerate(urls):
                await history.add(record(now - 1000 + n, 100 * again + n, callBackUrl=url))
            assert await shipper.drain() == 20
            assert len(shipper.pairs) <= 8
        for n, url in enumerate(urls):
            page = await history.query("demo", url, "BUILD_END", start_ms=now - 60_000, end_ms=now)
            assert page.count == 2 and [r.call_back_url for r in page.records] == [url, url]
            assert {r.request_body for r in page.records} == {
                f'{{"n": {n}}}',
                f'{{"n": {100 + n}}}',
            }
    finally:
        await shipper.close()
        await history.close()


async def test_a_batch_after_an_older_workers_entry_set_aside_is_shipped(
    pg_settings: Settings, redis: Redis
) -> None:
    """Entries of older workers (the JSON only) go through temporary tables made on the
    shipper's connection at their first batch. They were made inside that batch's
    transaction but counted as made at once: a batch set aside in part rolled its first
    try back, tables with it, and the next such batch failed as if the schema were missing,
    until the shipper reconnected (review)."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)

    async def older(rec: AttemptRecord) -> int:
        await history.assign_ids([rec])
        await redis.xadd(keys.HISTORY_STREAM, {"r": orjson.dumps(rec), "d": b"0"})
        return int(rec["id"])

    await older(record(now - 50, 1))
    refused = await older(record(now - 40, 2, projectId="p\x002"))  # a NUL: refused
    shipper = Shipper(redis, pg_settings, elect=False)
    await shipper.open()
    try:
        assert await shipper.ship_once() == 1
        assert [r[0] for r in await set_aside(pg_settings.history_url)] == [str(refused)]
        await older(record(now - 30, 3))
        assert await shipper.ship_once() == 1
    finally:
        await shipper.close()
        await history.close()


def test_an_entry_set_aside_is_listed_and_shipped_again_once_fixed(
    fresh_db: str, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What was set aside was easy to miss, and nothing said how to ship it once its cause
    was fixed (review). `dispatcher history set-aside list` shows each entry (here refused
    by a rule an operator added by mistake) with why; once the rule is gone, `retry`
    appends its fields to the stream again as the worker wrote them, its dead-letter flag
    with them, and the shipper stores it. A row set aside before version 7 (the record's
    JSON only) is listed as such and left."""
    settings = make_settings(redis_server.url, history_url=fresh_db)
    now = now_ms()

    async def on_db(sql: str, *args: Any) -> None:
        conn = await asyncpg.connect(fresh_db)
        try:
            await upgrade(conn)
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def seed() -> int:
        await on_db("ALTER TABLE history_attempts ADD CONSTRAINT no_p9 CHECK (project_id <> 'p9')")
        await on_db(
            "INSERT INTO history_set_aside (stream, stream_id, error, entry)"
            " VALUES ($1, '1-0', 'an older refusal', '{}')",
            keys.HISTORY_STREAM,
        )
        redis = Redis.from_url(redis_server.url)
        await redis.flushdb()
        history = PostgresHistory(redis, settings, keys)
        dead = record(now - 10, 1, projectId="p9", status="FAILED", final=True)
        refused = await history.add(dead, dead=True)
        await history.add(record(now - 5, 2))
        assert await ship_all(settings, redis) == 1
        await history.close()
        await redis.aclose()
        return refused

    async def shipped() -> list[int]:
        redis = Redis.from_url(redis_server.url)
        history = PostgresHistory(redis, settings, keys)
        try:
            assert await ship_all(settings, redis) == 1
            return [r.id for r in await history.dead("p9")]
        finally:
            await history.close()
            await redis.aclose()

    refused = asyncio.run(seed())
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", fresh_db)
    listed = CliRunner().invoke(app, ["history", "set-aside", "list"])
    assert listed.exit_code == 0, listed.output
    assert str(refused) in listed.output and '"no_p9"' in listed.output
    assert "an older refusal (before version 7" in listed.output and "2 entries" in listed.output
    assert CliRunner().invoke(app, ["history", "set-aside", "retry"]).exit_code == 2
    asyncio.run(on_db("ALTER TABLE history_attempts DROP CONSTRAINT no_p9"))  # the fix
    again = CliRunner().invoke(app, ["history", "set-aside", "retry", "--all"])
    assert again.exit_code == 0 and "1 entries" in again.output, again.output
    assert asyncio.run(shipped()) == [refused]
    left = asyncio.run(set_aside(fresh_db))
    assert [(r[2], r[4]) for r in left] == [("an older refusal", None)]


async def test_entries_of_older_workers_are_found_by_their_status(
    pg_settings: Settings, redis: Redis
) -> None:
    """A worker of the previous version carries no status column on its entries (or only
    the JSON): the shipper reads the status from the JSON, so the status filter finds them."""
    now = now_ms()
    history = PostgresHistory(redis, pg_settings, keys)
    failed, json_only = record(now - 20, 1, status="FAILED"), record(now - 10, 2, status="FAILED")
    await history.assign_ids([failed, json_only])
    older = {k: v for k, v in stream_fields(failed, False).items() if k != "s"}
    await redis.xadd(keys.HISTORY_STREAM, older)  # type: ignore[arg-type]
    await redis.xadd(keys.HISTORY_STREAM, {"r": orjson.dumps(json_only), "d": b"0"})
    await history.add(record(now - 5, 3, status="SUCCESS"))
    assert await ship_all(pg_settings, redis) == 3
    found = await history.recent(
        "demo", [URL], start_ms=now - 60_000, end_ms=now, status=DeliveryStatus.FAILED
    )
    await history.close()
    assert [r.id for r in found.records] == [json_only["id"], failed["id"]]


async def test_a_window_redelivery_not_yet_shipped_is_not_sent_again(
    redis_server: EmbeddedRedis,
    pg_url: str,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
) -> None:
    """PostgreSQL shows a redelivery's failure once it is shipped: a call between its
    attempt and its shipment found the failure it had redelivered still the newest, and
    sent it again (review)."""
    settings = make_settings(
        redis_server.url, history_url=pg_url, history_ship=False, retry_schedule=()
    )
    url = receiver.script("/hook", answer(404))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit_many([("demo", "BUILD_END", {"n": i}) for i in range(2)])
    await run_worker(settings)
    await ship_all(settings, redis)
    async with Services.open(settings, redis) as services:
        first = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker(settings)  # the redeliveries fail; their records wait to be shipped
        unshipped = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker(settings)
        await ship_all(settings, redis)
        shipped = await services.redeliver_failed("demo", url, "BUILD_END")
        await run_worker(settings)
    counts = [(r.queued, r.already_queued) for r in (first, unshipped, shipped)]
    assert counts == [(2, 0), (0, 2), (2, 0)]  # then their own failures, once each
    assert len(receiver.requests()) == 6


async def test_the_fleet_reads_the_streams_bytes_once_a_while_not_each_worker(
    redis: Redis, pg_settings: Settings
) -> None:
    """Reading a stream's bytes whole holds Redis (43 ms for 1,000,000 records), and every
    worker checks every second: each read them itself once 100 times its last read's time
    had passed, so a fleet of 100 held Redis all the time. The read is now the fleet's: one
    worker's, kept in Redis for that long, the others taking it (review of the branch)."""
    history = open_history(pg_settings, redis, keys)
    for n in range(20):
        await history.add(record(now_ms() - 100, n + 1))
    await history.close()

    before = await commands_run(redis)
    fleet = [backlog_bytes.StreamBytes() for _ in range(10)]  # ten workers' checks
    sizes = [await one.read(redis, keys.HISTORY_STREAM, 20) for one in fleet]
    assert (await commands_run(redis))["memory"] - before["memory"] == 1
    held = await redis.memory_usage(keys.HISTORY_STREAM, samples=0)
    assert sizes == [held] * 10


async def rows_of(url: str | None) -> dict[str, int]:
    """Stored records by project."""
    conn = await asyncpg.connect(url or "")
    try:
        rows = await conn.fetch(
            "SELECT doc::json->>'projectId' AS project, count(*) AS n"
            " FROM history_attempts GROUP BY 1"
        )
    finally:
        await conn.close()
    return {r["project"]: r["n"] for r in rows}


async def test_a_projects_largest_records_stop_no_ones_shipping(
    pg_settings: Settings, redis: Redis
) -> None:
    """Records at the size limit (a 64 KiB body of backslashes, doubled by JSON's escapes,
    and a 20 KB response: ~151 KB an entry) made a batch of 2,000 entries 300 MB: one XREAD
    held Redis for everyone, the COPY passed the history timeout, and the same batch was
    tried again for ever while every project's records waited. Here 400 of them (60 MB)
    and another project's small record behind them, under a history timeout of 0.25 s:
    batches bounded by bytes (and halved after a failure) store them all."""
    settings = pg_settings.model_copy(update={"history_timeout": 0.25})
    now = now_ms()
    history = open_history(settings, redis, keys)
    big = {"projectId": "big", "requestBody": "\\" * 65_536, "responseBody": '"' * 10_000}
    for n in range(400):
        await history.add(record(now - 1_000 + n, n, **big))
    await history.add(record(now, 400, projectId="small"))
    await history.close()
    first = (await redis.xrange(keys.HISTORY_STREAM, count=1))[0][1]
    assert sum(len(k) + len(v) for k, v in first.items()) > 150_000  # at the size limit
    stop = asyncio.Event()
    running = asyncio.create_task(Shipper(redis, settings, stop=stop).run(drain_on_stop=False))
    try:

        async def both_stored() -> bool:
            return await rows_of(settings.history_url) == {"big": 400, "small": 1}

        await until(both_stored, 45, "the big records and the small one stored")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert await redis.xlen(keys.HISTORY_STREAM) == 0


async def test_a_batch_that_fails_is_tried_smaller_down_to_one_entry(
    pg_settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes a batch too slow for the history timeout, the next after it holds
    half its entries (down to 1; doubled back after each success): here every batch of more
    than one entry times out, and the records are stored one at a time (the same batch was
    tried again, whole, for ever)."""
    now = now_ms()
    history = open_history(pg_settings, redis, keys)
    for n in range(5):
        await history.add(record(now - 100 + n, n))
    await history.close()
    stop = asyncio.Event()
    shipper = Shipper(redis, pg_settings, stop=stop)
    commit = shipper._commit
    tried: list[int] = []

    async def too_slow_past_one(batch: Any, last: Any, aside: Any = None) -> int:
        tried.append(len(batch))
        if len(batch) > 1:
            raise TimeoutError
        return await commit(batch, last, aside)

    monkeypatch.setattr(shipper, "_commit", too_slow_past_one)
    running = asyncio.create_task(shipper.run(drain_on_stop=False))
    try:

        async def all_stored() -> bool:
            return await rows_of(pg_settings.history_url) == {"demo": 5}

        await until(all_stored, 30, "the records stored one at a time")
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert tried[:3] == [5, 2, 1], tried  # then 2 again after a success, 1 after it failed
