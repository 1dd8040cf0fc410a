"""What only the Redis history store has: its keys and its batched retention sweep (the
PostgreSQL store drops whole day partitions: tests/service/test_history_postgres.py)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history.moving import forget_project
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.settings import Settings
from tests.helpers import make_settings
from tests.service.test_history import URL, fill, record

keys = Keys()  # today's key names (one shard)


async def test_retention_removes_old_records_and_their_index_entries_only(
    redis: Redis, settings: Settings
) -> None:
    now = now_ms()
    day = 86_400_000
    old = await fill(redis, settings, [now - 8 * day, now - 7 * day - 1])
    old_other = await fill(redis, settings, [now - 9 * day], event="BUILD_START")
    fresh = await fill(redis, settings, [now - 6 * day, now - 1000])
    history = RedisHistory(redis, settings, keys)
    # before the sweep, the query already hides what is past the retention
    page = await history.query("demo", URL, "BUILD_END", start_ms=now - 30 * day, end_ms=now)
    assert sorted(r.id for r in page.records) == fresh

    assert await history.sweep(now_ms=now) == 3
    for rid in old + old_other:
        assert not await redis.exists(keys.history_record(rid))
    assert await redis.exists(*(keys.history_record(rid) for rid in fresh)) == 2
    index = keys.history_index("demo", "BUILD_END", URL)
    assert await redis.zcount(index, "-inf", "(+inf") == 2  # and its mark
    emptied = keys.history_index("demo", "BUILD_START", URL)
    assert not await redis.exists(emptied)
    assert not await redis.sismember(keys.HISTORY_INDEXES, emptied)  # type: ignore[misc]  # sync|async
    # the URL's index across events lost the same records, and only those
    across = keys.history_url_index("demo", URL, failed=False)
    assert sorted(int(m) for m in await redis.zrange(across, 0, -1)) == fresh
    assert await history.sweep(now_ms=now) == 0


async def test_sweep_works_in_bounded_batches(redis: Redis, redis_server: EmbeddedRedis) -> None:
    settings = make_settings(redis_server.url, sweep_batch=10)
    now = now_ms()
    await fill(redis, settings, [now - 8 * 86_400_000 + i for i in range(35)])
    history = RedisHistory(redis, settings, keys)
    assert await history.sweep(now_ms=now, max_batches=2) == 20
    assert await history.sweep(now_ms=now) == 15


async def test_a_deliverys_attempts_are_one_string_and_a_zset_of_before_still_reads(
    redis: Redis, settings: Settings
) -> None:
    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    first, second = record(now - 2000, n=1), record(now - 1000, n=1)
    second["attempt"] = 2
    ids = [await history.add(first), await history.add(second), await history.add(first)]
    assert ids[0] == ids[2]  # written twice, listed once
    key = keys.history_attempts("evt_1.1")
    assert await redis.get(key) == f"{ids[0]} {ids[1]}".encode()
    assert 0 < await redis.ttl(key) <= settings.retention_ms // 1000 + 86_400
    found = await history.attempts("evt_1.1", "demo")
    assert [(r.id, r.attempt) for r in found] == [(ids[1], 2), (ids[0], 1)]

    # a delivery whose attempts were indexed before: a ZSET by createdTime, kept as such
    old = record(now - 3000, n=2)
    old_id = await history.add(old)
    zset = keys.history_attempts("evt_2.1")
    await redis.delete(zset)
    await redis.zadd(zset, {str(old_id): now - 3000})
    retry = record(now - 500, n=2)
    retry["attempt"] = 2
    later = await history.add(retry)
    assert await redis.type(zset) == b"zset"
    assert await redis.zrange(zset, 0, -1) == [str(old_id).encode(), str(later).encode()]
    found = await history.attempts("evt_2.1", "demo")
    assert [r.id for r in found] == [later, old_id]


async def test_only_the_write_that_creates_an_index_adds_it_to_the_sweeps_set(
    redis: Redis, settings: Settings
) -> None:
    """An index's first record adds it to the set the sweep walks; the next ones do not
    (the index's mark says it is there), until the sweep has removed the emptied index."""

    async def sadds() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_sadd", {}).get("calls", 0))

    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    before = await sadds()
    for n in range(3):
        await history.add(record(now - 1000 + n))
    assert await sadds() - before == 1
    index = keys.history_index("demo", "BUILD_END", URL)
    assert await redis.smembers(keys.HISTORY_INDEXES) == {index.encode()}  # type: ignore[misc]  # sync|async
    assert await history.sweep(now_ms=now + settings.retention_ms + 1000) == 3
    assert not await redis.exists(index)
    assert not await redis.sismember(keys.HISTORY_INDEXES, index)  # type: ignore[misc]  # sync|async
    await history.add(record(now + settings.retention_ms))  # the index again: in the set
    assert await redis.sismember(keys.HISTORY_INDEXES, index)  # type: ignore[misc]  # sync|async


async def test_a_projects_failures_index_is_swept_with_its_records_and_forgotten(
    redis: Redis, settings: Settings
) -> None:
    """The project's failures index loses what the retention sweep removes, and the
    shard move's forget empties it; a success never enters it; it expires with its last
    record's retention, whatever sweeps or not."""
    history = RedisHistory(redis, settings, keys)
    now, day = now_ms(), 86_400_000
    failed = [{**record(t, n=i), "status": "FAILED"} for i, t in enumerate([now - 8 * day, now])]
    old_id, new_id = [await history.add(r) for r in failed]  # type: ignore[arg-type]
    await history.add(record(now - 1000, n=3))
    index = keys.history_failed("demo")
    assert [int(m) for m in await redis.zrange(index, 0, -1)] == [old_id, new_id]
    assert 0 < await redis.ttl(index) <= settings.retention_ms // 1000 + day  # with its last
    assert await history.sweep(now_ms=now) == 1
    assert [int(m) for m in await redis.zrange(index, 0, -1)] == [new_id]
    await forget_project(history, "demo", lambda: None)
    assert not await redis.exists(index)


async def test_the_sweep_fills_the_failures_indexes_from_the_urls_once_bit_by_bit(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures recorded by a version before the projects' failures indexes are in their
    URLs' failed indexes only: the sweep adds them, a page of the index set a run, going on
    where the last run stopped, then never again; and it trims what a sweep of that
    version left in the failures index."""
    history = RedisHistory(redis, settings, keys)
    now, day = now_ms(), 86_400_000
    written = [
        {**record(now - 3000, n=1), "status": "FAILED"},
        {**record(now - 2000, n=2, url=URL + "/b", event="BUILD_START"), "status": "FAILED"},
        {**record(now - 1000, n=3), "projectId": "elsewhere", "status": "FAILED"},
        record(now - 500, n=4),
        *(
            {**record(now - 400, n=5 + i, url=f"{URL}/{i}"), "projectId": "many"}
            for i in range(300)
        ),
    ]
    ids = [await history.add(r) for r in written]  # type: ignore[arg-type]
    for project in ("demo", "elsewhere"):  # as a version before wrote them
        await redis.delete(keys.history_failed(project))
    await redis.zadd(keys.history_failed("demo"), {"000000000000999": now - 8 * day})  # left
    await redis.delete(keys.HISTORY_LAYOUT)

    assert await history.sweep(now_ms=now, max_seconds=0) == 0  # one page of 303 indexes
    state = await redis.get(keys.HISTORY_LAYOUT)
    assert state is not None and state.startswith(b"scan:")
    cursors: list[int] = []
    real_sscan = redis.sscan

    async def sscan(name: str, cursor: int = 0, **kw: Any) -> Any:
        cursors.append(cursor)
        return await real_sscan(name, cursor, **kw)

    monkeypatch.setattr(redis, "sscan", sscan)
    assert await history.sweep(now_ms=now) == 0  # on from there, done: nothing old to remove
    assert cursors[0] == int(state.removeprefix(b"scan:")) != 0
    assert await redis.get(keys.HISTORY_LAYOUT) == b"2"
    found = await history.failures("demo", start_ms=now - 60_000, end_ms=now)
    assert [r.id for r in found.records] == [ids[1], ids[0]]
    assert [int(m) for m in await redis.zrange(keys.history_failed("demo"), 0, -1)] == ids[:2]
    assert 0 < await redis.ttl(keys.history_failed("demo")) <= settings.retention_ms // 1000 + day
    mine = await history.failures("elsewhere", start_ms=now - 60_000, end_ms=now)
    assert [r.id for r in mine.records] == [ids[2]]
    assert not await redis.exists(keys.history_failed("many"))  # no failure there
    await redis.delete(keys.history_failed("demo"))
    await history.sweep(now_ms=now)  # done: the next sweeps copy nothing again
    assert not await redis.exists(keys.history_failed("demo"))
