"""Fan-out in chunks: every callback once, at most a chunk in flight per event, a crash
re-sends at most the chunk in hand; and the upgrade of a registry stored by version 1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from dispatcher.headers import DELIVERY_HEADER
from dispatcher.jobs import EventJob, decode
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import PLATFORM_PROJECT, Event, Level, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Registry
from dispatcher.registry.match import ChunkQuery
from dispatcher.registry.matches import Matches
from dispatcher.settings import Settings
from dispatcher.worker.claims import Claims
from tests.helpers import Receiver, RunWorker, make_settings

keys = Keys()  # today's key names (one shard)


async def test_a_fan_out_in_chunks_reaches_every_callback_once(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    in_flight = most = 0

    async def counted(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return web.Response(text="ok")

    registry = Registry(redis)
    expected = set()
    for n, (project, pipeline) in enumerate(
        [(PLATFORM_PROJECT, None)] * 5 + [("demo", None)] * 12 + [("demo", "p1")] * 6
    ):
        path = f"/cb/{n}"
        await registry.create(project, receiver.script(path, counted), Event.BUILD_END,
                              Region.DEVNET, pipeline_id=pipeline)  # fmt: skip
        expected.add(path)
    # the platform's /cb/0 again, on the project and the pipeline: sent once, by the platform
    await registry.create("demo", receiver.url("/cb/0"), Event.BUILD_END, Region.DEVNET)
    await registry.create("demo", receiver.url("/cb/0"), Event.BUILD_END, Region.DEVNET,
                          pipeline_id="p1")  # fmt: skip
    off, _ = await registry.create("demo", receiver.url("/off"), Event.BUILD_END, Region.DEVNET)
    await registry.set_enabled(off, False, "test")
    chunked = make_settings(settings.redis_url or "", fan_out_chunk=4)

    await Producer(chunked, redis).emit("demo", "BUILD_END", {"pipelineId": "p1"})
    worker = await run_worker(chunked)
    assert {seen.path for seen in receiver.seen} == expected
    assert len(receiver.seen) == len(expected)  # each once
    assert most <= 4  # a chunk at a time
    assert worker.jobs_complete >= 26 // 4  # one fan-out job per chunk of ids
    assert await redis.zcard(chunked.queue_name) == 0


async def test_a_fan_outs_next_chunk_is_read_while_the_one_before_runs(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each chunk after the first is read ahead, while the one before is attempted, and
    its run takes that read: one Redis read per chunk, none twice."""
    registry = Registry(redis)
    for n in range(10):
        await registry.create("demo", receiver.url(f"/cb/{n}"), Event.BUILD_END, Region.DEVNET)
    reads: list[int] = []  # the cursor of each chunk read from Redis
    ahead: list[int] = []  # the cursor of each chunk asked for ahead
    queue_on, read_ahead = ChunkQuery.queue_on, Matches.read_ahead

    def read(query: ChunkQuery, pipe: Pipeline) -> None:
        reads.append(query.after)
        queue_on(query, pipe)

    def asked(matches: Matches, query: ChunkQuery, *args: Any) -> None:
        ahead.append(query.after)
        read_ahead(matches, query, *args)

    monkeypatch.setattr(ChunkQuery, "queue_on", read)
    monkeypatch.setattr(Matches, "read_ahead", asked)
    chunked = make_settings(settings.redis_url or "", fan_out_chunk=4)
    await Producer(chunked, redis).emit("demo", "BUILD_END", {})
    await run_worker(chunked)
    assert sorted(seen.path for seen in receiver.seen) == sorted(f"/cb/{n}" for n in range(10))
    assert len(ahead) == 2 and reads == [0, *ahead]  # the 2nd and 3rd chunks: read ahead


async def test_a_fan_out_moves_on_under_its_event_id_and_a_resent_move_does_nothing(
    settings: Settings, redis: Redis
) -> None:
    """Between chunks the job keeps its id (the event stays queued: emitting it again is
    still refused) and gets the next cursor. The writer may send a batch again when its
    answer was lost: the move sent twice must not move the job again, nor revive it once
    it has finished."""
    event = EventJob("evt_1", "demo", "BUILD_END")
    queue = Queue(redis, Keys(settings.queue_name))
    assert await queue.enqueue(event)
    claims = Claims(redis, Keys(settings.queue_name), "me", 10)
    [claimed] = await claims.claim(1)

    def move(pipe: Pipeline) -> None:
        claims.hand_over(pipe, claimed, event.continued(41))

    assert await run_pipeline(redis, move) == [1]
    assert not await queue.enqueue(event)  # still queued under its id
    [again] = await claims.claim(1)
    assert again.job_id == "demo:evt_1" and again.claims == 1  # a fresh count for the new chunk
    assert EventJob.from_wire(decode(again.data or b"").payload).after == 41
    assert await run_pipeline(redis, move) == [0]  # sent again: the job had moved on
    assert EventJob.from_wire(decode(again.data or b"").payload).after == 41
    await run_pipeline(redis, lambda pipe: claims.finish(pipe, again.job_id))
    assert await run_pipeline(redis, move) == [0]  # nor does it revive a finished job
    assert await redis.zcard(settings.queue_name) == 0
    assert not await redis.exists(keys.arq_job("demo:evt_1"))


