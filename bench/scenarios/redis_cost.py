"""`redis-cost`: what one delivery costs Redis, from `INFO commandstats` (a script's inner
calls count, and the script's own call) and `used_cpu_*` over the throughput run (Redis
history) and the PostgreSQL-history run, each against the arq no-op worker's cost per job
in the same block (arq claims, runs and ends a job that does nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.report import Row
from bench.workers import NOOP, THROUGHPUT, THROUGHPUT_PG, WorkerRun, median_run

if TYPE_CHECKING:
    from bench.harness import Bench

# Commands per delivery: the targets of issue 20.
REDIS_HISTORY_TARGET = 10
PG_HISTORY_TARGET = 6


def cost_rows(
    scenario: str, label: str, run: WorkerRun, baseline: str, base: WorkerRun,
    target: float | None = None,
) -> list[Row]:  # fmt: skip
    """Redis commands and Redis CPU per delivery of `run` (`INFO commandstats`,
    `used_cpu_*`) against `base`'s, named `baseline`; `target` bounds the commands (else
    both report). The details give the commands and their µs by name, `base`'s too."""
    mine, theirs = run.per_delivery(), base.per_delivery()
    commands = mine["redis_commands"]
    return [
        Row(
            scenario, f"Redis commands per delivery, {label}", commands, "",
            baseline, theirs["redis_commands"],
            commands / theirs["redis_commands"] if theirs["redis_commands"] else None,
            f"<= {target:g}" if target is not None else "report",
            commands <= target if target is not None else None, shown=f"{commands:.1f}",
            details={"by_command": _by_name(run, 0), "baseline_by_command": _by_name(base, 0)},
        ),
        Row(
            scenario, f"Redis CPU per delivery, {label}", mine["redis_cpu_us"], "µs",
            baseline, theirs["redis_cpu_us"],
            mine["redis_cpu_us"] / theirs["redis_cpu_us"] if theirs["redis_cpu_us"] else None,
            details={
                "command_us": round(mine["redis_command_us"], 1),
                "us_by_command": _by_name(run, 1),
                "baseline_command_us": round(theirs["redis_command_us"], 1),
            },
        ),
    ]  # fmt: skip


def _by_name(run: WorkerRun, field: int) -> dict[str, float]:
    """`INFO commandstats` per delivery by command name, largest first: calls (`field` 0)
    or µs (1)."""
    per = {name: round(v[field] / run.deliveries, 2) for name, v in run.redis_by_command.items()}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    noop = median_run(bench.runs(NOOP))
    arq = "arq no-op worker, per job"
    redis = median_run(bench.runs(THROUGHPUT))
    pg = median_run(bench.runs(THROUGHPUT_PG))
    return [
        *cost_rows("redis cost", "Redis history", redis, arq, noop, REDIS_HISTORY_TARGET),
        *cost_rows("redis cost", "PostgreSQL history", pg, arq, noop, PG_HISTORY_TARGET),
    ]


SCENARIO = Scenario("redis-cost", run, worker_runs=(NOOP, THROUGHPUT, THROUGHPUT_PG), postgres=True)
