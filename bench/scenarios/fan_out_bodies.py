"""`fan-out-bodies`: what the Redis history's kept body costs a fan-out's hot path.

10 callbacks per event, its data padded to about 4 KiB (over
`dispatcher.bodies.SHARED_MIN_BYTES`): each attempt's record is stored without its body,
which the record's script keeps once per event at `dispatcher:history:body:{scope}#{length}`
(`dispatcher.history.kept`: the body's `SET NX`; for each later record of the event, a
`PTTL` and, when the body's time to live is below the record's, a `PEXPIRE`). Its
deliveries/s, Redis commands and Redis CPU per delivery against the 10-callback run of
the usual ~470 B events (`FAN_OUT`); then its Redis commands, Redis CPU and Redis memory
per delivery against the same big events with `DISPATCHER_SHARED_BODIES=false` (each
record holding its body): the commands the keep adds, the memory it saves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.procs import BenchError
from bench.report import Row, ratio_row
from bench.scenarios.redis_cost import cost_rows
from bench.workers import FAN_OUT, WorkerRun, WorkerSpec, median_run, summary

if TYPE_CHECKING:
    from bench.harness import Bench

DATA_BYTES = 4096  # each event's data, about (JSON)
BIG = WorkerSpec("fan_out_big", callbacks=10, data_bytes=DATA_BYTES)
BIG_INLINE = WorkerSpec(
    "fan_out_big_inline", callbacks=10, data_bytes=DATA_BYTES,
    env=(("DISPATCHER_SHARED_BODIES", "false"),),
)  # fmt: skip
SCOPE = "fan-out bodies"
SMALL = "~470 B events"
INLINE = "a body in each record (SHARED_BODIES=false)"


def _extra(run: WorkerRun, base: WorkerRun) -> dict[str, float]:
    """Commands per delivery by name that `run` ran more (or fewer) than `base`."""
    calls = {
        name: run.redis_by_command.get(name, (0, 0))[0] / run.deliveries
        - base.redis_by_command.get(name, (0, 0))[0] / base.deliveries
        for name in run.redis_by_command.keys() | base.redis_by_command.keys()
    }
    ordered = sorted(calls.items(), key=lambda kv: -abs(kv[1]))
    return {name: round(d, 2) for name, d in ordered if abs(d) >= 0.005}


async def run(bench: Bench) -> list[Row]:
    await bench.worker_block()
    big, inline, small = (median_run(bench.runs(s)) for s in (BIG, BIG_INLINE, FAN_OUT))
    extra = _extra(big, inline)
    if extra.get("set", 0.0) < 0.5:  # a kept body's SET NX for every record
        raise BenchError(f"fan-out bodies: the records kept no body apart ({extra})")
    details = {
        "big": summary(bench.runs(BIG)),
        "inline": summary(bench.runs(BIG_INLINE)),
        "small": summary(bench.runs(FAN_OUT)),
        "data_bytes": DATA_BYTES,
        "events": BIG.event_count(bench.sizes.deliveries),
        "extra_commands_vs_inline": extra,
        "extra_commands_vs_small": _extra(big, small),
        "rate_vs_inline": round(big.rate / inline.rate, 3),
    }
    kept = "~4 KiB events, body kept once"
    return [
        ratio_row(
            SCOPE, f"deliveries/s, 10 callbacks/event, {kept}", big.rate, "/s",
            f"10 callbacks/event, {SMALL}", small.rate, details=details,
        ),
        *cost_rows(SCOPE, kept, big, SMALL, small),
        *cost_rows(SCOPE, kept, big, INLINE, inline),
        ratio_row(
            SCOPE, f"Redis memory per delivery after the run, {kept}",
            big.redis_bytes / big.deliveries, "B", INLINE,
            inline.redis_bytes / inline.deliveries,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("fan-out-bodies", run, worker_runs=(FAN_OUT, BIG, BIG_INLINE))
