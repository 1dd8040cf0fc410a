"""`retry-bodies`: the Redis memory one event's failing callbacks park, its retries
sharing one copy of the event's body (`dispatcher.bodies`, the default) against each retry
job holding its own (`DISPATCHER_SHARED_BODIES=false`), both in the same run.

For each mode, on an empty Redis: `retry_callbacks` callbacks whose URLs refuse
connections (a free port of 127.0.0.1 that nothing listens on: a retried failure), one
event of ~64 KiB of data, and one worker process (non-burst, the bench's `worker_proc`)
until the fan-out's first attempts are done and every retry waits on the queue (retry
delay 600 s; the host's circuit breaker opens only past `retry_callbacks` failures, so
it puts no first attempt off). The figure is Redis `used_memory` then less before the
emit (each less the clients' buffers: `_used`), per callback: the retries' jobs and the
first attempts' records in the Redis history (each keeping up to
`DISPATCHER_MAX_REQUEST_BODY`, 64 KiB, of its body, or naming the body the Redis history
keeps once: `dispatcher.history.kept`). The details give `MEMORY USAGE` of the queued jobs
and of the kept body.

Ordered (the same callbacks with `orderBy` `lane`, a lane each: their URLs differ): a
small event's deliveries first, each its lane's head, failed, its retry waiting (the lanes
blocked); then the figure is the growth from a second event of ~64 KiB in the same lanes,
once its deliveries are all parked behind the heads (out of the queue: each lane holds two
members, and the fan-out's job has left the queue), each parked job referring to one copy
at `dispatcher:body::lane:…` (`bodies.LANE`, kept without a time to live) or holding the
body. Each run checks where the bodies are (`_check`): a miss is a BenchError.
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
from dispatcher.bodies import LANE
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


async def _parked(
    bench: Bench, keys: Keys, callbacks: int, within: float, members: int = 0
) -> None:
    """Until every callback's retry waits on the queue (none due soon: the fan-out ended)
    and, `members`, the lanes hold that many deliveries (heads and parked jobs)."""
    deadline = time.monotonic() + within
    queued = due = in_lanes = -1
    while time.monotonic() < deadline:
        soon = int(time.time() * 1000) + RETRY_DELAY_S * 500
        queued, due = await asyncio.gather(
            bench.r.zcard(keys.QUEUE), bench.r.zcount(keys.QUEUE, "-inf", soon)
        )
        in_lanes = await _lane_members(bench, keys) if members else 0
        if queued == callbacks and due == 0 and in_lanes == members:
            return
        await asyncio.sleep(0.05)
    raise BenchError(
        f"retry-bodies: {queued} queued ({due} due) of {callbacks} retries, "
        f"{in_lanes} of {members} deliveries in lanes"
    )


async def _used(bench: Bench) -> int:
    """Redis `used_memory` less what its clients take (`CLIENT LIST` `tot-mem`, read in the
    same transaction): the query and reply buffers of the writes just made (tens of KB a
    connection, given back over a second or two) are not what the event left."""
    async with bench.r.pipeline(transaction=True) as pipe:
        pipe.info("memory")
        pipe.client_list()
        memory, clients = await pipe.execute()
    return int(memory["used_memory"]) - sum(int(client["tot-mem"]) for client in clients)


async def _lane_members(bench: Bench, keys: Keys) -> int:
    """The deliveries in every lane: each one's head and the jobs parked behind it."""
    lanes = await bench.r.keys(keys.LANE_PREFIX + "*")
    async with bench.r.pipeline(transaction=False) as pipe:
        for lane in lanes:
            pipe.zcard(lane)
        return sum(await pipe.execute())


