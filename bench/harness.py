"""What every scenario gets: the sizes (`Sizes`), what a scenario is (`Scenario`), and the
shared state and helpers of one bench run (`Bench`): the Redis URL and connection, the
receiver, a prepared queue, the interleaved worker-rate runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    EVENT,
    PROJECT,
    TOKEN,
    bench_settings,
    cpu_seconds,
    event_data,
    machine_busy_seconds,
    padded,
)
from bench.procs import BenchError, Receiver, WorkerProcess
from bench.report import Row
from bench.workers import BENCH_TRACEPARENT, WorkerRun, WorkerSpec
from dispatcher import tracing
from dispatcher.connections import connect
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Options, Registry

if TYPE_CHECKING:
    from redis.asyncio import Redis

CONCURRENT_CREATES = 200  # callbacks registered at once


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does. Full: < 10 min on 2 cores; quick: < 2 min."""

    deliveries: int  # per worker-rate run (throughput, fan-out, scale-out)
    repeats: int  # runs per worker-rate figure and baseline (median)
    ceiling: int
    emit: int
    emit_repeats: int
    batch_repeats: int
    http_emit: int  # events per run of the HTTP emit route (and of its baseline)
    http_batches: int  # batches of 1,000 per run of the HTTP batch route (and its baseline)
    fault_deliveries: int  # per run of the fault scenario (long enough to span the outage)
    latency_s: float
    memory_early: int
    memory_late: int
    history_total: int
    history_rounds: int
    history_pg_total: int  # PostgreSQL history: records in the big table
    history_pg_hot: int  # ... of which the queried (url, event) holds
    ship_records: int
    lag_s: float
    retry_callbacks: int  # failing callbacks of the retry-bodies scenario's one event

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        """The quick or the full sizes."""
        if quick:
            return cls(
                deliveries=2_000, repeats=3, ceiling=5_000, emit=5_000, emit_repeats=3,
                batch_repeats=5, http_emit=3_000, http_batches=10, fault_deliveries=4_000,
                latency_s=5.0, memory_early=2_000, memory_late=20_000, history_total=100_000,
                history_rounds=150, history_pg_total=200_000, history_pg_hot=100_000,
                ship_records=50_000, lag_s=5.0, retry_callbacks=200,
            )  # fmt: skip
        return cls(
            deliveries=6_000, repeats=3, ceiling=20_000, emit=20_000, emit_repeats=3,
            batch_repeats=7, http_emit=10_000, http_batches=20, fault_deliveries=8_000,
            latency_s=20.0, memory_early=10_000, memory_late=100_000, history_total=1_000_000,
            history_rounds=300, history_pg_total=2_000_000, history_pg_hot=1_000_000,
            ship_records=200_000, lag_s=20.0, retry_callbacks=1_000,
        )  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """One scenario of the table: its `--only` name, its entry point, the worker-rate runs
    it reads (run interleaved with every selected scenario's, see `Bench.worker_block`),
    and whether it needs the bench's private PostgreSQL."""

    name: str
    run: Callable[[Bench], Awaitable[list[Row]]]
    worker_runs: tuple[WorkerSpec, ...] = ()
    postgres: bool = False


def wanted_runs(scenarios: Iterable[Scenario]) -> list[WorkerSpec]:
    """The worker-rate runs `scenarios` read, each once, in the order they first ask."""
    wanted: dict[str, WorkerSpec] = {}
    for scenario in scenarios:
        for spec in scenario.worker_runs:
            if wanted.setdefault(spec.label, spec) != spec:
                raise ValueError(f"two different worker runs are labelled {spec.label!r}")
    return list(wanted.values())


async def register_callbacks(
    redis: Redis, base: str, callbacks: int, options: Options | None = None
) -> None:
    """`callbacks` callbacks on (PROJECT, EVENT), `{base}/hook/{i}`, a few hundred at once,
    with the receiver controls `options`."""
    registry = Registry(redis)
    for start in range(0, callbacks, CONCURRENT_CREATES):
        await asyncio.gather(*(
            registry.create(PROJECT, f"{base}/hook/{i}", Event(EVENT), Region.DEVNET, TOKEN,
                            options=options)
            for i in range(start, min(callbacks, start + CONCURRENT_CREATES))
        ))  # fmt: skip


