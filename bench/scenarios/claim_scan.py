"""`claim-scan`: what a claim costs Redis while one project's backlog fills the queue and
that project has room for a few jobs a claim (a lone project at its share: the throughput
run's shape). The claims look for a project new to the worker a page deep, as `Served`
asks between its wide looks, against the same claims looking 2,000 entries deep, as
every claim did while a busy project had room. Timed by Redis itself (`INFO
commandstats`: the script's µs, its inner calls included), runs interleaved."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.procs import BenchError
from bench.report import Row, ratio_row
from dispatcher.jobs import EventJob
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.queue import Queue
from dispatcher.worker.claims import Claims
from dispatcher.worker.served import NARROW_BUDGET, WIDE_BUDGET

if TYPE_CHECKING:
    from bench.harness import Bench

BACKLOG = 5_000  # queued jobs of the one project
ROOM = 12  # jobs it may take a claim (the throughput run's claims took ~12 each)
CLAIMS = 60  # per run
REPEATS = 5


async def _run(bench: Bench, scout: int) -> dict[str, float]:
    """Redis µs per job claimed and queue pages per claim, `CLAIMS` claims of a fresh
    backlog with `scout`."""
    await bench.r.flushdb()
    keys = Keys(bench.settings.queue_name)
    queue = Queue(bench.r, keys)
    jobs = [EventJob(f"e{i:05}", "lone", "BUILD_END") for i in range(BACKLOG)]
    await run_pipeline(bench.r, lambda pipe: queue.push_many(pipe, jobs))
    claims = Claims(bench.r, keys, "bench", lease_s=600)
    _, _, before = await bench.commandstats()
    taken = 0
    for _ in range(CLAIMS):
        got = await claims.claim(100, budget=WIDE_BUDGET, scout=scout, shares=(66, {"lone": ROOM}))
        taken += len(got)
    _, _, after = await bench.commandstats()
    if taken != CLAIMS * ROOM:
        raise BenchError(f"claimed {taken} jobs, not {CLAIMS * ROOM}")

    def grew(name: str, field: int) -> float:  # field 0: calls, 1: µs
        return float(after.get(name, (0, 0))[field] - before.get(name, (0, 0))[field])

    return {
        "us_per_job": grew("evalsha", 1) / taken,
        "pages_per_claim": grew("zrangebyscore", 0) / CLAIMS,
    }


async def run(bench: Bench) -> list[Row]:
    narrow: list[dict[str, float]] = []
    wide: list[dict[str, float]] = []
    for _ in range(REPEATS):
        narrow.append(await _run(bench, NARROW_BUDGET))
        wide.append(await _run(bench, WIDE_BUDGET))
    await bench.r.flushdb()

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    return [
        ratio_row(
            "claim-scan", f"Redis µs per job claimed, a lone project's backlog of {BACKLOG:,}",
            median(narrow, "us_per_job"),
            "µs", "every claim 2,000 entries deep", median(wide, "us_per_job"), maximum=0.5,
            details={
                "pages_per_claim": median(narrow, "pages_per_claim"),
                "baseline_pages_per_claim": median(wide, "pages_per_claim"),
                "runs": narrow, "baseline_runs": wide,
            },
        ),
    ]  # fmt: skip


SCENARIO = Scenario("claim-scan", run)