async def _key_bytes(bench: Bench, keys: Keys, ordered: bool = False) -> dict[str, Any]:
    """What the queued jobs (`ordered`: the parked ones) and the kept bodies are, in
    `MEMORY USAGE` and bytes."""
    ids = [i.decode() for i in await bench.r.zrange(keys.QUEUE, 0, -1)]
    if ordered:  # the jobs parked behind the heads: the lanes' other members
        lanes = [k.decode() for k in await bench.r.keys(keys.LANE_PREFIX + "*")]
        ids = [m.decode() for lane in lanes for m in await bench.r.zrange(lane, 1, -1)]
    async with bench.r.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.memory_usage(keys.arq_job(job_id), samples=0)
        pipe.memory_usage(keys.QUEUE, samples=0)
        usage = await pipe.execute()
    raw = await bench.r.mget([keys.arq_job(i) for i in ids]) if ids else []
    inline = sum(1 for data in raw if data is not None and "body" in decode(data).payload)
    return {
        "retries": len(ids),
        "retries_with_body": inline,
        "job_bytes_mean": sum(len(d) for d in raw if d is not None) / max(1, len(ids)),
        "jobs_memory_usage": sum(int(u or 0) for u in usage[:-1]),
        "queue_memory_usage": int(usage[-1] or 0),
        **await _bodies(bench, keys),
    }


async def _bodies(bench: Bench, keys: Keys) -> dict[str, Any]:
    """The kept bodies: how many (the lanes' among them), the jobs referring to them (a
    hash's fields besides `body`), their times to live (-1: none) and `MEMORY USAGE`."""
    bodies = [k.decode() for k in await bench.r.keys(keys.BODY_PREFIX + "*")]
    async with bench.r.pipeline(transaction=False) as pipe:
        for key in bodies:
            pipe.hlen(key)
            pipe.pttl(key)
            pipe.memory_usage(key, samples=0)
        found = await pipe.execute()
    return {
        "body_keys": len(bodies),
        "lane_body_keys": sum(1 for key in bodies if key.startswith(keys.BODY_PREFIX + LANE)),
        "body_refs": sum(int(n) - 1 for n in found[0::3]),
        "body_ttl_ms": [int(ttl) for ttl in found[1::3]],
        "bodies_memory_usage": sum(int(u or 0) for u in found[2::3]),
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
    producer, within = Producer(bench.settings, bench.r), 30 + callbacks / 50
    try:
        worker.go()
        if ordered:  # the heads: a small event's deliveries, failed, their retries waiting
            await producer.emit(PROJECT, EVENT, event_data(1) | {"lane": "k"})
            await _parked(bench, keys, callbacks, within, members=callbacks)
        before = await _used(bench)
        started = time.monotonic()
        await producer.emit(PROJECT, EVENT, _big_event() | {"lane": "k"})
        await _parked(bench, keys, callbacks, within, members=2 * callbacks if ordered else 0)
        seconds = time.monotonic() - started
        after = await _used(bench)  # (the worker still running, as at `before`)
        worker.stop()
        await worker.finish(within=30)
    finally:
        await worker.kill()
    found = await _key_bytes(bench, keys, ordered)
    _check(mode, found, callbacks, shared, ordered)
    await bench.r.flushdb()
    return {"used_memory_bytes": after - before, "seconds": round(seconds, 2), **found}


def _check(mode: str, found: dict[str, Any], callbacks: int, shared: bool, ordered: bool) -> None:
    """Every retry (`ordered`: parked job) there; shared, each referring to the one kept
    body (`ordered`: the lanes' copy) and none holding it; inline, each holding it."""
    seen = {name: found[name] for name in ("retries", "retries_with_body", "body_keys",
                                           "lane_body_keys", "body_refs")}  # fmt: skip
    expected = {"retries": callbacks, "retries_with_body": 0 if shared else callbacks,
                "body_keys": int(shared), "lane_body_keys": int(shared and ordered),
                "body_refs": callbacks if shared else 0}  # fmt: skip
    if seen != expected:
        raise BenchError(f"retry-bodies ({mode}): found {seen}, expected {expected}")


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
