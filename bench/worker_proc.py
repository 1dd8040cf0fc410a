"""One worker process for the bench: the dispatcher's own arq worker, or a no-op baseline.

Protocol on stdin/stdout, so process start-up (imports) stays out of every measurement:
    -> `READY`           once imported and built
    <- `GO`              start `worker.main()`
    <- `STOP`            (non-burst runs only) stop now
    -> one JSON line     start/end wall times, jobs, CPU, RSS, and optional counters

Run: python -m bench.worker_proc --redis-url URL [--kind noop] [--burst] ...
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
from arq.worker import Worker, func

from bench.common import bench_settings, install_uvloop, rss_kb
from dispatcher import tracing
from dispatcher.connections import redis_settings
from dispatcher.jobs import FAN_OUT, job_deserializer, job_serializer
from dispatcher.logs import configure_logging
from dispatcher.serve import tune_gc
from dispatcher.settings import Settings
from dispatcher.worker import create_worker


@dataclass(slots=True)
class NoopStats:
    count: int = 0
    first: float = 0.0
    last: float = 0.0


NOOP = NoopStats()


async def noop_job(ctx: dict[str, Any], event: Any) -> int:
    """The arq baseline: takes the same job, does nothing."""
    now = time.time()
    if NOOP.count == 0:
        NOOP.first = now
    NOOP.count += 1
    NOOP.last = now
    return 0


def build_worker(kind: str, settings: Settings, burst: bool) -> Any:
    if kind == "dispatcher":
        return create_worker(settings, burst=burst, handle_signals=False)
    # arq's own Worker with the settings the dispatcher used when it ran on arq (JSON
    # serializer, max_jobs, poll_delay, keep_result 0, no per-job log lines), no-op job.
    return Worker(
        functions=[
            func(
                noop_job,
                name=FAN_OUT,
                timeout=settings.effective_job_timeout,
                keep_result=0,
                max_tries=1000,
            )
        ],
        redis_settings=redis_settings(settings),
        queue_name=settings.queue_name,
        max_jobs=settings.worker_max_jobs,
        poll_delay=settings.poll_delay,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        keep_result=0,
        health_check_interval=10,
        log_results=False,
        burst=burst,
        handle_signals=False,
    )


class RoundTrips:
    """Counts redis-py command writes (one per round trip: a pipeline is one write)."""

    def __init__(self) -> None:
        self.writes = 0
        self.commands: Counter[str] = Counter()

    def install(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        original = AbstractConnection.send_packed_command
        pack_command = AbstractConnection.pack_command
        counter = self

        async def send_packed_command(
            self: AbstractConnection, command: Any, check_health: bool = True
        ) -> None:
            counter.writes += 1
            await original(self, command, check_health)

        def counted_pack_command(self: AbstractConnection, *args: Any) -> Any:
            # pack_commands (pipelines) calls this once per command too.
            counter.commands[_name(args[0])] += 1
            return pack_command(self, *args)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]  # counting
        AbstractConnection.pack_command = counted_pack_command  # type: ignore[method-assign]  # counting
        # the worker's connections pack with hiredis (dispatcher.failover._Packing)
        from dispatcher.failover import _Packing

        packing = _Packing.pack_command

        def counted_packing(self: AbstractConnection, *args: Any) -> Any:
            counter.commands[_name(args[0])] += 1
            return packing(self, *args)  # type: ignore[arg-type]  # the mixin's own method

        _Packing.pack_command = counted_packing  # type: ignore[method-assign]  # counting


def _name(command: Any) -> str:
    text = command.decode() if isinstance(command, bytes) else str(command)
    return text.split()[0].upper()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(
        args.redis_url,
        history_url=args.history_url,
        log_level=args.log_level,
        poll_delay=args.poll_delay,
        worker_max_jobs=args.max_jobs,
        lease_seconds=args.lease_seconds,
    )
    configure_logging(settings)
    tracing.setup()  # as `dispatcher worker` does: the OTEL_* variables of the environment
    worker = build_worker(args.kind, settings, args.burst)
    trips = RoundTrips()
    if args.count_round_trips:
        trips.install()
    profiler = cProfile.Profile() if args.cprofile else None
    tune_gc()  # what `dispatcher worker` does once built (dispatcher/serve.py)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":  # blocking on purpose: nothing runs yet
        return {"error": "no GO"}
    rss_start = rss_kb(os.getpid())
    cpu0, start = _cpu_s(), time.time()
    if profiler:
        profiler.enable()
    if args.burst:
        await worker.main()
    else:
        main = asyncio.create_task(
            worker.main() if args.kind == "dispatcher" else worker.async_run()
        )
        await _read_line()  # STOP (or EOF)
        main.cancel()
    end = time.time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    cpu = _cpu_s() - cpu0
    jobs = worker.jobs_complete
    await worker.close()
    return {
        "kind": args.kind,
        "start": start,
        "end": end,
        "jobs_complete": jobs,
        "jobs_failed": worker.jobs_failed,
        "cpu_s": cpu,
        "rss_kb": rss_kb(os.getpid()),
        "rss_start_kb": rss_start,  # at GO
        "hwm_kb": rss_kb(os.getpid(), "VmHWM"),  # the peak, start-up included
        "noop": {"count": NOOP.count, "first": NOOP.first, "last": NOOP.last},
        "round_trips": trips.writes,
        "commands": dict(trips.commands),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--kind", choices=["dispatcher", "noop"], default="dispatcher")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--history-url", help="PostgreSQL history (default: in Redis)")
    parser.add_argument("--log-level", default="WARNING")
    defaults = Settings.model_fields
    parser.add_argument("--poll-delay", type=float, default=defaults["poll_delay"].default)
    parser.add_argument("--max-jobs", type=int, default=defaults["worker_max_jobs"].default)
    parser.add_argument("--lease-seconds", type=float, default=defaults["lease_seconds"].default)
    parser.add_argument("--cprofile", help="write cProfile stats of the run to this file")
    parser.add_argument("--count-round-trips", action="store_true")
    args = parser.parse_args()
    install_uvloop()
    result = asyncio.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
