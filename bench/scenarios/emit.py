"""`emit`: `Producer.emit` from one process, 500 in flight, against bare arq `enqueue_job`
of the same payloads, interleaved; and `emit_many` of 1,000 against 1,000 single emits."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from bench.harness import Scenario
from bench.procs import run_loadgen
from bench.report import Row, ratio_row

if TYPE_CHECKING:
    from bench.harness import Bench


async def run(bench: Bench) -> list[Row]:
    n = str(bench.sizes.emit)
    emit_rates: list[float] = []
    arq_rates: list[float] = []
    for _ in range(bench.sizes.emit_repeats):
        for mode, rates in (("emit", emit_rates), ("enqueue", arq_rates)):
            await bench.r.flushdb()
            args = ["--redis-url", bench.url, "--n", n, "--inflight", "500"]
            rates.append((await run_loadgen(mode, args, within=120))["rate"])
    await bench.r.flushdb()
    batch = await run_loadgen(
        "batch",
        ["--redis-url", bench.url, "--n", "1000", "--repeats", str(bench.sizes.batch_repeats)],
        within=120,
    )
    await bench.r.flushdb()
    return [
        ratio_row(
            "emit", "events/s, 1 producer, 500 in flight",
            statistics.median(emit_rates), "/s", "bare arq enqueue_job",
            statistics.median(arq_rates), minimum=0.9,
            details={"emit_rates": emit_rates, "arq_rates": arq_rates, "n": bench.sizes.emit},
        ),
        ratio_row(
            "emit batch", "events/s, emit_many of 1,000 events", batch["batch_rate"], "/s",
            "1,000 single emits", batch["single_rate"], minimum=3.0, details=batch,
        ),
    ]  # fmt: skip


SCENARIO = Scenario("emit", run)
