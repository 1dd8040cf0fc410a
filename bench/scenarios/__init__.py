"""The scenarios, one module each, every one with the same entry point,
`async def run(bench: Bench) -> list[Row]`, declared by its module's `SCENARIO`.

To add one: write a module here (its `run`, and `SCENARIO = Scenario(name, run, ...)`
naming the worker-rate runs it reads and whether it needs PostgreSQL), then add its
`SCENARIO` to `SCENARIOS` below. The table prints the rows in this order.
"""

from __future__ import annotations

from bench.harness import Scenario
from bench.scenarios import (
    ceiling,
    claim_scan,
    controls,
    emit,
    fan_out,
    fan_out_bodies,
    fault,
    history,
    history_pg,
    history_pg_delivery,
    history_pg_lag,
    http_emit,
    latency,
    memory,
    noisy,
    ordered,
    redis_cost,
    replicated,
    retry_bodies,
    scale_out,
    shards,
    throughput,
    tracing,
)

__all__ = ["SCENARIOS"]

# In order: the worker-rate scenarios first (the first of them runs the interleaved block
# that the others and history-pg read), the Redis history fill last of the Redis ones (it
# leaves Redis large until flushed).
SCENARIOS: list[Scenario] = [
    throughput.SCENARIO,
    redis_cost.SCENARIO,
    claim_scan.SCENARIO,
    ceiling.SCENARIO,
    fan_out.SCENARIO,
    fan_out_bodies.SCENARIO,
    scale_out.SCENARIO,
    controls.SCENARIO,
    ordered.SCENARIO,
    tracing.SCENARIO,
    emit.SCENARIO,
    http_emit.SCENARIO,
    fault.SCENARIO,
    replicated.SCENARIO,
    shards.SCENARIO,
    latency.SCENARIO,
    noisy.SCENARIO,
    memory.SCENARIO,
    retry_bodies.SCENARIO,
    history.SCENARIO,
    history_pg_delivery.SCENARIO,
    history_pg_lag.SCENARIO,
    history_pg.SCENARIO,
]
