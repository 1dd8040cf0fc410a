"""A worker SIGKILLed half-way through a fan-out re-sends at most the chunk in hand."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from redis.asyncio import Redis

from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import Receiver, hang, start_worker, until


async def test_a_worker_killed_mid_fan_out_resends_at_most_one_chunk(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    chunk, total = 40, 200
    registry = Registry(redis)
    for n in range(total):  # a receiver that answers after 0.5 s
        await registry.create("demo", receiver.script(f"/c/{n}", hang(0.5)), Event.BUILD_END,
                              Region.DEVNET)  # fmt: skip
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-1"})
    env = {"DISPATCHER_LEASE_SECONDS": "2", "DISPATCHER_FAN_OUT_CHUNK": str(chunk)}
    log = tmp_path / "workers.log"
    workers.append(start_worker(settings.redis_url or "", log, **env))

    async def second_chunk_sent() -> bool:
        return len(receiver.seen) > chunk

    await until(second_chunk_sent, 30, "the second chunk on its way")
    workers[0].send_signal(signal.SIGKILL)  # its requests are waiting for their answers
    workers[0].wait(timeout=5)
    workers.append(start_worker(settings.redis_url or "", log, **env))

    async def all_done() -> bool:
        every = len({seen.path for seen in receiver.seen}) == total
        return every and await redis.zcard(settings.queue_name) == 0

    await until(all_done, 60, "every callback reached and the queue empty")
    resent = len(receiver.seen) - total
    assert 0 < resent <= chunk, f"{resent} requests sent again"
    first_chunk = [f"/c/{n}" for n in range(chunk)]  # done before the kill: never again
    assert all(len(receiver.requests(path)) == 1 for path in first_chunk)
