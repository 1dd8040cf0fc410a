"""The worker-rate runs: what one run is (`WorkerSpec`), what it measured (`WorkerRun`),
how a figure is taken over the repeats (`median_run`, `summary`), and the runs several
scenarios share. `Bench.worker_block` runs every wanted spec interleaved, rep by rep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dispatcher.registry import Options


@dataclass(frozen=True)
class WorkerSpec:
    """One worker-rate run over a pre-filled queue. `label` names it in the JSON and the
    logs; two scenarios that need the same run name the same spec."""

    label: str
    kind: str = "dispatcher"  # or "noop": arq's own Worker with a no-op job
    callbacks: int = 1  # on (PROJECT, EVENT)
    events: int | None = None  # None: as many as make `Sizes.deliveries` deliveries
    workers: int = 1  # processes
    log_level: str = "WARNING"
    postgres_history: bool = False  # history in the bench's private PostgreSQL
    options: Options | None = None  # the callbacks' receiver controls
    traced: bool = False  # every event queued with a W3C traceparent (`BENCH_TRACEPARENT`)
    export: bool = False  # spans exported over OTLP/HTTP (to `Bench.sink`, a receiver process)
    lanes: int = 0  # events carry `"lane": "k-<n % lanes>"` (for `orderBy`), when > 0
    data_bytes: int = 0  # events' data padded to about this many bytes of JSON, when > 0
    env: tuple[tuple[str, str], ...] = ()  # the worker processes' own variables, e.g. settings

    def event_count(self, deliveries: int) -> int:
        """Events to queue for a run of about `deliveries` deliveries."""
        return self.events if self.events is not None else deliveries // self.callbacks


# The runs several scenarios share (a scenario's own runs live in its module).
NOOP = WorkerSpec("noop", kind="noop")
THROUGHPUT = WorkerSpec("throughput")
THROUGHPUT_PG = WorkerSpec("throughput_pg", postgres_history=True)
FAN_OUT = WorkerSpec("fan_out", callbacks=10)
# what a CI's emitter inside a trace sends with every event
BENCH_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class WorkerRun:
    """One timed run of worker process(es) over a pre-filled queue."""

    deliveries: int
    seconds: float
    received: int
    worker_cpu_s: float
    redis_cpu_s: float
    receiver_cpu_s: float
    redis_commands: int
    redis_usec: int
    machine_cpu_s: float  # every process on the machine, ours included
    results: list[dict[str, Any]] = field(default_factory=list)  # each worker's JSON line
    redis_bytes: int = 0  # Redis used_memory after the run, less before its events
    # INFO commandstats: calls and µs by command name
    redis_by_command: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def others_cores(self) -> float:
        """Cores used by processes outside the bench during the run (noisy neighbours)."""
        ours = self.worker_cpu_s + self.redis_cpu_s + self.receiver_cpu_s
        return max(0.0, self.machine_cpu_s - ours) / self.seconds

    @property
    def rate(self) -> float:
        """Deliveries per second."""
        return self.deliveries / self.seconds

    def per_delivery(self) -> dict[str, float]:
        """CPU (µs) of each process and Redis commands, per delivery."""
        n = self.deliveries
        return {
            "worker_cpu_us": 1e6 * self.worker_cpu_s / n,
            "redis_cpu_us": 1e6 * self.redis_cpu_s / n,
            "receiver_cpu_us": 1e6 * self.receiver_cpu_s / n,
            "redis_commands": self.redis_commands / n,
            "redis_command_us": self.redis_usec / n,
        }


def median_run(runs: list[WorkerRun]) -> WorkerRun:
    """The run of median rate (the figure a row reports)."""
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def summary(runs: list[WorkerRun]) -> dict[str, Any]:
    """The repeats of one spec, for a row's details."""
    median = median_run(runs)
    return {
        "rates": [round(r.rate, 1) for r in runs],
        "median_rate": round(median.rate, 1),
        "deliveries": median.deliveries,
        "seconds": round(median.seconds, 3),
        "per_delivery": {k: round(v, 2) for k, v in median.per_delivery().items()},
        "received": [r.received for r in runs],
        "other_processes_cores": [round(r.others_cores, 2) for r in runs],
        "redis_commands_per_delivery": {
            name: round(calls / median.deliveries, 2)
            for name, (calls, _) in sorted(
                median.redis_by_command.items(), key=lambda kv: -kv[1][0]
            )
        },
        "redis_us_per_delivery": {  # a script's µs hold those of the commands it runs
            name: round(usec / median.deliveries, 2)
            for name, (_, usec) in sorted(median.redis_by_command.items(), key=lambda kv: -kv[1][1])
        },
    }
