"""`retry-bodies`: the Redis memory one event's failing callbacks park, its retries
sharing one copy of the event's body (`dispatcher.bodies`, the default) against each retry
job holding its own (`DISPATCHER_SHARED_BODIES=false`), both in the same run.

For each mode, on an empty Redis: `retry_callbacks` callbacks whose URLs refuse
connections (a free port of 127.0.0.1 that nothing listens on: a retried failure), one
event of ~64 KiB of data, and one worker process (non-burst, the bench's `worker_proc`)
until the fan-out's first attempts are done and every retry waits on the queue (retry
delay 600 s; the host's circuit breaker opens only past `retry_callbacks` failures, so
it puts no first attempt off). The figure is Redis `used_memory` then less before the
emit, per callback: the retries' jobs and the first attempts' records in the Redis history
(each keeping up to `DISPATCHER_MAX_REQUEST_BODY`, 64 KiB, of its body, or naming the body
the Redis history keeps once: `dispatcher.history.kept`). The details give `MEMORY USAGE`
of the queued jobs and of the kept body.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson

from bench.common import EVENT, PROJECT, event_data, free_port
from bench.harness import Scenario, register_callbacks
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row
from dispatcher.jobs import decode
from dispatcher.keys import Keys
from dispatcher.producer import Producer
from dispatcher.registry import Options

if TYPE_CHECKING:
    from bench.harness import Bench

DATA_BYTES = 64 * 1024  # the event's data, about
RETRY_DELAY_S = 600  # the retries stay queued while Redis is read
MAXIMUM = 0.1  # shared / inline


def _big_event() -> dict[str, Any]:
    return event_data(0) | {"log": "x" * DATA_BYTES}


async def _parked(bench: Bench, keys: Keys, callbacks: int, within: float) -> None:
    """Until every callback's retry waits on the queue (none due soon: the fan-out ended)."""
    deadline = time.monotonic() + within
    queued = due = -1
    while time.monotonic() < deadline:
        soon = int(time.time() * 1000) + RETRY_DELAY_S * 500
        queued, due = await asyncio.gather(
            bench.r.zcard(keys.QUEUE), bench.r.zcount(keys.QUEUE, "-inf", soon)
        )
        if queued == callbacks and due == 0:
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"retry-bodies: {queued} queued ({due} due) of {callbacks} retries")


async def _key_bytes(bench: Bench, keys: Keys, ordered: bool = False) -> dict[str, Any]:
    """What the queued jobs (`ordered`: the parked ones) and the kept bodies are, in
    `MEMORY USAGE` and bytes."""
    ids = [i.decode() for i in await bench.r.zrange(keys.QUEUE, 0, -1)]
    if ordered:  # the jobs parked behind the heads: the lanes' other members
        lanes = [k.decode() for k in await bench.r.keys(keys.LANE_PREFIX + "*")]
        ids = [m.decode() for lane in lanes for m in await bench.r.zrange(lane, 1, -1)]
    bodies = [k.decode() for k in await bench.r.keys(keys.BODY_PREFIX + "*")]
    async with bench.r.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.memory_usage(keys.arq_job(job_id), samples=0)
        for key in bodies:
            pipe.memory_usage(key, samples=0)
        pipe.memory_usage(keys.QUEUE, samples=0)
        usage = await pipe.execute()
    raw = await bench.r.mget([keys.arq_job(i) for i in ids]) if ids else []
    inline = sum(1 for data in raw if data is not None and "body" in decode(data).payload)
    return {
        "retries": len(ids),
        "retries_with_body": inline,
        "body_keys": len(bodies),
        "job_bytes_mean": sum(len(d) for d in raw if d is not None) / max(1, len(ids)),
        "jobs_memory_usage": sum(int(u or 0) for u in usage[: len(ids)]),
        "bodies_memory_usage": sum(int(u or 0) for u in usage[len(ids) : -1]),
        "queue_memory_usage": int(usage[-1] or 0),
    }


