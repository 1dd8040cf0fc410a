"""A worker stopped while its one shard's Redis is frozen (SIGSTOP) under a claim: the stop
fits `stop_budget`, what a deployment's stop timeout is checked against."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from dispatcher.embedded import EmbeddedRedis
from dispatcher.worker import create_worker
from dispatcher.worker.loop import stop_budget
from tests.helpers import make_settings


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
