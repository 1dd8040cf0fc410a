"""`noisy`: a noisy neighbour. The victim (the bench project, one callback on the fast
receiver) emits at 50 events/s, open loop, to one worker with default settings; its p99
(emit -> receiver) is measured alone, then while the neighbour's 300 slow callbacks (3 s
each, on three slow hosts) run on the same worker. Target: p99 < 1 s with the neighbour."""

from __future__ import annotations

import asyncio
import statistics
from typing import TYPE_CHECKING, Any

from bench.common import EVENT, event_data
from bench.harness import Scenario
from bench.procs import Receiver, WorkerProcess
from bench.report import ratio_row
from bench.scenarios.latency import measure, p99
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry

if TYPE_CHECKING:
    from bench.harness import Bench
    from bench.report import Row

RATE = 50  # the victim's events/s
NEIGHBOUR = "noisy-neighbour"
SLOW_HOSTS = 3
SLOW_CALLBACKS = 300  # the neighbour's, spread over the slow hosts
SLOW_MS = 3000
NEIGHBOUR_EVENTS = 3  # 900 slow deliveries: more than the run lasts
TARGET_P99_MS = 1000


async def run(bench: Bench) -> list[Row]:
    slow = [Receiver() for _ in range(SLOW_HOSTS)]
    try:
        await asyncio.gather(*(host.start(delay_ms=SLOW_MS) for host in slow))
        alone = await _victim(bench, [])
        crowded = await _victim(bench, slow)
    finally:
        await asyncio.gather(*(host.stop() for host in slow))
    figure = f"victim p99, {RATE} events/s, beside {SLOW_CALLBACKS} slow callbacks"
    row = ratio_row(
        "noisy",
        figure,
        crowded["p99_ms"],
        "ms",
        "the same without them",
        alone["p99_ms"],
        target=f"p99 < {TARGET_P99_MS} ms",
        details={"alone": alone, "with": crowded},
    )
    row.ok = crowded["p99_ms"] < TARGET_P99_MS
    row.shown = f"p99 {crowded['p99_ms']:.0f} ms (alone {alone['p99_ms']:.0f} ms)"
    return [row]


async def _neighbour(bench: Bench, slow: list[Receiver]) -> None:
    """The neighbour's callbacks, and its events queued."""
    registry = Registry(bench.r)
    urls = [f"{slow[i % len(slow)].base}/slow/{i}" for i in range(SLOW_CALLBACKS)]
    await asyncio.gather(
        *(registry.create(NEIGHBOUR, url, Event(EVENT), Region.DEVNET) for url in urls)
    )
    producer = Producer(bench.settings, bench.r)
    await producer.emit_many([(NEIGHBOUR, EVENT, event_data(n)) for n in range(NEIGHBOUR_EVENTS)])


async def _held(slow: list[Receiver]) -> int:
    return sum([(await host.stats())["held"] for host in slow])


async def _victim(bench: Bench, slow: list[Receiver]) -> dict[str, Any]:
    """The victim's latency on a fresh worker, with the neighbour when `slow` is given."""
    await bench.prepare(callbacks=1, events=0)
    label = "noisy-with" if slow else "noisy-alone"
    worker = await WorkerProcess.start(bench.url, burst=False, log_path=bench.logs / f"{label}.log")
    try:
        worker.go()
        if slow:
            await _neighbour(bench, slow)
            for _ in range(200):  # up to 20 s, until the slow hosts are busy
                if await _held(slow) >= 50:
                    break
                await asyncio.sleep(0.1)
        lat, _ = await measure(bench, RATE, bench.sizes.latency_s / 2)
        held = await _held(slow) if slow else 0  # the neighbour still in flight at the end
        worker.stop()
        await worker.finish(within=60)
    finally:
        await worker.kill()
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": p99(lat),
        "max_ms": lat[-1],
        "events": len(lat),
        "neighbour_held_at_end": held,
    }


SCENARIO = Scenario("noisy", run)
