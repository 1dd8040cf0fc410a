"""Shards under faults: a worker process serving two shards SIGKILLed mid-delivery; a
mover SIGSTOPped past its lease, or SIGKILLed after its flip: nothing is lost on either."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis as sync_redis
from aiohttp import web

from dispatcher.auth import Role
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import Unavailable
from dispatcher.models import Region
from dispatcher.placement import rendezvous
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.holdings import holds
from dispatcher.shards.lanes import hold_source
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.worker import create_worker
from tests.cluster import grown
from tests.helpers import Receiver, make_settings, start_process, start_worker, until
from tests.service.test_shard_growth import (
    LATE_S,
    PROJECTS,
    _all_recorded,
    _emit_until,
    _frozen,
    _only_on_new_shard,
)

EVENTS_PER_PROJECT = 10


async def test_a_worker_killed_while_serving_two_shards_loses_nothing(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    settings = await grown(make_settings(urls[0], redis_shards=urls))

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    url = receiver.script("/hook", slow)
    async with Router.open(settings) as router:
        projects = _two_on_each_shard(router)
        for project in projects:
            registration = Registration(project, url, Region.DEVNET, "test", "t")
            await router.of(project).register(registration, "BUILD_END")
        async with Producer(settings) as producer:
            ids = await producer.emit_many(
                [(p, "BUILD_END", {"n": n}) for p in projects for n in range(EVENTS_PER_PROJECT)]
            )
        env = {"DISPATCHER_LEASE_SECONDS": "2", "DISPATCHER_REDIS_SHARDS": json.dumps(urls)}
        log = tmp_path / "workers.log"
        workers.append(start_worker(urls[0], log, **env))

        async def busy_on_both() -> bool:
            started = {_project_of(s.body) for s in receiver.requests()}
            return {router.of(p).shard.index for p in started} == {0, 1}

        await until(busy_on_both, 20, "requests of both shards' projects")
        workers[0].send_signal(signal.SIGKILL)  # mid-delivery (0.5 s each), on both shards
        workers[0].wait(timeout=5)
        assert len(await _succeeded(router, projects, url)) < len(ids), "finished too soon"
        workers.append(start_worker(urls[0], log, **env))
        killed = time.monotonic()

        async def every_event_recorded() -> bool:
            return await _succeeded(router, projects, url) == set(ids)

        await until(every_event_recorded, 40, "a SUCCESS record for every event, on its shard")
        assert time.monotonic() - killed < 30
    by_delivery: dict[str, set[bytes]] = {}
    for seen in receiver.requests():
        by_delivery.setdefault(seen.headers["webhook-id"], set()).add(seen.body)
    assert len(by_delivery) == len(ids)  # every delivery made, repeats under the same id
    assert all(len(bodies) == 1 for bodies in by_delivery.values())


def _two_on_each_shard(router: Router) -> list[str]:
    found: dict[int, list[str]] = {0: [], 1: []}
    for n in range(100):
        project = f"p{n}"
        on = found[router.of(project).shard.index]
        if len(on) < 2:
            on.append(project)
    return found[0] + found[1]


def _project_of(body: bytes) -> str:
    project: str = json.loads(body)["projectId"]
    return project


async def _succeeded(router: Router, projects: list[str], url: str) -> set[str | None]:
    """The events with a SUCCESS record, read from each project's own shard."""
    now = now_ms()
    found: set[str | None] = set()
    for project in projects:
        page = await router.of(project).history.query(
            project, url, "BUILD_END", start_ms=now - 120_000, end_ms=now + 60_000, page_size=100
        )
        found |= {r.event_id for r in page.records if r.status.value == "SUCCESS"}
    return found


