"""`http`: the HTTP emit routes of `dispatcher api` (its own process: uvicorn,
uvloop, default settings, role checks on) against the Python producer, interleaved rep by
rep: the single route with 50 requests in flight vs `emit` with 50 in flight, and the batch
route, batches of 1,000 from one client, vs `emit_many` of 1,000. Every run starts on an
empty queue and must leave exactly the events it sent in it."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from bench.common import PROJECT, USER
from bench.harness import Scenario
from bench.procs import ApiProcess, BenchError, run_loadgen
from bench.report import Row, ratio_row
from dispatcher.auth import Role, Roles
from dispatcher.keys import Keys

if TYPE_CHECKING:
    from bench.harness import Bench


async def _run(
    bench: Bench, api: ApiProcess, mode: str, args: list[str], expected: int
) -> tuple[dict[str, Any], float]:
    """One load generator run against an empty queue; its result and the CPU the API
    process spent per event meanwhile (µs)."""
    await bench.r.delete(bench.settings.queue_name)
    cpu0 = api.cpu_s()
    result = await run_loadgen(mode, args, within=300)
    queued = await bench.r.zcard(bench.settings.queue_name)
    if queued != expected:
        raise BenchError(f"{mode}: {queued} of {expected} events queued")
    return result, 1e6 * (api.cpu_s() - cpu0) / expected


async def run(bench: Bench) -> list[Row]:
    await bench.r.flushdb()
    await Roles(bench.r, bench.settings, Keys(bench.settings.queue_name)).grant(
        PROJECT, USER, Role.ADMIN
    )
    n, batches = bench.sizes.http_emit, bench.sizes.http_batches
    api = await ApiProcess.start(bench.url, bench.logs / "api.log")
    rates: dict[str, list[float]] = {"http": [], "emit": [], "batch": [], "many": []}
    cpu: dict[str, list[float]] = {"http": [], "batch": []}
    single = ["--n", str(n), "--inflight", "50"]
    many = ["--n", "1000", "--repeats", str(batches)]
    runs = {
        "http": ("http-emit", ["--url", api.base, *single], n),
        "emit": ("emit", ["--redis-url", bench.url, *single], n),
        "batch": ("http-batch", ["--url", api.base, *many], 1000 * batches),
        "many": ("emit-many", ["--redis-url", bench.url, *many], 1000 * batches),
    }
    try:
        for _ in range(bench.sizes.emit_repeats):
            for name, (mode, args, expected) in runs.items():
                result, api_us = await _run(bench, api, mode, args, expected)
                rates[name].append(result["rate"])
                if name in cpu:
                    cpu[name].append(api_us)
    finally:
        await api.stop()
    await bench.r.flushdb()
    median = {name: statistics.median(values) for name, values in rates.items()}
    details = {"rates": rates, "api_cpu_us_per_event": cpu, "n": n, "batches": batches}
    return [
        ratio_row(
            "http emit", "events/s, HTTP emit route, 50 in flight", median["http"], "/s",
            "Python emit, 50 in flight", median["emit"], details=details,
        ),
        ratio_row(
            "http batch", "events/s, HTTP batch route, batches of 1,000", median["batch"], "/s",
            "Python emit_many of 1,000", median["many"], minimum=0.5,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("http", run)
