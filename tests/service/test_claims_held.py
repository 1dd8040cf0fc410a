"""A worker that holds its claims back (the history backlog bound, stalled writes) takes no
lane delivery either, over a real Redis, a real worker and a real receiver: the release of
a lane's delivery hands the next one to its worker outside any claim (`Adopt`), and that
ignored the hold, so a paused worker kept delivering an ordered lane's chain (review: 28
deliveries of one lane after its claims stopped, none of another project's)."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.registry import Options, Registry
from dispatcher.settings import Settings
from dispatcher.worker import create_worker
from tests.helpers import Receiver, answer, until


async def test_a_worker_holding_its_claims_back_puts_a_lanes_next_delivery_back(
    settings: Settings, redis: Redis, receiver: Receiver
) -> None:
    """Three events of one ordered lane; the worker's hold (`shipping.full`, as when the
    history backlog is full) starts while the first delivery is at its receiver. Its release
    takes the second for the worker, which puts it back in the queue, due at once, instead
    of sending it; once the hold lifts, the second and third are delivered, in order, once
    each. Before the fix the second and third were sent while the worker held back."""
    settings = settings.model_copy(update={"total_timeout": 30})  # the first waits for `go`
    go = asyncio.Event()

    async def first(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(go.wait(), 20)  # a guard: the test sets it
        return web.Response(text="ok")

    url = receiver.script("/lane", first, answer(200))
    registry = Registry(redis)
    await registry.create(
        "demo", url, Event.BUILD_END, Region.DEVNET, options=Options(order_by="buildId")
    )
    producer = Producer(settings, redis)
    await producer.emit("demo", "BUILD_END", {"buildId": "b", "step": 0}, event_id="e0")
    worker = create_worker(settings, burst=False, poll_delay=0.05, handle_signals=False)
    task = asyncio.create_task(worker.main())
    queue = Queue(redis, Keys(settings.queue_name))
    try:
        await receiver.wait_for(1, "/lane", within=20)
        for step in (1, 2):  # fanned out into the lane behind the first (parked)
            await producer.emit(
                "demo", "BUILD_END", {"buildId": "b", "step": step}, event_id=f"e{step}"
            )

        async def fanned_out() -> bool:  # nothing due, and only the first delivery runs
            due, _ = await queue.depth()
            return due == 0 and len(worker.running) == 1

        await until(fanned_out, 20, "the three fan-outs")
        worker.shipping.full = True  # the history backlog bound: claim nothing
        go.set()

        async def put_back() -> bool:
            due, _ = await queue.depth()
            return due == 1

        await until(put_back, 20, "the lane's next delivery put back, due")
        assert len(receiver.requests("/lane")) == 1
        worker.shipping.full = False
        await receiver.wait_for(3, "/lane", within=20)
        steps = [orjson.loads(seen.body)["data"]["step"] for seen in receiver.requests("/lane")]
        assert steps == [0, 1, 2]
    finally:
        go.set()
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()