@pytest.mark.timeout(150)  # four processes and two moves of 3 s settles: near 60 s, loaded
async def test_a_mover_paused_past_its_lease_stops_and_the_next_one_finishes_its_move(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """`dispatcher shards move P --to 1` is SIGSTOPped while it waits for the freeze to
    settle, past its lease; a second mover takes the lease and moves P while a worker
    process delivers P's events; the first, SIGCONTed, stops at its next step (exit 1)
    without touching what the second one did. Every event ends in a SUCCESS record on
    shard 1, and nothing of P is left on shard 0."""
    urls, settings, env = await _movers_shards(shard_servers)
    url = receiver.url("/hook")
    log = tmp_path / "processes.log"
    async with Router.open(settings) as router:
        project = next(p for p in (f"p{n}" for n in range(100)) if router.of(p).shard.index == 0)
        await router.of(project).register(
            Registration(project, url, Region.DEVNET, "test", "t"), "BUILD_END"
        )
        workers.append(start_worker(urls[0], log, **env))
        async with Producer(settings) as producer:
            ids = await producer.emit_many([(project, "BUILD_END", {"n": n}) for n in range(5)])
            first = start_process(["shards", "move", project, "--to", "1"], urls[0], log, **env)
            workers.append(first)

            async def frozen() -> bool:
                await router.placement.load()
                placed = router.placement.explicit.get(project)
                return placed is not None and placed.moving_to == 1

            async def settling() -> bool:  # its placement written, its freeze mark set
                return await frozen() and bool(await router.shards[0].redis.exists(freeze))

            # (not the placement alone: seen in Redis before its mover read the answer, paused
            # then past its Redis timeout, it sends the write again on waking: lease gone)
            freeze = router.shards[0].keys.callbacks_frozen(project)
            await until(settling, 60, "the first mover freezing the project")
            first.send_signal(signal.SIGSTOP)  # in its settle, its lease held
            assert await frozen() and await hold_source(router.shards[1], project) is None
            lease = router.home.keys.move_lease(project)

            async def lapsed() -> bool:
                return not await router.home.redis.exists(lease)

            await until(lapsed, 20, "the paused mover's lease to lapse")
            second = start_process(["shards", "move", project, "--to", "1"], urls[0], log, **env)
            workers.append(second)
            ids += await producer.emit_many(  # during the second move
                [(project, "BUILD_END", {"n": n}) for n in range(5, 10)]
            )
            assert await asyncio.to_thread(second.wait, 60) == 0
            first.send_signal(signal.SIGCONT)
            assert await asyncio.to_thread(first.wait, 30) == 1
            ids += await producer.emit_many(
                [(project, "BUILD_END", {"n": n}) for n in range(10, 15)]
            )
        await router.placement.load()
        assert router.of(project).shard.index == 1

        await _moved_whole(router, project, url, ids)
        assert (await router.shards[1].callbacks(project)).count == 1
    assert "this mover stopped" in log.read_text()
    delivered = {seen.headers["webhook-id"] for seen in receiver.requests("/hook")}
    assert len(delivered) == len(ids)  # every delivery made (repeats under the same id)


async def test_a_mover_killed_after_its_flip_has_its_move_finished_by_the_next(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """`dispatcher shards move P --to 1` is SIGKILLed right after it flipped P's placement,
    while a worker process is still delivering P's events queued on shard 0 (the receiver
    answers once the mover is dead): their records are written on shard 0 after the mover
    copied P's history. The next move of P, once the dead mover's lease lapsed, finishes
    that move: every event's SUCCESS record is on shard 1, nothing of P is left on shard
    0, its lanes there are let go."""
    urls, settings, env = await _movers_shards(shard_servers)
    answer = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await answer.wait()
        return web.Response(text="ok")

    url = receiver.script("/hook", held)
    log = tmp_path / "processes.log"
    async with Router.open(settings) as router:
        project = next(p for p in (f"p{n}" for n in range(100)) if router.of(p).shard.index == 0)
        await router.of(project).register(
            Registration(project, url, Region.DEVNET, "test", "t"), "BUILD_END"
        )
        slow = {"DISPATCHER_TOTAL_TIMEOUT": "30", "DISPATCHER_JOB_TIMEOUT": "40"}
        workers.append(start_worker(urls[0], log, **env, **slow))
        async with Producer(settings) as producer:
            ids = await producer.emit_many([(project, "BUILD_END", {"n": n}) for n in range(5)])
        await until(lambda: _started(receiver, 5), 20, "the first deliveries under way")
        mover = start_process(["shards", "move", project, "--to", "1"], urls[0], log, **env)
        workers.append(mover)

        async def flipped() -> bool:
            await router.placement.load()
            placed = router.placement.explicit.get(project)
            return placed is not None and placed.moving_to is None and placed.index == 1

        await until(flipped, 20, "the mover flipping the project's placement")
        mover.send_signal(signal.SIGKILL)
        mover.wait(timeout=5)
        answer.set()  # their records go to shard 0 now, after the dead mover's copy
        old = router.shards[0]

        async def recorded_on_old() -> bool:
            now = now_ms()
            page = await old.history.query(
                project, url, "BUILD_END", start_ms=now - 120_000, end_ms=now + 60_000
            )
            return len(page.records) == len(ids)

        await until(recorded_on_old, 20, "the first events' records, on shard 0")
        async with Producer(settings) as producer:  # on shard 1 now
            ids += await producer.emit_many([(project, "BUILD_END", {"n": n}) for n in range(5, 8)])
        deadline = time.monotonic() + 30
        for attempt in range(100):  # refused while the dead mover's lease holds
            said = tmp_path / f"move-{attempt}.log"
            again = start_process(["shards", "move", project, "--to", "1"], urls[0], said, **env)
            workers.append(again)
            if await asyncio.to_thread(again.wait, 60) == 0:
                break
            assert "another move of it is under way" in said.read_text(), said.read_text()
            assert time.monotonic() < deadline, "the next move never took the lease"
            await asyncio.sleep(0.5)

        await _moved_whole(router, project, url, ids)
    assert f"{project}: finishing its move from shard 0" in said.read_text()


async def _movers_shards(
    shard_servers: list[EmbeddedRedis],
) -> tuple[list[str], Settings, dict[str, str]]:
    """The two shards emptied and in use: their URLs, settings, and the environment of
    the processes (a mover settles 3 s at each step; its lease lasts 4 s; the fleet's
    producers wait 1 s, as the test's do, so a drain waits 7 s past its flip for their
    late pushes)."""
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    settings = await grown(make_settings(urls[0], redis_shards=urls, placement_refresh=0.2))
    env = {
        "DISPATCHER_REDIS_SHARDS": json.dumps(urls),
        "DISPATCHER_PLACEMENT_REFRESH": "1",
        "DISPATCHER_MOVE_LEASE": "4",
        "DISPATCHER_EMIT_WAIT": "1",
    }
    return urls, settings, env


async def _moved_whole(router: Router, project: str, url: str, ids: list[str]) -> None:
    """Every event of `project` has its SUCCESS record on shard 1; nothing of it is left
    on shard 0, no hold on shard 1."""

    async def every_event_recorded() -> bool:
        return await _succeeded(router, [project], url) == set(ids)

    await until(every_event_recorded, 40, "a SUCCESS record for every event, on shard 1")
    old, new = router.shards
    assert not await holds(old, project)
    assert await hold_source(new, project) is None


async def _started(receiver: Receiver, n: int) -> bool:
    return len(receiver.requests()) >= n


async def test_adding_a_shard_moves_projects_under_load_and_loses_nothing(
    shard_servers: list[EmbeddedRedis], receiver: Receiver
) -> None:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    one = make_settings(urls[0], placement_refresh=0.05)
    two = make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)
    moving = [p for p in PROJECTS if rendezvous(p, 2) == 1]
    assert moving and len(moving) < len(PROJECTS)
    emitted: list[str] = []
    async with Router.open(one) as router:  # today: one Redis
        for project in PROJECTS:
            registration = Registration(project, receiver.url(f"/{project}"), Region.DEVNET, "t")
            await router.of(project).register(registration, "BUILD_END")
            await router.of(project).roles.grant(project, "alice", Role.ADMIN)
        async with Producer(one) as producer:
            emitted += await producer.emit_many([(p, "BUILD_END", {"n": -1}) for p in PROJECTS])
    worker = create_worker(two, poll_delay=0.01, handle_signals=False)
    delivering = asyncio.create_task(worker.main())
    stop = asyncio.Event()
    load = asyncio.create_task(_emit_until(two, stop, emitted))
    try:
        async with Router.open(two) as router:  # the longer list, on every process
            assert {router.of(p).shard.index for p in PROJECTS} == {0}  # not in use yet
            mover = Mover(router, lambda _: None, settle_s=0.3, late_s=LATE_S)
            pinned = await mover.grow()
            assert sorted(pinned) == sorted(moving)
            moved = asyncio.create_task(mover.rebalance())
            await until(lambda: _frozen(router, moving[0]), 10, "a move freezing a project")
            assert await moved == len(moving)
            assert router.placement.explicit == {}  # every project where the hash puts it
            stop.set()
            await load
            await until(lambda: _all_recorded(router, emitted, receiver), 30, "every event")
            for project in moving:
                await _only_on_new_shard(router, project)
    finally:
        stop.set()
        worker.stop()
        await asyncio.wait_for(delivering, 20)
        await worker.close()
    assert len(emitted) > 5 * len(PROJECTS), "the load ran during the move"


async def test_a_mover_stopped_by_ctrl_c_says_what_it_left_and_the_list_names_it(
    shard_servers: list[EmbeddedRedis],
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """`dispatcher shards move P --to 1` gets SIGINT (Ctrl+C) while its freeze settles: it
    exits 130 saying where it stopped and the command that finishes it; `dispatcher shards
    list` names the move under way, and a change of P's callbacks is refused saying so.
    It exited 130 with no word, the list showed nothing, and the 503 said "for a minute"
    for as long as no one ran the move again (review). Run again, the move finishes."""
    urls, settings, env = await _movers_shards(shard_servers)
    log, listed = tmp_path / "mover.log", tmp_path / "list.log"
    async with Router.open(settings) as router:
        project = next(p for p in (f"p{n}" for n in range(100)) if router.of(p).shard.index == 0)
        registration = Registration(project, receiver.url("/hook"), Region.DEVNET, "test", "t")
        await router.of(project).register(registration, "BUILD_END")
        mover = start_process(["shards", "move", project, "--to", "1"], urls[0], log, **env)
        workers.append(mover)
        freeze = router.shards[0].keys.callbacks_frozen(project)

        async def frozen() -> bool:
            return bool(await router.shards[0].redis.exists(freeze))

        await until(frozen, 60, "the mover freezing the project")
        mover.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(mover.wait, 30) == 130
        said = " ".join(log.read_text().split())
        assert f"stopped after: {project}: shard 0 -> 1: freezing its callbacks" in said, said
        assert f"run `dispatcher shards move {project} --to 1` again" in said, said
        lister = start_process(["shards", "list"], urls[0], listed, **env)
        assert await asyncio.to_thread(lister.wait, 30) == 0
        assert f"{project}>1" in listed.read_text()
        await router.placement.load()
        with pytest.raises(Unavailable, match="A move that stopped holds them"):
            await router.callbacks(project).register(registration, "BUILD_START")
        again = start_process(["shards", "move", project, "--to", "1"], urls[0], log, **env)
        workers.append(again)
        assert await asyncio.to_thread(again.wait, 60) == 0
        await router.placement.load()
        assert router.of(project).shard.index == 1
        assert (await router.shards[1].callbacks(project)).count == 1
