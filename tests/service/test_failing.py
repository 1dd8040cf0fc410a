"""The failing callbacks as operators see them (`dispatcher.failing`): by project, however
many one project has, counted in full, read in bounded work; kept by every script that
counts or clears a failure, and built from what a worker of the version before wrote."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from dispatcher import failing
from dispatcher.clock import now_ms
from dispatcher.health import Health
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Event, Region
from dispatcher.registry import Registry
from dispatcher.registry.copies import put_rows, read_rows
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.shards.router import Router
from dispatcher.stats import AttemptStats
from dispatcher.worker.duties import Counts, Duties

keys = Keys()  # today's key names (one shard)


async def _failing(
    registry: Registry, health: Health, project: str, n: int, times: int
) -> list[int]:
    """`n` callbacks of `project`, each failed `times` times (a pipeline a round)."""
    ids = []
    for i in range(n):
        url = f"https://{project}.example/{i}"
        ids.append((await registry.create(project, url, Event.BUILD_END, Region.DEVNET))[0])

    def fail_all(pipe: Pipeline) -> None:
        for cid in ids:
            health.queue_failed(pipe, cid, "HTTP 400", 1_000 + cid)

    for _ in range(times):
        await run_pipeline(health.redis, fail_all)
    return ids


async def _hmget_calls(redis: Redis) -> int:
    """How many HMGETs the server ran so far (a script's own included)."""
    return int((await redis.info("commandstats")).get("cmdstat_hmget", {}).get("calls", 0))


async def test_one_projects_failing_callbacks_crowd_out_no_other_projects(
    redis: Redis, settings: Settings
) -> None:
    """A project's 1,000 callbacks failing for good (their receiver answers 400, so they
    stay listed, disabled, until deleted) and another project's one callback that failed
    later and fewer times: both projects are listed, each with its own count, the victim's
    callback shown; the count is every failing callback, not the 1,000 read; a listing
    reads a few entries of each project, not the whole set. The listing read the 1,000
    oldest entries and sorted those: the victim was never shown, and the count said 1000
    (review)."""
    registry = Registry(redis)
    health = Health(redis, registry, settings)
    await _failing(registry, health, "evil", 1000, times=2)
    (victim,) = await _failing(registry, health, "victim", 1, times=1)
    before = await _hmget_calls(redis)
    found = await health.failing()
    reads = await _hmget_calls(redis) - before
    assert (found.total, found.projects) == (1001, 2)
    groups = {group.project_id: group for group in found.groups}
    assert [f.callback_id for f in groups["victim"].shown] == [victim]
    assert groups["victim"].count == 1 and groups["victim"].shown[0].project_id == "victim"
    assert groups["evil"].count == 1000
    assert len(groups["evil"].shown) == failing.SHOWN_PER_PROJECT
    assert [g.project_id for g in found.groups] == ["evil", "victim"]  # the most failures
    assert reads <= 2 * failing.SHOWN_PER_PROJECT  # the health of those shown, no more


async def test_a_listing_shows_the_projects_with_the_most_failures_and_one_project_in_full(
    redis: Redis, settings: Settings
) -> None:
    """Past `PROJECTS_SHOWN` projects, those with the most failures are shown (and the
    platform's, whose callbacks every project's events reach), all counted; one project's
    listing shows its callbacks up to the limit asked, with its count."""
    registry = Registry(redis)
    health = Health(redis, registry, settings)
    shown = failing.PROJECTS_SHOWN
    for n in range(shown + 1):  # p00 fails most, p50 least
        await _failing(registry, health, f"p{n:02}", 1, times=shown + 2 - n)
    (platform,) = await _failing(registry, health, PLATFORM_PROJECT, 1, times=1)
    quiet = await _failing(registry, health, "quiet", 7, times=1)
    async with Router.open(settings) as router:
        found = await views.failing(router)
        assert (found.total, found.projects) == (shown + 1 + 1 + 7, shown + 3)
        names = [group.project_id for group in found.groups]
        assert names == [*(f"p{n:02}" for n in range(shown)), PLATFORM_PROJECT]
        assert found.groups[-1].shown[0].callback_id == platform
        one = await views.failing(router, "quiet", rows=6)
        ((group),) = one.groups
        assert (group.project_id, group.count, len(group.shown)) == ("quiet", 7, 6)
        assert {f.callback_id for f in group.shown} < set(quiet)
        assert one.total == found.total


async def test_every_reset_takes_a_callback_off_its_projects_listing(
    redis: Redis, settings: Settings
) -> None:
    """A success, an enable, a registration again, a copy written with its count reset and
    a delete each take the callback off its project's failing set, and the project off the
    projects' set once it has none; the project's place follows its worst callback."""
    services = Services(settings, redis)
    registry, health = services.registry, services.health
    first, second = await _failing(registry, health, "demo", 2, times=1)
    await health.failed(second, "HTTP 500")
    assert await redis.zscore(keys.HEALTH_FAILING_PROJECTS, "demo") == 2.0

    async def listed() -> tuple[list[bytes], float | None]:
        return (
            await redis.zrange(keys.failing_of("demo"), 0, -1),
            await redis.zscore(keys.HEALTH_FAILING_PROJECTS, "demo"),
        )

    await run_pipeline(redis, lambda pipe: health.succeeded(pipe, second))
    assert await listed() == ([str(first).encode()], 1.0)

    async def again(clear: object) -> None:
        await health.failed(first, "HTTP 500")
        assert await listed() == ([str(first).encode()], 1.0)
        await clear  # type: ignore[misc]
        assert await listed() == ([], None)
        assert await redis.zscore(keys.HEALTH_FAILING, str(first)) is None

    await run_pipeline(redis, lambda pipe: health.succeeded(pipe, first))
    await again(services.enable(first))
    await again(registry.create("demo", "https://demo.example/0", Event.BUILD_END, Region.DEVNET))
    await again(put_rows(registry, await read_rows(registry, [first]), reset=True))
    await again(registry.delete("demo", first))


async def failed_before(redis: Redis, callback_id: int, since_ms: int) -> None:
    """What the version before's `Failed` writes: the health and the failing set alone."""
    health_key = keys.health(callback_id)
    await redis.hset(health_key, mapping={"failures": 4, "since": since_ms, "lastError": "x"})  # type: ignore[misc]
    await redis.zadd(keys.HEALTH_FAILING, {str(callback_id): since_ms})


async def test_what_a_version_before_wrote_is_listed_after_the_index(
    redis: Redis, settings: Settings
) -> None:
    """A rolling upgrade: the version before wrote the failing set alone. What it wrote
    before is indexed by project at start-up (`Health.upgrade`, until one pass over the
    set is done); what it writes after, by the fleet's sweep (`failing.sweep_page`); a
    callback it reset leaves its project's listing at the first listing that meets it.
    Counted all along; the listing says some may not show while the sweep meets what such a
    worker wrote (it said nothing once the first pass was done, review)."""
    services = Services(settings, redis)
    registry, health = services.registry, services.health
    ids = []
    for i in range(2):
        url = f"https://old.example/{i}"
        ids.append((await registry.create("old", url, Event.BUILD_END, Region.DEVNET))[0])

    await failed_before(redis, ids[0], 1_000)
    found = await health.failing()
    assert (found.total, found.shown, found.indexed) == (1, [], False)
    await services.upgrade()
    found = await health.failing()
    assert ([f.callback_id for f in found.shown], found.indexed) == ([ids[0]], True)

    await failed_before(redis, ids[1], now_ms())  # a worker of the version before, after
    await services.upgrade()  # done once
    assert [f.callback_id for f in (await health.failing()).shown] == [ids[0]]
    duties = Duties(settings, services, [services], AttemptStats(), "t", lambda: Counts(0, 0, 0))
    await duties._sweep(services, slot=1)
    found = await health.failing()
    assert sorted(f.callback_id for f in found.shown) == ids[:2]
    assert (found.total, found.groups[0].count) == (2, 2)
    assert not found.indexed  # such a worker writes still: what it writes may not show yet

    await redis.delete(keys.health(ids[0]))  # the version before's reset after a success
    await redis.zrem(keys.HEALTH_FAILING, str(ids[0]))
    found = await health.failing()
    assert ([f.callback_id for f in found.shown], found.total) == ([ids[1]], 1)
    assert (found.groups[0].count, found.projects) == (1, 1)


async def test_a_start_indexes_a_bounded_share_of_a_large_set(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing set the version before grew large is indexed a share at each start (a
    sweep's worth: here 2 pages of about 10 entries), so that no start is held for long;
    the sweeps go on from where it stopped, until the whole set is done. Counted all
    along."""
    monkeypatch.setattr(failing, "INDEX_PAGE", 10)
    monkeypatch.setattr(failing, "SWEEP_PAGES", 2)
    services = Services(settings, redis)
    async with redis.pipeline(transaction=False) as pipe:
        for cid in range(1, 301):  # past what Redis keeps as one listpack (all in one page)
            pipe.hset(keys.callback(cid), mapping={"id": cid, "projectId": "old"})
            pipe.hset(keys.health(cid), mapping={"failures": 1, "since": cid})
            pipe.zadd(keys.HEALTH_FAILING, {str(cid): cid})
        await pipe.execute()

    async def listed() -> int:
        found = await services.health.failing()
        assert found.total == 300
        return found.groups[0].count if found.groups else 0

    await services.upgrade()
    first = await listed()
    assert 0 < first < 100
    duties = Duties(settings, services, [services], AttemptStats(), "t", lambda: Counts(0, 0, 0))
    await duties._sweep(services, slot=1)
    assert first < await listed() < 300
    for slot in range(2, 100):
        await duties._sweep(services, slot=slot)
        if await redis.exists(keys.HEALTH_FAILING_INDEXED):
            break
    assert await listed() == 300


async def test_once_indexed_the_sweep_reads_only_what_failed_since(
    redis: Redis, settings: Settings
) -> None:
    """Once a pass over the failing set is done, a sweep indexes the entries first failing
    since the sweep before (a margin included), not the whole set: 300 callbacks failing
    for good cost it nothing; one a worker of the version before adds now is indexed by
    the next sweep. The sweep went over the whole set every 5 minutes, for ever (review:
    20 calls of ~500 entries, 7-13 ms each, with 10,000 failing)."""
    services = Services(settings, redis)
    registry, health = services.registry, services.health
    ids = await _failing(registry, health, "stuck", 300, times=1)
    assert (await failing.sweep_page(redis, keys, 0))[0] == 0  # the pass: one page
    since = int(await redis.get(keys.HEALTH_FAILING_INDEXED) or 0)
    assert 0 < since <= now_ms() - failing.RECENT_MARGIN_MS
    async with redis.pipeline(transaction=False) as pipe:  # all failing long ago
        pipe.zadd(keys.HEALTH_FAILING, {str(cid): 1_000 + cid for cid in ids})
        pipe.set(keys.HEALTH_FAILING_INDEXED, now_ms() - failing.RECENT_MARGIN_MS)
        await pipe.execute()
    before = await _hmget_calls(redis), await _hget_calls(redis)
    await failing.sweep_page(redis, keys, 0)
    assert (await _hmget_calls(redis), await _hget_calls(redis)) == before
    (late,) = await _failing(registry, health, "late", 1, times=0)
    await failed_before(redis, late, now_ms())
    before = await _hmget_calls(redis), await _hget_calls(redis)
    await failing.sweep_page(redis, keys, 0)
    assert await _hget_calls(redis) - before[1] == 2  # the one entry failing since
    found = await health.failing()
    assert {g.project_id: g.count for g in found.groups} == {"stuck": 300, "late": 1}


async def _hget_calls(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0))