async def _one(
    bench: Bench, shared: bool, callbacks: int, port: int, *, ordered: bool = False
) -> dict[str, Any]:
    """Redis bytes one event's `callbacks` failing first attempts leave queued; `ordered`:
    its deliveries parked behind each lane's head (an event before it, failed and waiting
    for its retry), callbacks ordered by `lane`."""
    mode = ("ordered-" if ordered else "") + ("shared" if shared else "inline")
    keys = Keys(bench.settings.queue_name)
    env = {
        "DISPATCHER_SHARED_BODIES": "true" if shared else "false",
        "DISPATCHER_RETRY_SCHEDULE": orjson.dumps([RETRY_DELAY_S]).decode(),
        # every callback is on one host: its breaker would put most first attempts off
        "DISPATCHER_CIRCUIT_THRESHOLD": str(callbacks + 1),
    }
    await bench.r.flushdb()
    options = Options(order_by="lane") if ordered else None
    await register_callbacks(bench.r, f"http://127.0.0.1:{port}", callbacks, options)
    worker = await WorkerProcess.start(
        bench.url, burst=False, log_path=bench.logs / f"retry-bodies-{mode}.log", env=env
    )
    producer = Producer(bench.settings, bench.r)
    try:
        worker.go()
        if ordered:  # the heads: a small event's deliveries, failed, their retries waiting
            await producer.emit(PROJECT, EVENT, event_data(1) | {"lane": "k"})
            await _parked(bench, keys, callbacks, within=30 + callbacks / 50)
        before = int((await bench.r.info("memory"))["used_memory"])
        started = time.monotonic()
        await producer.emit(PROJECT, EVENT, _big_event() | {"lane": "k"})
        await _parked(bench, keys, callbacks, within=30 + callbacks / 50)
        seconds = time.monotonic() - started
        worker.stop()
        await worker.finish(within=30)
    finally:
        await worker.kill()
    after = int((await bench.r.info("memory"))["used_memory"])
    found = await _key_bytes(bench, keys, ordered)
    _check(mode, found, (1, 0) if shared else (0, callbacks))
    await bench.r.flushdb()
    return {"used_memory_bytes": after - before, "seconds": round(seconds, 2), **found}


def _check(mode: str, found: dict[str, Any], expected: tuple[int, int]) -> None:
    if (found["body_keys"], found["retries_with_body"]) != expected:
        raise BenchError(
            f"retry-bodies ({mode}): {found['body_keys']} kept bodies and "
            f"{found['retries_with_body']} retries holding a body, expected {expected}"
        )


async def run(bench: Bench) -> list[Row]:
    callbacks = bench.sizes.retry_callbacks
    port = free_port()  # nothing listens there: every attempt is refused, then retried
    shared = await _one(bench, True, callbacks, port)
    inline = await _one(bench, False, callbacks, port)
    lanes = await _one(bench, True, callbacks, port, ordered=True)
    lanes_inline = await _one(bench, False, callbacks, port, ordered=True)
    details = {"callbacks": callbacks, "data_bytes": DATA_BYTES, "shared": shared,
               "inline": inline, "ordered_shared": lanes,
               "ordered_inline": lanes_inline}  # fmt: skip
    mib = 1024 * 1024
    return [
        ratio_row(
            "retry-bodies",
            f"Redis bytes parked per failing callback, shared bodies (one ~64 KiB event, "
            f"{callbacks:,} callbacks)",
            shared["used_memory_bytes"] / callbacks, "B",
            "the same, bodies in each job", inline["used_memory_bytes"] / callbacks,
            maximum=MAXIMUM, details=details,
        ),
        ratio_row(
            "retry-bodies",
            f"Redis used_memory growth, the whole event ({callbacks:,} retries queued), "
            "shared bodies",
            shared["used_memory_bytes"] / mib, "MiB",
            "bodies in each job", inline["used_memory_bytes"] / mib,
        ),
        ratio_row(
            "retry-bodies",
            f"Redis bytes parked per ordered callback behind a failing head, shared bodies "
            f"(one ~64 KiB event, {callbacks:,} lanes)",
            lanes["used_memory_bytes"] / callbacks, "B",
            "the same, bodies in each job", lanes_inline["used_memory_bytes"] / callbacks,
            maximum=MAXIMUM,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("retry-bodies", run)
