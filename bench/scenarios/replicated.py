"""`replicated`: Redis Sentinel, on a private group of its own (a master, a replica, three
sentinels, down-after-milliseconds 1000). With `DISPATCHER_REDIS_MIN_REPLICAS=1` against 0,
interleaved rep by rep: deliveries/s of one worker process (its writes wait for no
replica), and events/s of one producer process, 500 emits in flight (each pipeline waits
for one replica). Then the failover gap: one worker delivering a full queue, the master
SIGKILLed a second in; the longest time with no delivery at the receiver from then on."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import EVENT, PROJECT, TOKEN, bench_settings, event_data
from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess, run_loadgen
from bench.report import Row, ratio_row
from dispatcher.connections import connect
from dispatcher.embedded import SentinelGroup
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry

if TYPE_CHECKING:
    from bench.harness import Bench

KILL_AFTER_S = 1.0
GAP_TARGET_S = 5.0
GAP_EVENTS = 10_000  # enough to keep a worker busy through the failover


@contextlib.contextmanager
def min_replicas(count: int) -> Iterator[None]:
    """`DISPATCHER_REDIS_MIN_REPLICAS` for the processes started meanwhile."""
    name = "DISPATCHER_REDIS_MIN_REPLICAS"
    before = os.environ.get(name)
    os.environ[name] = str(count)
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


async def _queue(bench: Bench, url: str, events: int, emit_t: float | None = None) -> None:
    """An empty Redis, one callback on the receiver, `events` queued (each on the replica
    before the next batch)."""
    settings = bench_settings(url, redis_min_replicas=1)
    redis = connect(settings)
    try:
        await redis.flushdb()
        await Registry(redis).create(
            PROJECT, f"{bench.receiver.base}/hook/0", Event(EVENT), Region.DEVNET, TOKEN
        )
        producer = Producer(settings, redis)
        for start in range(0, events, 1000):
            batch = range(start, min(events, start + 1000))
            await producer.emit_many([(PROJECT, EVENT, event_data(i, emit_t)) for i in batch])
    finally:
        await redis.aclose()


async def _deliveries(bench: Bench, url: str, replicas: int) -> float:
    """deliveries/s of one burst worker through a queue of `bench.sizes.deliveries`."""
    events = bench.sizes.deliveries
    await _queue(bench, url, events)
    with min_replicas(replicas):
        worker = await WorkerProcess.start(url, log_path=bench.logs / "replicated.log")
    await bench.receiver.reset()
    worker.go()
    result = await worker.finish(within=60 + events / 100)
    received = (await bench.receiver.stats())["count"]
    if received != events:
        raise BenchError(f"replicated: the receiver saw {received} of {events} deliveries")
    return float(events / (result["end"] - result["start"]))


async def _emits(bench: Bench, url: str, replicas: int) -> float:
    with min_replicas(replicas):
        args = ["--redis-url", url, "--n", str(bench.sizes.emit), "--inflight", "500"]
        result = await run_loadgen("emit", args, within=120)
    return float(result["rate"])


async def _failover_gap(bench: Bench, group: SentinelGroup) -> dict[str, Any]:
    """Seconds without a delivery after the master is killed under a delivering worker."""
    await _queue(bench, group.url, GAP_EVENTS, emit_t=0.0)  # emit_t: arrivals are noted
    worker = await WorkerProcess.start(
        group.url, log_path=bench.logs / "replicated-failover.log", extra=["--lease-seconds", "3"]
    )
    try:
        await bench.receiver.reset(latency=True)
        worker.go()
        await asyncio.sleep(KILL_AFTER_S)
        old = group.master_port()
        group.signal(old, signal.SIGKILL)
        killed = time.time()
        new = await asyncio.to_thread(group.wait_for_new_master, old)
        promoted = time.time() - killed
        await asyncio.to_thread(group.start_node, old, new)  # back as a replica
        await worker.finish(within=120)
    finally:
        await worker.kill()
    arrivals = sorted(t for _, t in (await bench.receiver.control("/_latency"))["pairs"])
    after = [killed, *(t for t in arrivals if t > killed)]
    if len(after) < 2:
        raise BenchError("replicated: no delivery after the failover")
    gap = max(b - a for a, b in itertools.pairwise(after))
    return {
        "gap_s": gap,
        "promoted_after_s": promoted,
        "deliveries": len(arrivals),
        "events": GAP_EVENTS,
    }


async def run(bench: Bench) -> list[Row]:
    rates: dict[int, list[float]] = {0: [], 1: []}
    emits: dict[int, list[float]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-sentinel-") as tmp:
        group = SentinelGroup(Path(tmp))
        await asyncio.to_thread(group.start)
        try:
            for _ in range(bench.sizes.repeats):
                for replicas in (0, 1):
                    rates[replicas].append(await _deliveries(bench, group.url, replicas))
                    emits[replicas].append(await _emits(bench, group.url, replicas))
            failover = await _failover_gap(bench, group)
        finally:
            group.stop()
    gap = failover["gap_s"]
    shown = f"{gap:.2f} s (replica promoted after {failover['promoted_after_s']:.2f} s)"
    return [
        ratio_row(
            "replicated",
            "deliveries/s, 1 worker, Sentinel, MIN_REPLICAS=1",
            statistics.median(rates[1]),
            "/s",
            "the same, MIN_REPLICAS=0",
            statistics.median(rates[0]),
            minimum=0.9,
            details={"rates": rates},
        ),
        ratio_row(
            "replicated emit",
            "events/s, 1 producer, 500 in flight, MIN_REPLICAS=1",
            statistics.median(emits[1]),
            "/s",
            "the same, MIN_REPLICAS=0",
            statistics.median(emits[0]),
            minimum=0.7,
            details={"rates": emits},
        ),
        Row(
            "failover",
            "no delivery after the master is SIGKILLed (down-after 1 s)",
            gap,
            "s",
            target=f"<= {GAP_TARGET_S:g} s",
            ok=gap <= GAP_TARGET_S,
            shown=shown,
            details=failover,
        ),
    ]


SCENARIO = Scenario("replicated", run)
