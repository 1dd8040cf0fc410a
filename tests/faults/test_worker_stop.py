"""A worker stopped while a claim is out: on a frozen Redis (SIGSTOP) the stop fits
`stop_budget`, what a deployment's stop timeout is checked against, and the claimed jobs
come back within a lease; on a healthy one whose answer arrives during the stop, the
jobs go back at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis

from dispatcher.embedded import EmbeddedRedis
from dispatcher.jobs import EventJob
from dispatcher.keys import Keys
from dispatcher.queue import Queue
from dispatcher.worker import create_worker
from dispatcher.worker.claim_script import DATA_GONE
from dispatcher.worker.loop import Worker, stop_budget
from tests.helpers import make_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from dispatcher.settings import Settings
    from dispatcher.worker.claims import Claimed

JOBS = [f"demo:evt_{i}" for i in range(4)]


class Gate:
    """Holds the worker's next claim until `go` once `armed`; `answer` delays its answer
    (after Redis ran it) by that long."""

    def __init__(self, worker: Worker, answer: float = 0.0) -> None:
        self.armed, self.answer = False, answer
        self.waiting, self.go, self.ran = asyncio.Event(), asyncio.Event(), asyncio.Event()
        claims = worker.served[0].claims
        self._claim = claims.claim
        claims.claim = self.claim  # type: ignore[method-assign]

    async def claim(self, *args: Any, **kwargs: Any) -> list[Claimed]:
        armed = self.armed
        if armed:
            self.waiting.set()
            await self.go.wait()
        claimed = await self._claim(*args, **kwargs)
        if armed and claimed:
            self.armed = False
            self.ran.set()  # Redis ran it: the jobs are leased to this worker
            await asyncio.sleep(self.answer)  # its answer on its way
        return claimed


@dataclass
class Stopped:
    """A worker stopped with a claim out (`stopped_mid_claim`), and its Redis."""

    settings: Settings
    keys: Keys
    redis: Redis
    worker: Worker


@contextlib.asynccontextmanager
async def stopped_mid_claim(
    tmp_path: Path, answer: float, gone: str | None = None, **overrides: Any
) -> AsyncIterator[Stopped]:
    """A worker stopped once Redis ran its claim of `JOBS` (`gone`'s data deleted first),
    whose answer comes `answer` seconds later (3600: none comes, as from a Redis frozen
    once it ran it); the stop awaited within its budget."""
    server = EmbeddedRedis(tmp_path, persist=False)
    server.start()
    settings = make_settings(server.url, **overrides)
    keys, redis = Keys(settings.queue_name), Redis.from_url(server.url)
    worker = create_worker(settings, handle_signals=False, poll_delay=0.05)
    gate = Gate(worker, answer)
    running = asyncio.create_task(worker.main())
    try:
        gate.armed = True
        async with asyncio.timeout(10):
            await gate.waiting.wait()
            for job_id in JOBS:
                await Queue(redis, keys).enqueue(EventJob(job_id[5:], "demo", "BUILD_END"))
            if gone is not None:
                await redis.delete(keys.arq_job(gone))  # its data expired before it ran
            gate.go.set()
            await gate.ran.wait()
        worker.stop()
        async with asyncio.timeout(stop_budget(settings)):
            await running
        yield Stopped(settings, keys, redis, worker)
    finally:
        if not running.done():
            running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()
        await redis.aclose()
        server.stop()


async def test_a_stop_does_not_wait_for_a_claim_a_frozen_redis_holds(tmp_path: Path) -> None:
    """One shard, its Redis frozen while a claim is out: the stop waited for the claim's
    retries (4 x the Redis timeout) before its own budget began, and a claim answering
    after the stop started its jobs (review: 64.8 s after SIGTERM with the defaults, past
    the 60 s before SIGKILL). The wait ends at the stop; the stop fits `stop_budget`."""
    server = EmbeddedRedis(tmp_path, persist=False)
    server.start()
    settings = make_settings(server.url, redis_timeout=3, shutdown_grace=1)
    worker = create_worker(settings, handle_signals=False, poll_delay=0.05)
    claim_out = asyncio.Event()
    frozen = False
    claim = worker.served[0].claim

    async def watched(*args: object) -> object:
        if frozen:
            claim_out.set()
        return await claim(*args)  # type: ignore[arg-type]

    worker.served[0].claim = watched  # type: ignore[method-assign,assignment]
    running = asyncio.create_task(worker.main())
    try:
        await asyncio.sleep(0.5)  # claiming, on an empty queue
        os.kill(server.pid, signal.SIGSTOP)
        frozen = True
        async with asyncio.timeout(30):
            await claim_out.wait()
        await asyncio.sleep(0.2)  # sent: Redis holds it
        worker.stop()
        async with asyncio.timeout(stop_budget(settings)):  # a deployment's bound
            await running
    finally:
        os.kill(server.pid, signal.SIGCONT)
        if not running.done():
            running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()
        server.stop()


async def test_a_claim_answering_during_the_stop_gives_its_jobs_back_at_once(
    tmp_path: Path,
) -> None:
    """A healthy Redis ran a claim whose answer arrives just after the stop: the stop gave
    the claim up at once, its jobs stayed leased to the stopped worker for a lease with
    nobody running them, each counted a claim (toward giving up unsent), and one whose
    data was gone was dropped with no record (review). The stop waits for the answer and
    gives the jobs back: due now, no lease, no claim counted; the one with no data is
    dropped on record."""
    async with stopped_mid_claim(tmp_path, 0.2, JOBS[-1], lease_seconds=30) as stopped:
        keys, redis = stopped.keys, stopped.redis
        seconds, micros = await redis.time()
        now_ms = seconds * 1000 + micros // 1000
        queued = dict(await redis.zrange(keys.QUEUE, 0, -1, withscores=True))
        assert sorted(queued) == [job_id.encode() for job_id in JOBS[:-1]]
        assert all(due <= now_ms for due in queued.values())  # due now, not a lease later
        for job_id in JOBS[:-1]:
            assert await redis.get(keys.ARQ_IN_PROGRESS_PREFIX + job_id) is None  # no lease
            assert await redis.get(keys.ARQ_RETRY_PREFIX + job_id) is None  # not counted
        dropped = [orjson.loads(e) for e in await redis.lrange(keys.DROPPED, 0, -1)]  # type: ignore[misc]
        assert [(e["jobId"], e["reason"]) for e in dropped] == [(JOBS[-1], DATA_GONE)]
        assert stopped.worker.jobs_started == 0


async def test_a_claim_still_out_after_the_stops_wait_gives_its_jobs_back_in_a_lease(
    tmp_path: Path,
) -> None:
    """A claim Redis ran but whose answer does not come (a Redis frozen after it ran it)
    is given up once the stop's wait for it ends, within the stop's budget: its jobs,
    leased to the stopped worker, are claimed again once that lease lapses (late, not
    lost). The one whose data was gone left the queue in that claim: its drop is on
    record though no answer came (the worker wrote it from the answer: no record, review)."""
    taken = JOBS[:-1]
    async with stopped_mid_claim(
        tmp_path, 3600, JOBS[-1], lease_seconds=2, redis_timeout=3
    ) as stopped:
        keys, redis, token = stopped.keys, stopped.redis, stopped.worker.token
        leases = [await redis.get(keys.ARQ_IN_PROGRESS_PREFIX + job_id) for job_id in taken]
        assert leases == [token.encode()] * len(taken)  # given up: not put back
        dropped = [orjson.loads(e) for e in await redis.lrange(keys.DROPPED, 0, -1)]  # type: ignore[misc]
        assert [(e["jobId"], e["reason"]) for e in dropped] == [(JOBS[-1], DATA_GONE)]
        after = create_worker(stopped.settings, handle_signals=False, burst=True)
        try:
            async with asyncio.timeout(30):
                await after.main()  # until the queue is empty: the leases lapsed, all ran
        finally:
            await after.close()
        assert (after.jobs_started, after.jobs_complete) == (len(taken), len(taken))
        assert await redis.zcard(keys.QUEUE) == 0
        assert await redis.llen(keys.DROPPED) == 1  # type: ignore[misc]