def _data(n: int, lanes: int, data_bytes: int) -> dict[str, Any]:
    """The `n`th queued event's data: with a `lane` of `lanes` values when `lanes`, padded
    to about `data_bytes` of JSON when `data_bytes`."""
    data = event_data(n) | ({"lane": f"k-{n % lanes}"} if lanes else {})
    return padded(data, data_bytes) if data_bytes else data


class Bench:
    """Shared state: the Redis URL and connection, the receiver, the sizes, the worker-rate
    runs done so far (by label)."""

    def __init__(self, redis_url: str, receiver: Receiver, sizes: Sizes, logs: Path) -> None:
        self.url = redis_url
        self.receiver = receiver
        self.sizes = sizes
        self.logs = logs
        self.settings = bench_settings(redis_url)
        self.redis: Redis | None = None
        self.worker_runs: dict[str, list[WorkerRun]] = {}
        self.wanted: list[WorkerSpec] = []  # what `worker_block` runs (see `wanted_runs`)
        self.block_error = ""
        self.pg_url: str | None = None  # a private PostgreSQL's `postgres` database, when started
        self.history_url: str | None = None  # its database for workers with PostgreSQL history
        self._mem_base = 0
        self.sink: Receiver | None = None  # the OTLP collector of specs that export spans

    @property
    def r(self) -> Redis:
        """The bench's own Redis connection (after `open`)."""
        assert self.redis is not None
        return self.redis

    async def open(self) -> None:
        """Connect to the bench's Redis."""
        self.redis = connect(self.settings)

    async def close(self) -> None:
        """Close the connection `open` made, stop the span sink if one was started."""
        if self.redis is not None:
            await self.redis.aclose()
        if self.sink is not None:
            await self.sink.stop()

    async def _worker_env(self, spec: WorkerSpec) -> dict[str, str]:
        """The variables of `spec`'s workers: its own (`spec.env`), and an OTLP endpoint
        when it exports (a second receiver process, answering 200 to every batch of spans)."""
        env = dict(spec.env)
        if not spec.export:
            return env
        if self.sink is None:
            self.sink = Receiver()
            await self.sink.start()
        return env | {"OTEL_EXPORTER_OTLP_ENDPOINT": self.sink.base}

    def runs(self, spec: WorkerSpec) -> list[WorkerRun]:
        """The repeats of `spec` (after `worker_block`)."""
        return self.worker_runs[spec.label]

    async def prepare(
        self, callbacks: int, events: int, options: Options | None = None, *,
        traced: bool = False, lanes: int = 0, data_bytes: int = 0,
    ) -> None:  # fmt: skip
        """An empty Redis, `callbacks` callbacks on (PROJECT, EVENT) with `options`, `events`
        queued (each with `BENCH_TRACEPARENT` when `traced`; with a `lane` of `lanes` values
        when `lanes`; its data padded to about `data_bytes` of JSON when `data_bytes`)."""
        await self.r.flushdb()
        await register_callbacks(self.r, self.receiver.base, callbacks, options)
        self._mem_base = await self._used_memory()
        producer = Producer(self.settings, self.r)
        context = {"traceparent": BENCH_TRACEPARENT} if traced else {}
        with tracing.received(context):
            for start in range(0, events, 1000):
                batch = [
                    (PROJECT, EVENT, _data(i, lanes, data_bytes))
                    for i in range(start, min(events, start + 1000))
                ]
                await producer.emit_many(batch)

    async def _used_memory(self) -> int:
        return int((await self.r.info("memory"))["used_memory"])

    async def own_cpu(self) -> float:
        """CPU seconds the bench has used so far: this process, its finished children,
        the receiver and redis-server (both still running)."""
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        sink = cpu_seconds(self.sink.pid) if self.sink is not None else 0.0
        return mine + sink + cpu_seconds(self.receiver.pid) + await self._redis_cpu()

    async def _redis_cpu(self) -> float:
        info = await self.r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def commandstats(self) -> tuple[int, int, dict[str, tuple[int, int]]]:
        """Commands Redis ran since the stats were reset (a script's inner calls count
        too), the time inside them (µs), and both by command name (a script's time holds
        its inner calls' time)."""
        info = await self.r.info("commandstats")
        calls = sum(int(v["calls"]) for v in info.values())
        usec = sum(int(v["usec"]) for v in info.values())
        by_name = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in info.items()
        }
        return calls, usec, by_name

    def _worker_args(self, spec: WorkerSpec) -> list[str]:
        if not spec.postgres_history:
            return []
        if self.history_url is None:
            raise BenchError(f"{spec.label}: the bench's PostgreSQL is not running")
        return ["--history-url", self.history_url]

    async def _start_workers(self, spec: WorkerSpec, events: int) -> list[WorkerProcess]:
        """`spec.workers` processes waiting for GO, while the queue is filled."""
        env = await self._worker_env(spec)
        started, _ = await asyncio.gather(
            asyncio.gather(*(
                WorkerProcess.start(
                    self.url, kind=spec.kind, log_level=spec.log_level,
                    log_path=self.logs / f"{spec.label}.log", extra=self._worker_args(spec),
                    env=env,
                )
                for _ in range(spec.workers)
            )),
            self.prepare(
                spec.callbacks, events, spec.options, traced=spec.traced, lanes=spec.lanes,
                data_bytes=spec.data_bytes,
            ),
        )  # fmt: skip
        return list(started)

    async def run_workers(self, spec: WorkerSpec) -> WorkerRun:
        """Fill the queue, start the burst workers, GO, wait until all are done; checks
        that the receiver saw every delivery and the workers completed every job."""
        events = spec.event_count(self.sizes.deliveries)
        deliveries = events * (spec.callbacks if spec.kind == "dispatcher" else 1)
        procs = await self._start_workers(spec, events)
        try:
            await self.receiver.reset()
            await self.r.config_resetstat()
            redis_cpu0 = await self._redis_cpu()
            receiver_cpu0 = cpu_seconds(self.receiver.pid)
            machine0 = machine_busy_seconds()
            for proc in procs:
                proc.go()
            within = 60 + deliveries / 100
            results = await asyncio.gather(*(p.finish(within) for p in procs))
            machine_cpu = machine_busy_seconds() - machine0
        finally:
            for proc in procs:
                await proc.kill()
        stats = await self.receiver.stats()
        calls, usec, by_name = await self.commandstats()
        expected = deliveries if spec.kind == "dispatcher" else 0
        if stats["count"] != expected:
            raise BenchError(f"{spec.label}: receiver saw {stats['count']} of {expected} requests")
        done = sum(r["jobs_complete"] for r in results)
        if done < events:  # more is fine: arq counts the cron sweep when it fires meanwhile
            raise BenchError(f"{spec.label}: workers completed {done} of {events} jobs")
        run = WorkerRun(
            deliveries=deliveries,
            seconds=max(r["end"] for r in results) - min(r["start"] for r in results),
            received=stats["count"],
            worker_cpu_s=sum(r["cpu_s"] for r in results),
            redis_cpu_s=await self._redis_cpu() - redis_cpu0,
            receiver_cpu_s=cpu_seconds(self.receiver.pid) - receiver_cpu0,
            redis_commands=calls,
            redis_usec=usec,
            redis_by_command=by_name,
            machine_cpu_s=machine_cpu,
            results=results,
            redis_bytes=await self._used_memory() - self._mem_base,
        )
        self.worker_runs.setdefault(spec.label, []).append(run)
        return run

    async def worker_block(self) -> None:
        """Every wanted worker-rate run, interleaved rep by rep, so that each figure and its
        baseline share the machine's noise. Runs once; later calls return at once (or
        raise again if it failed)."""
        if self.block_error:
            raise BenchError(f"the worker-rate runs failed: {self.block_error}")
        if self.worker_runs:
            return
        try:
            for _ in range(self.sizes.repeats):
                for spec in self.wanted:
                    await self.run_workers(spec)
        except Exception as exc:
            self.block_error = repr(exc)
            raise
