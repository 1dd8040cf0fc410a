"""`fault`: deliveries/s of one worker through a 2 s Redis restart (SIGTERM,
AOF `always`, the same port) against the same run without one, interleaved rep by rep, on a
Redis of its own. Every run counts what was lost: a delivery is done when the queue is
empty and its record is written (the receiver answers 200: its first attempt is its last;
its progress key says done when another worker ended its job), so lost = events whose
delivery never ended."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import EVENT, PROJECT, TOKEN, bench_settings, event_data
from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.jobs import delivery_of
from dispatcher.keys import Keys, project_scoped
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bench.harness import Bench


keys = Keys()  # today's key names (one shard)
OUTAGE_S = 2.0
RESTART_AT_S = 0.5  # into the run


async def _run(bench: Bench, folder: Path, events: int, restart: bool) -> dict[str, Any]:
    server = EmbeddedRedis(folder, appendfsync="always")
    url = server.start()
    settings = bench_settings(url, emit_wait=30)
    redis = connect(settings)
    try:
        await redis.flushdb()
        cid, _ = await Registry(redis).create(
            PROJECT, f"{bench.receiver.base}/hook/0", Event(EVENT), Region.DEVNET, TOKEN
        )
        producer = Producer(settings, redis)
        ids: list[str] = []
        for start in range(0, events, 1000):
            batch = range(start, min(events, start + 1000))
            ids += await producer.emit_many([(PROJECT, EVENT, event_data(i)) for i in batch])
        worker = await WorkerProcess.start(url, log_path=bench.logs / "fault.log")
        await bench.receiver.reset()
        worker.go()
        if restart:
            await asyncio.sleep(RESTART_AT_S)
            port = server.port
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(OUTAGE_S)
            server = EmbeddedRedis(folder, port=port, appendfsync="always")
            await asyncio.to_thread(server.start)
        result = await worker.finish(within=120 + events / 100)
        # delivery ids are scoped by project: `{project}:{event id}.{callback id}`
        lost = await _lost(redis, [f"{project_scoped(PROJECT, e)}.{cid}" for e in ids])
        return {
            "rate": events / (result["end"] - result["start"]),
            "lost": lost,
            "queued": int(await redis.zcard(settings.queue_name)),
            "received": (await bench.receiver.stats())["count"],
        }
    finally:
        await redis.aclose()
        server.stop()


async def _lost(redis: Redis, delivery_ids: list[str]) -> int:
    """Deliveries without a record (their attempts index) and whose progress does not say
    done: their end never written."""
    ended = await _marked_done(redis)
    done = 0
    for start in range(0, len(delivery_ids), 1000):
        chunk = delivery_ids[start : start + 1000]
        recorded = await redis.mget([keys.history_attempts(d) for d in chunk])
        done += sum(1 for d, r in zip(chunk, recorded, strict=True) if r or d in ended)
    return len(delivery_ids) - done


async def _marked_done(redis: Redis) -> set[str]:
    """The delivery ids whose progress mark says done (a mark is one emission's, under
    `{delivery id}@{emittedAt}`)."""
    names = [name async for name in redis.scan_iter(match=keys.DELIVERY_PREFIX + "*", count=1000)]
    ended: set[str] = set()
    for start in range(0, len(names), 1000):
        chunk = names[start : start + 1000]
        for name, mark in zip(chunk, await redis.mget(chunk), strict=True):
            if mark == b"done":
                ended.add(delivery_of(name.decode().removeprefix(keys.DELIVERY_PREFIX)))
    return ended


async def run(bench: Bench) -> list[Row]:
    events = bench.sizes.fault_deliveries
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-fault-") as tmp:
        for rep in range(bench.sizes.repeats):
            for restart in (False, True):
                folder = Path(tmp) / f"redis-{rep}-{int(restart)}"
                runs[restart].append(await _run(bench, folder, events, restart))
    lost = sum(r["lost"] for rs in runs.values() for r in rs)
    if any(r["queued"] for rs in runs.values() for r in rs):
        raise BenchError("fault: the queue was not empty after a run")
    steady = statistics.median(r["rate"] for r in runs[False])
    through = statistics.median(r["rate"] for r in runs[True])
    details = {"runs": {"steady": runs[False], "restart": runs[True]}, "events": events,
               "outage_s": OUTAGE_S, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    return [
        ratio_row(
            "fault", f"deliveries/s through a {OUTAGE_S:g} s Redis restart", through, "/s",
            "the same, no restart", steady, details=details,
        ),
        Row("fault", "deliveries lost in those runs", lost, "", target="= 0", ok=lost == 0,
            shown=f"{lost} of {events * 2 * bench.sizes.repeats:,}", details={"lost": lost}),
    ]  # fmt: skip


SCENARIO = Scenario("fault", run)
