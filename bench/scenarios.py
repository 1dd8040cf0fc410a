"""The scenarios. Each one is bounded in count and time, and pairs its figure with a
baseline measured in the same run (interleaved where noise matters; medians)."""

from __future__ import annotations

import asyncio
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import history_bench, wide
from bench.common import (
    EVENT,
    PROJECT,
    bench_settings,
    cpu_seconds,
    event_data,
    machine_busy_seconds,
)
from bench.procs import BenchError, Receiver, WorkerProcess, run_loadgen
from bench.report import Row, ratio_row
from dispatcher.connections import connect
from dispatcher.producer import Producer
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULTS = Settings.model_fields
MAX_JOBS: int = DEFAULTS["worker_max_jobs"].default
POLL_DELAY: float = DEFAULTS["poll_delay"].default


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

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                deliveries=2_000,
                repeats=3,
                ceiling=5_000,
                emit=5_000,
                emit_repeats=3,
                batch_repeats=5,
                http_emit=3_000,
                http_batches=10,
                fault_deliveries=4_000,
                latency_s=5.0,
                memory_early=2_000,
                memory_late=20_000,
                history_total=100_000,
                history_rounds=150,
                history_pg_total=200_000,
                history_pg_hot=100_000,
                ship_records=50_000,
                lag_s=5.0,
            )
        return cls(
            deliveries=6_000,
            repeats=3,
            ceiling=20_000,
            emit=20_000,
            emit_repeats=3,
            batch_repeats=7,
            http_emit=10_000,
            http_batches=20,
            fault_deliveries=8_000,
            latency_s=20.0,
            memory_early=10_000,
            memory_late=100_000,
            history_total=1_000_000,
            history_rounds=300,
            history_pg_total=2_000_000,
            history_pg_hot=1_000_000,
            ship_records=200_000,
            lag_s=20.0,
        )


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
    results: list[dict[str, Any]] = field(default_factory=list)
    redis_bytes: int = 0  # Redis used_memory after the run, less before its events

    @property
    def others_cores(self) -> float:
        """Cores used by processes outside the bench during the run (noisy neighbours)."""
        ours = self.worker_cpu_s + self.redis_cpu_s + self.receiver_cpu_s
        return max(0.0, self.machine_cpu_s - ours) / self.seconds

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds

    def per_delivery(self) -> dict[str, float]:
        n = self.deliveries
        return {
            "worker_cpu_us": 1e6 * self.worker_cpu_s / n,
            "redis_cpu_us": 1e6 * self.redis_cpu_s / n,
            "receiver_cpu_us": 1e6 * self.receiver_cpu_s / n,
            "redis_commands": self.redis_commands / n,
            "redis_command_us": self.redis_usec / n,
        }


def _median_run(runs: list[WorkerRun]) -> WorkerRun:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def _summary(runs: list[WorkerRun]) -> dict[str, Any]:
    median = _median_run(runs)
    return {
        "rates": [round(r.rate, 1) for r in runs],
        "median_rate": round(median.rate, 1),
        "deliveries": median.deliveries,
        "seconds": round(median.seconds, 3),
        "per_delivery": {k: round(v, 2) for k, v in median.per_delivery().items()},
        "received": [r.received for r in runs],
        "other_processes_cores": [round(r.others_cores, 2) for r in runs],
    }