async def test_a_re_runs_next_chunks_skip_what_a_run_with_other_bounds_recorded(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A fleet mid-rollout of `DISPATCHER_FAN_OUT_CHUNK` (or callbacks enabled between two
    runs): a run with one chunk of 6 recorded the last 3 deliveries and died before its
    end. Its re-run, by chunks of 3, sends the first 3, and its next chunk runs as a re-run
    too: it finds the last 3 recorded and sends none of them again."""
    registry = Registry(redis)
    ids = [
        (await registry.create("demo", receiver.url(f"/cb/{n}"), Event.BUILD_END,
                               Region.DEVNET))[0]
        for n in range(6)
    ]  # fmt: skip
    chunked = make_settings(settings.redis_url or "", fan_out_chunk=3)
    await Producer(chunked, redis).emit("demo", "BUILD_END", {}, event_id="big")
    job_id = "demo:big"
    emitted = EventJob.from_wire(decode(await redis.get(keys.arq_job(job_id)) or b"").payload)
    for callback_id in ids[3:]:  # what the run before recorded, its job going on
        mark = keys.delivery(f"{job_id}.{callback_id}@{emitted.emitted_at}")
        await redis.set(mark, "done", ex=3600)
    await redis.set(keys.ARQ_RETRY_PREFIX + job_id, 1, ex=3600)  # claimed once, its lease lapsed
    await run_worker(chunked)
    assert sorted(seen.path for seen in receiver.seen) == ["/cb/0", "/cb/1", "/cb/2"]
    assert await redis.zcard(chunked.queue_name) == 0


async def test_an_event_id_emitted_again_is_fanned_out_again_through_a_re_run(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """An event id emitted again once its event ended (a producer's retried emit) is a new
    emission: its deliveries are sent again under the same delivery ids, and a re-run of
    its fan-out (its first run died) skips none of them for what the emission before
    recorded: progress marks are one emission's."""
    for n in range(3):
        await Registry(redis).create("demo", receiver.url(f"/cb/{n}"), Event.BUILD_END,
                                     Region.DEVNET)  # fmt: skip
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_END", {}, event_id="again")
    await run_worker()
    await asyncio.sleep(0.002)  # another millisecond: another emission
    await producer.emit("demo", "BUILD_END", {}, event_id="again")
    await redis.set(keys.ARQ_RETRY_PREFIX + "demo:again", 1, ex=3600)  # its first run died
    await run_worker()
    paths = sorted(seen.path for seen in receiver.seen)
    assert paths == ["/cb/0", "/cb/0", "/cb/1", "/cb/1", "/cb/2", "/cb/2"]
    ids = {seen.headers[DELIVERY_HEADER] for seen in receiver.seen}
    assert len(ids) == 3  # the same three deliveries, each sent once per emission
    assert await redis.zcard(settings.queue_name) == 0


async def test_a_registry_of_layout_1_is_upgraded(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    registry = Registry(redis)
    callback_id, _ = await registry.create("demo", receiver.url(), Event.BUILD_END, Region.OSS)
    # as version 1 stored it: the match set a SET, the callback without level fields
    match = keys.match("demo", "BUILD_END")
    await redis.delete(match)
    await redis.sadd(match, callback_id)  # type: ignore[misc]  # sync|async
    old_fields = ("level", "pipelineId", "authHeaderName", "authHeaderValue")
    await redis.hdel(keys.callback(callback_id), *old_fields)  # type: ignore[misc]  # sync|async
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()  # a worker upgrades before it claims
    assert len(receiver.requests()) == 1
    assert await redis.type(match) == b"zset"
    assert await redis.get(keys.CALLBACKS_LAYOUT) == b"2"
    [listed] = (await registry.list("demo")).records
    assert listed.level is Level.PROJECT and listed.pipeline_id is None
    assert await registry.upgrade() == 0  # once is enough
