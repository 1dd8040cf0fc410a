"""The history schema upgraded by the API and the workers themselves once PostgreSQL is
back (`dispatcher.history.heal`): a rollout with a new migration during a PostgreSQL outage
(the pre-start `db upgrade --if-reachable` only warned) left the schema behind for good."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, MutableMapping
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from dispatcher.clock import now_ms
from dispatcher.embedded import FAST, EmbeddedPostgres, EmbeddedRedis
from dispatcher.history import heal, open_history, schema
from dispatcher.keys import Keys
from dispatcher.services import Services
from dispatcher.worker.shipping import Shipping
from tests.helpers import UID, app_client, make_settings, on_postgres, until

keys = Keys()  # today's key names (one shard)

URL = "http://127.0.0.1:9000/hook"
HISTORY = "/ms/openapi/api/apigw/v3/projects/demo/callbacks/history"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of the test's own, its schema at version 4 (an older release's), shut
    down (connections refused) until the test starts it again."""
    with EmbeddedPostgres(settings=FAST) as server:
        monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
        on_postgres(server.url, "upgrade")
        monkeypatch.undo()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGINT)  # a fast shutdown; its data stays
        server.proc.wait(10)
        yield server


async def version_of(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await schema.schema_version(conn)
    finally:
        await conn.close()


def upgraded(logs: list[MutableMapping[str, Any]]) -> list[list[int]]:
    """What each upgrade applied (one that found the work done applied nothing)."""
    return [e["applied"] for e in logs if e["event"] == "history.schema_upgraded" and e["applied"]]


async def test_the_api_upgrades_a_schema_left_behind_once_postgres_is_back(
    behind: EmbeddedPostgres, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The API started while PostgreSQL was down, on a schema older than its code: its
    history reads answered 503 after PostgreSQL came back too, until someone ran `dispatcher
    db upgrade` by hand (review). The API upgrades it once PostgreSQL answers, and its reads
    answer 200, with no manual step."""
    settings = make_settings(redis_server.url, history_url=behind.url, history_timeout=1)
    with capture_logs() as logs:
        async with app_client(settings, redis) as api:

            async def page() -> int:
                params = {"url": URL, "event": "BUILD_END"}
                return (await api.get(HISTORY, params=params, headers=UID)).status_code

            assert await page() == 503  # PostgreSQL down
            await asyncio.to_thread(behind.start)

            async def answers() -> bool:
                return await page() == 200

            await until(answers, 30, "history reads answer once PostgreSQL is back")

            async def latest() -> bool:  # reads answer from version 7 (`schema.NEEDS`):
                return await version_of(behind.url) == schema.MIGRATIONS[-1][0]  # 8 after

            await until(latest, 30, "the schema upgraded to its latest version")
    assert upgraded(logs) == [[5, 6, 7, 8]], logs
    assert any(e["event"] == "history.schema_unchecked" for e in logs)  # said once, down


async def test_workers_upgrade_a_schema_left_behind_and_ship_once_postgres_is_back(
    behind: EmbeddedPostgres, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """Workers started while PostgreSQL was down, on a schema older than their code: each
    shipper failed at its start (the schema behind) and tried again for ever, the records
    waiting in Redis up to the backlog limit, then every worker stopped claiming (review).
    Two workers at once: one of them upgrades the schema once PostgreSQL answers (each
    version applied once, under the migrations' advisory lock), and the records are shipped."""
    settings = make_settings(redis_server.url, history_url=behind.url, history_timeout=1)
    history = open_history(settings, redis, keys)
    record: dict[str, Any] = {
        "projectId": "demo", "callBackUrl": URL, "events": "BUILD_END", "status": "SUCCESS",
        "errorMsg": None, "requestHeaders": [], "requestBody": "{}", "responseCode": 200,
        "responseBody": "ok", "startTime": now_ms() - 5, "endTime": now_ms(),
        "createdTime": now_ms(), "attempt": 1, "deliveryId": "evt_1.1",
    }  # fmt: skip
    await history.add(record)  # type: ignore[arg-type]
    await history.close()
    with capture_logs() as logs:
        async with Services.open(settings, redis) as one, Services.open(settings, redis) as two:
            workers = [Shipping([one]), Shipping([two])]
            for shipping in workers:
                shipping.start()
            try:
                await asyncio.sleep(1)  # both tried while PostgreSQL was down
                await asyncio.to_thread(behind.start)

                async def shipped() -> bool:
                    return int(await redis.xlen(keys.HISTORY_STREAM)) == 0

                await until(shipped, 30, "the record shipped once PostgreSQL is back")

                async def latest() -> bool:  # shipping goes on from version 7 (NEEDS)
                    return await version_of(behind.url) == schema.MIGRATIONS[-1][0]

                await until(latest, 30, "the schema upgraded to its latest version")
            finally:
                for shipping in workers:
                    await shipping.stop(1)
    assert upgraded(logs) == [[5, 6, 7, 8]], logs  # one of them; the other found it done
    assert not [e for e in logs if e["event"] == "history.schema_upgrade_failed"]


async def test_a_process_older_than_the_schema_leaves_it_as_it_is(
    pg_server: EmbeddedPostgres, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process of an older version (its latest migration 4) on a newer schema (8):
    nothing to do, nothing applied; and this version's, while another process's migration
    holds the lock, waits for it (asking again, never inside a statement) and then finds
    the schema done."""
    settings = make_settings(redis_server.url, history_url=pg_server.url, history_timeout=1)
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
    with capture_logs() as logs:
        await heal.keep(settings)
    monkeypatch.undo()
    assert not logs  # nothing to upgrade, nothing applied
    assert await version_of(pg_server.url) == schema.MIGRATIONS[-1][0]
    holder = await asyncpg.connect(pg_server.url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", schema._LOCK)
        await holder.execute("DELETE FROM history_schema WHERE version = 8")
        keeping = asyncio.create_task(heal.keep(settings))
        await asyncio.sleep(0.5)
        assert not keeping.done()  # waits for the lock
        await holder.execute("INSERT INTO history_schema (version) VALUES (8)")
        await holder.execute("SELECT pg_advisory_unlock($1)", schema._LOCK)
        with capture_logs() as logs:
            await asyncio.wait_for(keeping, 10)
        assert upgraded(logs) == []  # the other process did it
    finally:
        await holder.execute(
            "INSERT INTO history_schema (version) VALUES (8) ON CONFLICT DO NOTHING"
        )
        await holder.close()