class Bench:
    """Shared state: the Redis URL and connection, the receiver, the sizes."""

    def __init__(self, redis_url: str, receiver: Receiver, sizes: Sizes, logs: Path) -> None:
        self.url = redis_url
        self.receiver = receiver
        self.sizes = sizes
        self.logs = logs
        self.settings = bench_settings(redis_url)
        self.redis: Redis | None = None
        self.worker_runs: dict[str, list[WorkerRun]] = {}
        # Which worker-rate runs the selected scenarios need (see worker_block).
        self.wanted: set[str] = {
            "noop", "throughput", "throughput_info", "scale_out", "fan_out", "fan_out_wide",
        }  # fmt: skip
        self.block_error = ""
        self.pg_url: str | None = None  # a private PostgreSQL's `postgres` database, when started
        self.history_url: str | None = None  # its database for workers with PostgreSQL history
        self._mem_base = 0

    @property
    def r(self) -> Redis:
        assert self.redis is not None
        return self.redis

    async def open(self) -> None:
        self.redis = connect(self.settings)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # ---- helpers -------------------------------------------------------------------

    async def prepare(self, callbacks: int, events: int) -> None:
        """An empty Redis, `callbacks` callbacks on (PROJECT, EVENT), `events` queued."""
        await self.r.flushdb()
        await wide.register(self.r, self.receiver.base, callbacks)
        self._mem_base = await self._used_memory()
        producer = Producer(self.settings, self.r)
        for start in range(0, events, 1000):
            stop = min(events, start + 1000)
            await producer.emit_many([(PROJECT, EVENT, event_data(i)) for i in range(start, stop)])

    async def _used_memory(self) -> int:
        return int((await self.r.info("memory"))["used_memory"])

    async def own_cpu(self) -> float:
        """CPU seconds the bench has used so far: this process, its finished children,
        the receiver and redis-server (both still running)."""
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        return mine + cpu_seconds(self.receiver.pid) + await self._redis_cpu()

    async def _redis_cpu(self) -> float:
        info = await self.r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def _commandstats(self) -> tuple[int, int]:
        info = await self.r.info("commandstats")
        calls = sum(int(v["calls"]) for v in info.values())
        usec = sum(int(v["usec"]) for v in info.values())
        return calls, usec

    async def run_workers(
        self,
        *,
        callbacks: int,
        events: int,
        workers: int = 1,
        kind: str = "dispatcher",
        log_level: str = "WARNING",
        label: str = "",
        history_url: str | None = None,
    ) -> WorkerRun:
        """Fill the queue, start `workers` burst workers, GO, wait until all are done."""
        deliveries = events * (callbacks if kind == "dispatcher" else 1)
        log_path = self.logs / f"{label or kind}.log"
        extra = ["--history-url", history_url] if history_url else []
        started, _ = await asyncio.gather(
            asyncio.gather(
                *(
                    WorkerProcess.start(
                        self.url, kind=kind, log_level=log_level, log_path=log_path, extra=extra
                    )
                    for _ in range(workers)
                )
            ),
            self.prepare(callbacks, events),
        )
        procs: list[WorkerProcess] = list(started)
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
        calls, usec = await self._commandstats()
        expected = deliveries if kind == "dispatcher" else 0
        if stats["count"] != expected:
            raise BenchError(f"{label}: receiver saw {stats['count']} of {expected} requests")
        done = sum(r["jobs_complete"] for r in results)
        if done < events:  # more is fine: arq counts the cron sweep when it fires meanwhile
            raise BenchError(f"{label}: workers completed {done} of {events} jobs")
        run = WorkerRun(
            deliveries=deliveries,
            seconds=max(r["end"] for r in results) - min(r["start"] for r in results),
            received=stats["count"],
            worker_cpu_s=sum(r["cpu_s"] for r in results),
            redis_cpu_s=await self._redis_cpu() - redis_cpu0,
            receiver_cpu_s=cpu_seconds(self.receiver.pid) - receiver_cpu0,
            redis_commands=calls,
            redis_usec=usec,
            machine_cpu_s=machine_cpu,
            results=results,
            redis_bytes=await self._used_memory() - self._mem_base,
        )
        self.worker_runs.setdefault(label or kind, []).append(run)
        return run

    # ---- scenarios -----------------------------------------------------------------

    async def worker_block(self) -> None:
        """Every worker-rate run, interleaved rep by rep (noop, 1 worker, INFO, 2 workers,
        fan-out) so that each figure and its baseline share the machine's noise."""
        if self.block_error:
            raise BenchError(f"the worker-rate runs failed: {self.block_error}")
        if self.worker_runs:
            return
        n = self.sizes.deliveries
        plan: dict[str, dict[str, Any]] = {
            "noop": {"kind": "noop", "callbacks": 1, "events": n},
            "throughput": {"callbacks": 1, "events": n},
            "throughput_info": {"callbacks": 1, "events": n, "log_level": "INFO"},
            "scale_out": {"callbacks": 1, "events": n, "workers": 2},
            "noop_scale_out": {"kind": "noop", "callbacks": 1, "events": n, "workers": 2},
            "fan_out": {"callbacks": 10, "events": n // 10},
            "throughput_pg": {"callbacks": 1, "events": n, "history_url": self.history_url},
            "fan_out_wide": {"callbacks": wide.WIDE, "events": 1},
        }
        try:
            for _ in range(self.sizes.repeats):
                for label, options in plan.items():
                    if label in self.wanted:
                        await self.run_workers(label=label, **options)
        except Exception as exc:
            self.block_error = repr(exc)
            raise

    async def throughput(self) -> list[Row]:
        """1 worker, 1 callback/event, history on, vs an arq no-op worker."""
        await self.worker_block()
        noop = _median_run(self.worker_runs["noop"])
        disp = _median_run(self.worker_runs["throughput"])
        info = _median_run(self.worker_runs["throughput_info"])
        details = {
            "dispatcher": _summary(self.worker_runs["throughput"]),
            "noop": _summary(self.worker_runs["noop"]),
            "settings": {"max_jobs": MAX_JOBS, "poll_delay": POLL_DELAY, "log_level": "WARNING"},
        }
        return [
            ratio_row(
                "throughput", "deliveries/s, 1 worker, 1 callback/event", disp.rate, "/s",
                "arq no-op worker", noop.rate, minimum=0.8, details=details,
            ),
            ratio_row(
                "worker CPU", "µs per delivery (throughput above)",
                disp.per_delivery()["worker_cpu_us"], "µs", "arq no-op worker, per job",
                noop.per_delivery()["worker_cpu_us"],
            ),
            ratio_row(
                "throughput (log INFO)", "the same, log level INFO", info.rate, "/s",
                "arq no-op worker", noop.rate, minimum=0.6,
                details={
                    "info": _summary(self.worker_runs["throughput_info"]),
                    "vs_warning": info.rate / disp.rate,
                },
            ),
        ]  # fmt: skip

    async def ceiling(self) -> list[Row]:
        """A raw aiohttp POST loop, same receiver, concurrency = max_jobs."""
        await self.worker_block()
        rates = []
        for _ in range(self.sizes.repeats):
            await self.receiver.reset()
            result = await run_loadgen(
                "ceiling",
                [
                    "--url", f"{self.receiver.base}/hook/0", "--n", str(self.sizes.ceiling),
                    "--concurrency", str(MAX_JOBS),
                ],
                within=120,
            )  # fmt: skip
            stats = await self.receiver.stats()
            if stats["count"] != self.sizes.ceiling:
                raise BenchError(f"ceiling: receiver saw {stats['count']} requests")
            rates.append(result["rate"])
        disp = _median_run(self.worker_runs["throughput"])
        return [
            ratio_row(
                "ceiling", "deliveries/s (throughput above)", disp.rate, "/s",
                "raw aiohttp POST loop", statistics.median(rates),
                details={"ceiling_rates": rates, "concurrency": MAX_JOBS},
            )
        ]  # fmt: skip

    async def fan_out(self) -> list[Row]:
        """10 callbacks per event (as many deliveries in all) vs 1 callback per event; then
        one event to 10,000 callbacks: its rate vs the 10-callback rate, the worker's memory
        growth meanwhile, and what a worker killed half-way made us send again."""
        await self.worker_block()
        fan = _median_run(self.worker_runs["fan_out"])
        one = _median_run(self.worker_runs["throughput"])
        return [
            ratio_row(
                "fan-out", "deliveries/s, 10 callbacks/event", fan.rate, "/s",
                "1 callback/event", one.rate, minimum=2.0,
                details={
                    "fan_out": _summary(self.worker_runs["fan_out"]),
                    "events": self.sizes.deliveries // 10,
                },
            ),
            *await wide.rows(self, fan.rate, _summary(self.worker_runs["fan_out_wide"])),
        ]  # fmt: skip

    async def scale_out(self) -> list[Row]:
        """2 worker processes vs 1, against the same ratio for arq no-op workers: on 2
        cores Redis and the receiver share the CPU, so only like against like says whether
        the dispatcher scales as well as arq itself does."""
        await self.worker_block()
        runs = self.worker_runs
        ours = _median_run(runs["scale_out"]).rate / _median_run(runs["throughput"]).rate
        arqs = _median_run(runs["noop_scale_out"]).rate / _median_run(runs["noop"]).rate
        return [
            ratio_row(
                "scale-out", "deliveries/s, 2 workers / 1 worker", ours, "x",
                "arq no-op workers, 2 / 1", arqs, minimum=0.9,
                details={
                    "two_workers": _summary(runs["scale_out"]),
                    "noop_two_workers": _summary(runs["noop_scale_out"]),
                },
            )
        ]  # fmt: skip

    async def emit(self) -> list[Row]:
        """Producer.emit, 500 in flight, vs bare arq enqueue_job; interleaved."""
        n = str(self.sizes.emit)
        emit_rates: list[float] = []
        arq_rates: list[float] = []
        for _ in range(self.sizes.emit_repeats):
            for mode, rates in (("emit", emit_rates), ("enqueue", arq_rates)):
                await self.r.flushdb()
                args = ["--redis-url", self.url, "--n", n, "--inflight", "500"]
                rates.append((await run_loadgen(mode, args, within=120))["rate"])
        await self.r.flushdb()
        batch = await run_loadgen(
            "batch",
            ["--redis-url", self.url, "--n", "1000", "--repeats", str(self.sizes.batch_repeats)],
            within=120,
        )
        await self.r.flushdb()
        return [
            ratio_row(
                "emit", "events/s, 1 producer, 500 in flight",
                statistics.median(emit_rates), "/s", "bare arq enqueue_job",
                statistics.median(arq_rates), minimum=0.9,
                details={"emit_rates": emit_rates, "arq_rates": arq_rates, "n": self.sizes.emit},
            ),
            ratio_row(
                "emit batch", "events/s, emit_many of 1,000 events", batch["batch_rate"], "/s",
                "1,000 single emits", batch["single_rate"], minimum=3.0, details=batch,
            ),
        ]  # fmt: skip

    async def latency(self) -> list[Row]:
        """emit -> receiver at 200 events/s, one worker with default settings."""
        await self.prepare(callbacks=1, events=0)
        worker = await WorkerProcess.start(
            self.url, burst=False, log_path=self.logs / "latency.log"
        )
        try:
            worker.go()
            await asyncio.sleep(0.5)  # its start-up is not part of any event's latency
            await self.receiver.reset(latency=True)
            sent = await run_loadgen(
                "latency",
                ["--redis-url", self.url, "--rate", "200", "--duration", str(self.sizes.latency_s)],
                within=self.sizes.latency_s + 60,
            )
            stats = await self.receiver.wait_count(sent["sent"], within=30)
            pairs = (await self.receiver.control("/_latency"))["pairs"]
            worker.stop()
            await worker.finish(within=30)
        finally:
            await worker.kill()
        lat = sorted((arrival - emitted) * 1000 for emitted, arrival in pairs)
        if not lat or stats["count"] != sent["sent"]:
            raise BenchError(f"latency: {stats['count']} of {sent['sent']} arrived")
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        details = {
            "p50_ms": p50, "p90_ms": lat[int(0.9 * len(lat))], "p99_ms": p99, "max_ms": lat[-1],
            "events": len(lat), "emit": sent,
            "settings": {"max_jobs": MAX_JOBS, "poll_delay": POLL_DELAY},
        }  # fmt: skip
        return [
            Row(
                "latency", "emit -> receiver, 200 events/s", p99, "ms",
                target="p99 <= 150 ms", ok=p99 <= 150,
                shown=f"p50 {p50:.1f} ms / p99 {p99:.1f} ms", details=details,
            )
        ]  # fmt: skip

    async def memory(self) -> list[Row]:
        """Worker RSS after `memory_early` and after `memory_late` deliveries."""
        early, late = self.sizes.memory_early, self.sizes.memory_late
        checkpoints = sorted({early, late // 4, late // 2, 3 * late // 4, late})
        worker, _ = await asyncio.gather(
            WorkerProcess.start(self.url, burst=False, log_path=self.logs / "memory.log"),
            self.prepare(callbacks=1, events=late),
        )
        samples: dict[int, int] = {}
        try:
            await self.receiver.reset()
            worker.go()
            for mark in checkpoints:
                stats = await self.receiver.wait_count(mark, within=30 + mark / 100)
                if stats["count"] < mark:
                    raise BenchError(f"memory: {stats['count']} of {mark} deliveries")
                samples[mark] = worker.rss_kb()
            worker.stop()
            await worker.finish(within=30)
        finally:
            await worker.kill()
        return [
            ratio_row(
                "memory", f"worker RSS after {late:,} deliveries", samples[late] / 1024, "MiB",
                f"RSS after {early:,}", samples[early] / 1024, maximum=1.2,
                details={"rss_kb_at": samples},
            )
        ]  # fmt: skip

    async def history(self) -> list[Row]:
        """History.query at `history_total` records vs one GET; and vs ~10k records."""
        small = connect(self.settings, self.url.rsplit("/", 1)[0] + "/1")
        try:
            result = await history_bench.run(
                self.r, small, self.settings, self.sizes.history_total, self.sizes.history_rounds
            )
            await small.flushdb()
        finally:
            await small.aclose()
        await self.r.flushdb()
        t = result.timings
        total, few = f"{result.large_total:,}", f"{result.small_total:,}"
        details = {
            "timings_us": t, "small_total": result.small_total,
            "large_total": result.large_total, "fill_rate": result.fill_rate,
            "page_size": history_bench.PAGE_SIZE,
        }  # fmt: skip
        return [
            ratio_row(
                "history query", f"query page 1, {total} records", t["page_1"], "µs",
                "Redis GET of 2 KB", t["get_2kb"], maximum=5.0, details=details,
            ),
            ratio_row(
                "history query", f"query at offset 10,000, {total} records",
                t["page_offset_10000"], "µs", "Redis GET of 2 KB", t["get_2kb"], maximum=5.0,
            ),
            ratio_row(
                "history scale", f"query page 1, {total} records", t["page_1"], "µs",
                f"same at {few} records", t["small_page_1"], maximum=1.5,
            ),
            ratio_row(
                "history scale", f"query at offset 10,000, {total} records",
                t["page_offset_10000"], "µs", f"same at {few} records",
                t["small_page_offset_10000"], maximum=1.5,
            ),
        ]  # fmt: skip
