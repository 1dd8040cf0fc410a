"""Timing many short operations against their baseline: round by round, so that all of
them share the machine's noise (the history scenarios' queries against a GET or a SELECT)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

Op = Callable[[], Awaitable[Any]]  # what an operation returns is not looked at

WARM_UP_ROUNDS = 20


async def timed(op: Op) -> int:
    """Nanoseconds one call of `op` took."""
    started = time.perf_counter_ns()
    await op()
    return time.perf_counter_ns() - started


async def interleaved(ops: dict[str, Op], rounds: int) -> dict[str, list[int]]:
    """Nanoseconds of every op, round by round (after WARM_UP_ROUNDS rounds of warm-up)."""
    for _ in range(WARM_UP_ROUNDS):
        for op in ops.values():
            await op()
    samples: dict[str, list[int]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            samples[name].append(await timed(op))
    return samples


def median_us(samples: list[int]) -> float:
    """The median of nanosecond samples, in µs."""
    return statistics.median(samples) / 1000
