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


def _rows(label: str, run: WorkerRun, noop: WorkerRun, target: int) -> list[Row]:
    mine, arq = run.per_delivery(), noop.per_delivery()
    by_name = {k: round(v / run.deliveries, 2) for k, (v, _) in run.redis_by_command.items()}
    us_by_name = {k: round(us / run.deliveries, 2) for k, (_, us) in run.redis_by_command.items()}
    commands = mine["redis_commands"]
    return [
        Row(
            "redis cost", f"Redis commands per delivery, {label}", commands, "",
            "arq no-op worker, per job", arq["redis_commands"],
            commands / arq["redis_commands"] if arq["redis_commands"] else None,
            f"<= {target}", commands <= target, shown=f"{commands:.1f}",
            details={"by_command": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))},
        ),
        Row(
            "redis cost", f"Redis CPU per delivery, {label}", mine["redis_cpu_us"], "µs",
            "arq no-op worker, per job", arq["redis_cpu_us"],
            mine["redis_cpu_us"] / arq["redis_cpu_us"] if arq["redis_cpu_us"] else None,
            details={
                "command_us": round(mine["redis_command_us"], 1),
                "us_by_command": dict(sorted(us_by_name.items(), key=lambda kv: -kv[1])),
            },
        ),
    ]  # fmt: skip


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    noop = median_run(bench.runs(NOOP))
    rows = _rows("Redis history", median_run(bench.runs(THROUGHPUT)), noop, REDIS_HISTORY_TARGET)
    pg = median_run(bench.runs(THROUGHPUT_PG))
    return rows + _rows("PostgreSQL history", pg, noop, PG_HISTORY_TARGET)


SCENARIO = Scenario("redis-cost", run, worker_runs=(NOOP, THROUGHPUT, THROUGHPUT_PG), postgres=True)
