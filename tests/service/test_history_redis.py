"""What only the Redis history store has: its keys and its batched retention sweep (the
PostgreSQL store drops whole day partitions: tests/service/test_history_postgres.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.history.moving import forget_project
from dispatcher.history.redis import RedisHistory
from dispatcher.history.redis_record import ATTEMPTS_KEPT
from dispatcher.keys import Keys, history_member
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.services import Services
from dispatcher.settings import Settings
from tests.helpers import make_settings
from tests.service.test_history import URL, fill, record

keys = Keys()  # today's key names (one shard)
UNFINISHED = "dispatcher_history_sweep_unfinished_total"


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


async def test_bounded_sweeps_go_on_where_the_last_stopped_until_every_index_is_swept(
    redis: Redis, redis_server: EmbeddedRedis
) -> None:
    """More indexes than one run's bound covers (a tiny one here; at the cron's 15 s, a
    tenant's 180,000): each run began the set's scan from its start again, so it swept the
    same first indexes every time and the others (other tenants' too) kept their entries
    past the retention for ever, the index sorted sets growing without bound (review).
    The scan's place is kept in Redis: consecutive runs make one pass over them all; a run
    stopped by its bound says so (`dispatcher_history_sweep_unfinished_total`)."""
    settings = make_settings(redis_server.url)
    history = RedisHistory(redis, settings, keys)
    now, day, count = now_ms(), 86_400_000, 400
    for i in range(count):
        for created in (now - 8 * day, now - 1000):
            await history.add(record(created, url=f"http://127.0.0.1:9/{i}", n=i))
    stopped = REGISTRY.get_sample_value(UNFINISHED) or 0.0
    runs = [await history.sweep(now_ms=now, max_batches=50) for _ in range(count // 50 + 2)]
    left = [
        i
        async for i in redis.sscan_iter(keys.HISTORY_INDEXES)
        if await redis.zcount(i, 0, now - 7 * day)
    ]
    assert (sum(runs), len(left)) == (count, 0), runs
    assert (REGISTRY.get_sample_value(UNFINISHED) or 0.0) - stopped >= count // 50 - 1


async def test_an_index_the_sweep_keeps_expires_a_day_past_the_retention_unless_swept_again(
    redis: Redis, redis_server: EmbeddedRedis
) -> None:
    """The records carry a time to live, their indexes did not: an index the sweep does
    not reach (stopped, failing) kept its entries for ever (review). Each index the sweep
    keeps (and its URL's) is given the records' time to live then, so one it no longer
    visits goes a day past the retention; the write of a record adds no command."""
    settings = make_settings(redis_server.url)
    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    await history.add(record(now - 8 * 86_400_000, n=1))
    await history.add(record(now - 1000, n=2))
    index, across = (
        keys.history_index("demo", "BUILD_END", URL),
        keys.history_url_index("demo", URL, failed=False),
    )
    assert (await redis.ttl(index), await redis.ttl(across)) == (-1, -1)
    assert await history.sweep(now_ms=now) == 1
    ttl = settings.retention_ms // 1000 + 86_400
    assert ttl - 60 <= await redis.ttl(index) <= ttl and ttl - 60 <= await redis.ttl(across) <= ttl


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


async def test_a_deliverys_attempts_keep_the_newest_ids_only(
    redis: Redis, settings: Settings
) -> None:
    """A delivery id is the same on every redelivery and every emission of its event id
    again, so a project could grow its attempts key without end (each record copied it
    whole: quadratic work on the Redis every project shares). It keeps the newest
    `ATTEMPTS_KEPT` ids, in the order written (another worker's attempt may have a lower
    id: each takes ids in blocks); a record sent again while kept is listed once; a key
    written long before it was bounded is read by its end and cut by its next write."""
    history = RedisHistory(redis, settings, keys, id_floor=10**6)  # room for lower ids
    key, now, many = keys.history_attempts("evt_1.1"), now_ms(), ATTEMPTS_KEPT * 5 // 2
    written = [record(now - many + i, n=1) for i in range(many)]
    ids = [await history.add(r) for r in written]
    assert await redis.get(key) == " ".join(map(str, ids[-ATTEMPTS_KEPT:])).encode()
    await history.add(written[-1])  # a pipeline sent again: its id is there
    assert await redis.get(key) == " ".join(map(str, ids[-ATTEMPTS_KEPT:])).encode()
    found = await history.attempts("evt_1.1", "demo")
    assert [r.id for r in found] == ids[: -ATTEMPTS_KEPT - 1 : -1]
    assert [r.id for r in await history.attempts("evt_1.1", "demo", limit=1)] == [ids[-1]]
    other = record(now + 1, n=1)  # another worker's attempt, from its block of lower ids
    other["id"] = ids[0] - 10
    await history.add(other)
    kept = (await redis.get(key)).split()
    assert len(kept) == ATTEMPTS_KEPT
    assert kept[-2:] == [str(ids[-1]).encode(), str(other["id"]).encode()]
    assert [r.id for r in await history.attempts("evt_1.1", "demo", limit=1)] == [other["id"]]

    sharded = RedisHistory(redis, settings, keys, id_floor=10**15)  # ids of 16 digits
    key = keys.history_attempts("evt_2.1")
    last = [await sharded.add(record(now - 3 + i, n=2)) for i in range(3)]
    long = " ".join(str(10**15 - 5000 + i) for i in range(5000))  # grown before the bound
    await redis.set(key, long + " " + " ".join(map(str, last)), ex=600)
    assert [r.id for r in await sharded.attempts("evt_2.1", "demo")] == last[::-1]
    newer = await sharded.add(record(now, n=2))
    kept = (await redis.get(key)).split()
    assert len(kept) == ATTEMPTS_KEPT and kept[-4:] == [str(i).encode() for i in [*last, newer]]


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
    shard move's forget empties it; a success never enters it; it has its last record's
    time to live (the retention and a day), whatever sweeps or not."""
    history = RedisHistory(redis, settings, keys)
    now, day = now_ms(), 86_400_000
    failed = [{**record(t, n=i), "status": "FAILED"} for i, t in enumerate([now - 8 * day, now])]
    old_id, new_id = [await history.add(r) for r in failed]  # type: ignore[arg-type]
    await history.add(record(now - 1000, n=3))
    index = keys.history_failed("demo")
    assert [int(m) for m in await redis.zrange(index, 0, -1)] == [old_id, new_id]
    assert (
        settings.retention_ms // 1000
        < await redis.ttl(index)
        <= settings.retention_ms // 1000 + 86_400
    )
    assert await history.sweep(now_ms=now) == 1
    assert [int(m) for m in await redis.zrange(index, 0, -1)] == [new_id]
    await forget_project(history, "demo", lambda: None)
    assert not await redis.exists(index)
    ghost = keys.history_failed("ghost")  # left by a sweep of a version before, no index
    await redis.zadd(ghost, {history_member(5): now})
    assert await forget_project(history, "ghost", lambda: None) == 0
    assert not await redis.exists(ghost)


async def test_failures_from_before_the_projects_index_are_found_through_their_urls(
    redis: Redis, settings: Settings
) -> None:
    """A version before wrote failures in their URLs' indexes only: the every-URL listings
    read the first URLs' indexes beside the project's failures index, as before it, each
    record shown once. The sweep trims what a sweep of that version left in the project's
    index."""
    registry = Registry(redis)
    for url in (URL, URL + "/b"):
        await registry.create("demo", url, Event.BUILD_END, Region.DEVNET)
    history = RedisHistory(redis, settings, keys)
    now, day = now_ms(), 86_400_000
    old = await history.add({**record(now - 3000, n=1), "status": "FAILED"})
    new = await history.add({**record(now - 1000, n=2, url=URL + "/b"), "status": "FAILED"})
    ok = await history.add(record(now - 2000, n=3))
    await redis.zrem(keys.history_failed("demo"), history_member(old))  # as it was written
    await redis.zadd(keys.history_failed("demo"), {history_member(999): now - 8 * day})
    async with Services.open(settings, redis) as services:

        async def listed(**query: Any) -> list[int]:
            return [r.id for r in (await services.recent("demo", **query)).records]

        assert await listed(status="FAILED", within="1h") == [new, old]
        assert await listed(within="all") == [new, ok, old]
        assert await listed(status="SUCCESS") == [ok]
    assert await history.sweep(now_ms=now) == 0
    assert [int(m) for m in await redis.zrange(keys.history_failed("demo"), 0, -1)] == [new]


async def test_a_record_gone_before_its_index_entry_leaves_its_page_short_not_the_listing_cut(
    redis: Redis, settings: Settings
) -> None:
    """A record evicted from a full Redis before the sweep took its index entries: the
    "Recent deliveries" pages went on from the records read, so a page whose records were
    gone had no "Older" link and the older attempts were never shown. They go on from the
    index entries now."""
    history = RedisHistory(redis, settings, keys)
    now = now_ms()
    first, gone, last = [await history.add(record(now - 3000 + i * 1000, n=i)) for i in range(3)]
    await redis.delete(keys.history_record(gone))
    seen, before, pages = [], None, 0
    for _ in range(5):
        page = await history.recent(
            "demo", [URL], start_ms=now - 60_000, end_ms=now, before=before, limit=1
        )
        seen += [r.id for r in page.records]
        pages += 1
        if page.next is None:
            break
        before = page.next
    assert seen == [last, first] and pages == 3


async def test_a_window_redelivery_reads_no_body_of_a_record_it_does_not_send(
    redis: Redis, settings: Settings
) -> None:
    """A window's walk reads the ids of its records and which gave up (the project's dead
    letters), never their bodies: only the final failures' records are read. It read every
    record of the window with its body, 100 at a time, its successes too: 6,000 records of
    60 KB for one failure took 2.9 s, MGETs of 6 MB that held other clients' commands 41
    ms (review)."""
    cid, _ = await Registry(redis).create("demo", URL, Event.BUILD_END, Region.DEVNET)
    history, now, pad = RedisHistory(redis, settings, keys), now_ms(), "x" * 60_000
    for n in range(60):
        attempt = record(now - 1000 - n, n=n)
        attempt["requestBody"], attempt["final"], attempt["callbackId"] = pad, True, cid
        attempt["deliveryId"] = f"demo:e{n}.{cid}"
        if n == 30:
            attempt["status"], attempt["responseCode"] = "FAILED", 500
        await history.add(attempt, dead=n == 30)
    before = (await redis.info("stats"))["total_net_output_bytes"]
    done = await Services(settings, redis).redeliver_failed("demo", URL, "BUILD_END")
    read = (await redis.info("stats"))["total_net_output_bytes"] - before
    assert done.queued == 1
    assert read < 5 * len(pad), read  # the failure's record, its newest attempt: not 60
