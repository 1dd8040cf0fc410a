"""`claim-scan`: what a claim costs Redis while one project's backlog fills the queue and
that project has room for a few jobs a claim (a lone project at its share: the throughput
run's shape). The claims look for a project new to the worker a page deep, as `Served`
asks between its wide looks, against the same claims looking 2,000 entries deep, as
every claim did while a busy project had room. And the same backlog at its share, due
for 10 s, beside a busy project with room and nothing due: looked for only in what came
due since the claim before (`quiet`, as `Served` asks once a claim found it with nothing
due) against looked for 2,000 deep; and the quiet claims right as the whole backlog came
due (a burst, read whole up to the budget while a quiet project has room); and the wide
claims with their sweep step past the budget against without. Each run's
claims follow a claim before them, untimed. Timed by Redis itself (`INFO commandstats`:
the script's µs, its inner calls included), runs interleaved."""

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


async def _run(
    bench: Bench,
    scout: int,
    room: int,
    idle: bool = False,
    *,
    quiet: bool = False,
    due_for_ms: int = 0,
    sweep: bool = False,
) -> dict[str, float]:
    """Redis µs per claim and queue pages per claim, `CLAIMS` claims of a fresh backlog
    (due `due_for_ms` before the claims) with `scout`, its project given `room` a claim,
    after a claim before them (untimed: a worker's first claim has no claim before);
    `idle`: beside a busy project with room and nothing due, `quiet` or not; `sweep`: with
    a sweep step past the budget."""
    await bench.r.flushdb()
    keys = Keys(bench.settings.queue_name)
    queue = Queue(bench.r, keys)
    jobs = [EventJob(f"e{i:05}", "lone", "BUILD_END") for i in range(BACKLOG)]
    await run_pipeline(bench.r, lambda pipe: queue.push_many(pipe, jobs))
    if due_for_ms:
        due = await bench.r.zrange(keys.QUEUE, 0, -1, withscores=True)
        await bench.r.zadd(keys.QUEUE, {job: score - due_for_ms for job, score in due})
    claims = Claims(bench.r, keys, "bench", lease_s=600)
    busy = {"lone": room, "idle": 5} if idle else {"lone": room}
    quiet_ones = ["idle"] if quiet else []

    async def claim() -> int:
        got = await claims.claim(
            100,
            budget=WIDE_BUDGET,
            scout=scout,
            sweep=sweep,
            quiet=quiet_ones,
            shares=(66, busy),
        )
        return len(got)

    await claim()
    _, _, before = await bench.commandstats()
    taken = 0
    for _ in range(CLAIMS):
        taken += await claim()
    _, _, after = await bench.commandstats()
    if taken != CLAIMS * room:
        raise BenchError(f"claimed {taken} jobs, not {CLAIMS * room}")

    def grew(name: str, field: int) -> float:  # field 0: calls, 1: µs
        return float(after.get(name, (0, 0))[field] - before.get(name, (0, 0))[field])

    return {
        "us_per_claim": grew("evalsha", 1) / CLAIMS,
        "pages_per_claim": sum(
            grew(name, 0) for name in ("zrange", "zrangebyscore", "zrevrangebyscore")
        )
        / CLAIMS,
    }


async def run(bench: Bench) -> list[Row]:
    names = ("narrow", "wide", "sweep", "quiet", "idle", "burst")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(REPEATS):
        runs["narrow"].append(await _run(bench, NARROW_BUDGET, ROOM))
        runs["wide"].append(await _run(bench, WIDE_BUDGET, ROOM))
        runs["sweep"].append(await _run(bench, WIDE_BUDGET, ROOM, sweep=True))
        quiet = await _run(bench, NARROW_BUDGET, 0, True, quiet=True, due_for_ms=10_000)
        runs["quiet"].append(quiet)
        runs["idle"].append(await _run(bench, NARROW_BUDGET, 0, True, due_for_ms=10_000))
        runs["burst"].append(await _run(bench, NARROW_BUDGET, 0, True, quiet=True))
    await bench.r.flushdb()

    def median(name: str, key: str = "us_per_claim") -> float:
        return statistics.median(run[key] for run in runs[name])

    def pages(name: str, base: str) -> dict[str, object]:
        return {
            "pages_per_claim": median(name, "pages_per_claim"),
            "baseline_pages_per_claim": median(base, "pages_per_claim"),
            "runs": runs[name],
            "baseline_runs": runs[base],
        }

    return [
        ratio_row(
            "claim-scan", f"Redis µs per job claimed, a lone project's backlog of {BACKLOG:,}",
            median("narrow") / ROOM, "µs", "every claim 2,000 entries deep",
            median("wide") / ROOM, maximum=0.5, details=pages("narrow", "wide"),
        ),
        ratio_row(
            "claim-scan", "Redis µs per wide claim of that backlog, its sweep step (500 "
            "entries past the 2,000) included", median("sweep"), "µs",
            "the same claims without the step", median("wide"),
            details=pages("sweep", "wide"),
        ),
        ratio_row(
            "claim-scan", "Redis µs per claim, that backlog due for 10 s, at its share, "
            "beside a busy project with room and nothing due", median("quiet"), "µs",
            "the same, the busy project looked for 2,000 entries deep", median("idle"),
            maximum=0.5, details=pages("quiet", "idle"),
        ),
        ratio_row(
            "claim-scan", "the same as the whole backlog just came due (a burst: read "
            "whole while a quiet project has room)", median("burst"), "µs",
            "the busy project looked for 2,000 entries deep", median("idle"),
            details=pages("burst", "idle"),
        ),
    ]  # fmt: skip


SCENARIO = Scenario("claim-scan", run)
