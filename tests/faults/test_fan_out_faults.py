"""A worker SIGKILLed half-way through a fan-out re-sends at most the chunk in hand, under
the same delivery ids, and each callback's delivery ends in one SUCCESS record."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from redis.asyncio import Redis

from dispatcher.models import DeliveryStatus, Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.faults.chaos import all_records
from tests.helpers import Receiver, hang, start_worker, until


async def test_a_worker_killed_mid_fan_out_resends_at_most_one_chunk(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    chunk, total = 40, 200
    registry, ids = Registry(redis), {}
    for n in range(total):  # a receiver that answers after 0.5 s; a token: signed requests
        url = receiver.script(f"/c/{n}", hang(0.5))
        ids[f"/c/{n}"], _ = await registry.create(
            "demo", url, Event.BUILD_END, Region.DEVNET, "s3cret"
        )
    event_id = await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-1"})
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
    for path, callback_id in ids.items():  # each resend under its delivery's one id
        delivery_id = f"demo:{event_id}.{callback_id}"
        sent = {
            seen.headers.get(name)
            for seen in receiver.requests(path)
            for name in ("webhook-id", "X-DEVOPS-DELIVERY-ID")
        }
        assert sent == {delivery_id}, f"{path}: sent as {sent}"
        records = await all_records(redis, settings, "demo", receiver.url(path), "BUILD_END")
        ended = [(r.delivery_id, r.status) for r in records]
        assert ended == [(delivery_id, DeliveryStatus.SUCCESS)], f"{path}: {ended}"
