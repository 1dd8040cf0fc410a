"""`shards`: the same deliveries on one Redis and on two shards (the bench's Redis and a
second private redis-server, `DISPATCHER_REDIS_SHARDS`), 2 worker processes each time,
interleaved rep by rep. Rows: Redis commands and Redis CPU per delivery on each shard
(from `INFO commandstats` and `used_cpu_*` before and after the run), which should not
change with the number of shards; the aggregate rate of 2 shards against 1 (on 2 cores
the workers, both Redis servers and the receiver share the CPU: this says that sharding
costs nothing, not how far it scales); and the deliveries per second that one Redis core
can carry at the measured cost, the unit of the README's ceiling table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from redis.asyncio import Redis

from bench.common import EVENT, TOKEN, bench_settings, event_data
from bench.harness import Scenario
from bench.procs import BenchError, WorkerProcess
from bench.report import Row, ratio_row
from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from bench.harness import Bench

WORKERS = 2


@dataclass
class Cost:
    """What one shard's Redis did for its deliveries in a run."""

    commands: int
    cpu_s: float
    deliveries: int
    net_bytes: int = 0  # into and out of Redis
    command_us: int = 0  # time Redis spent inside commands (INFO commandstats)

    @property
    def commands_per_delivery(self) -> float:
        return self.commands / self.deliveries

    @property
    def cpu_us_per_delivery(self) -> float:
        return 1e6 * self.cpu_s / self.deliveries

    @property
    def net_bytes_per_delivery(self) -> float:
        return self.net_bytes / self.deliveries

    @property
    def command_us_per_delivery(self) -> float:
        return self.command_us / self.deliveries


@contextlib.contextmanager
def shard_list(urls: list[str] | None) -> Iterator[None]:
    """`DISPATCHER_REDIS_SHARDS` for the worker processes started meanwhile."""
    name = "DISPATCHER_REDIS_SHARDS"
    before = os.environ.get(name)
    if urls is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = orjson.dumps(urls).decode()
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


async def _usage(redis: Redis) -> Cost:
    """Since the stats were reset: commands and their time, CPU seconds, network bytes in
    and out (its `deliveries` set by the caller)."""
    commands = (await redis.info("commandstats")).values()
    cpu, stats = await redis.info("cpu"), await redis.info("stats")
    return Cost(
        commands=sum(int(v["calls"]) for v in commands),
        cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        deliveries=1,
        net_bytes=int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"]),
        command_us=sum(int(v["usec"]) for v in commands),
    )


async def _fill(bench: Bench, settings: Settings, urls: list[str], events: int) -> list[str]:
    """Empty shards (every one in use), one project per shard with a callback on the
    receiver, `events` queued over them evenly; returns the projects. (Emptied before a
    process opens them: the run before left two shards in use, which a process given one
    URL refuses.)"""
    for url in urls:
        async with Redis.from_url(url) as shard:
            await shard.flushdb()
    async with Router.open(settings) as router:
        await Mover(router, lambda _: None, settle_s=0.001).grow()
        projects: dict[int, str] = {}
        for n in range(1000):
            projects.setdefault(router.of(f"bench-{n}").shard.index, f"bench-{n}")
            if len(projects) == len(router.shards):
                break
        for project in projects.values():
            hook = f"{bench.receiver.base}/hook/0"
            registration = Registration(project, hook, Region.DEVNET, "bench", TOKEN)
            await router.of(project).register(registration, EVENT)
    names = list(projects.values())
    async with Producer(settings) as producer:
        for start in range(0, events, 1000):
            batch = range(start, min(events, start + 1000))
            await producer.emit_many([(names[i % len(names)], EVENT, event_data(i)) for i in batch])
    return names


async def _run(bench: Bench, urls: list[str]) -> tuple[float, list[Cost]]:
    """deliveries/s of `WORKERS` burst workers over the shards of `urls`, and each
    shard's Redis cost."""
    events = bench.sizes.deliveries
    listed = urls if len(urls) > 1 else None
    settings = bench_settings(urls[0], redis_shards=listed)
    projects = await _fill(bench, settings, urls, events)
    with shard_list(listed):
        procs = [
            await WorkerProcess.start(urls[0], log_path=bench.logs / f"shards-{len(urls)}.log")
            for _ in range(WORKERS)
        ]
    async with Router.open(settings) as router:
        clients = [services.redis for services in router.shards]
        for client in clients:
            await client.config_resetstat()
        before = [await _usage(client) for client in clients]
        await bench.receiver.reset()
        for proc in procs:
            proc.go()
        results = await asyncio.gather(*(p.finish(60 + events / 100) for p in procs))
        after = [await _usage(client) for client in clients]
    received = (await bench.receiver.stats())["count"]
    if received != events:
        raise BenchError(f"shards: the receiver saw {received} of {events} deliveries")
    per_shard = events // len(projects)
    costs = [
        Cost(b.commands, b.cpu_s - a.cpu_s, per_shard, b.net_bytes - a.net_bytes, b.command_us)
        for a, b in zip(before, after, strict=True)  # commandstats were reset: no `a` there
    ]
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return events / seconds, costs


async def run(bench: Bench) -> list[Row]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    costs: dict[int, list[list[Cost]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-shard-") as tmp:
        second = EmbeddedRedis(Path(tmp), persist=False)
        await asyncio.to_thread(second.start)
        try:
            for _ in range(bench.sizes.repeats):
                for urls in ([bench.url], [bench.url, second.url]):
                    rate, cost = await _run(bench, urls)
                    rates[len(urls)].append(rate)
                    costs[len(urls)].append(cost)
        finally:
            await bench.r.flushdb()
            second.stop()
    return _rows(rates, costs)


def _median(costs: list[list[Cost]], attribute: str) -> float:
    """The median over the reps of the per-shard mean of one cost figure."""
    means = [statistics.mean(float(getattr(cost, attribute)) for cost in rep) for rep in costs]
    return float(statistics.median(means))


def _rows(rates: dict[int, list[float]], costs: dict[int, list[list[Cost]]]) -> list[Row]:
    one_cmd, two_cmd = (_median(costs[n], "commands_per_delivery") for n in (1, 2))
    one_cpu, two_cpu = (_median(costs[n], "cpu_us_per_delivery") for n in (1, 2))
    one_in, two_in = (_median(costs[n], "command_us_per_delivery") for n in (1, 2))
    details = {
        "rates": rates,
        "per_shard": {
            n: [[vars(cost) for cost in rep] for rep in reps] for n, reps in costs.items()
        },
    }
    # at the higher load of one shard's run (a busier Redis batches more: a lower bound)
    per_core = 1e6 / one_cpu if one_cpu else None
    one_net, two_net = (_median(costs[n], "net_bytes_per_delivery") for n in (1, 2))
    return [
        ratio_row("shards", "Redis commands per delivery, per shard, 2 shards", two_cmd, "",
                  "1 shard", one_cmd, maximum=1.1, details=details),
        ratio_row("shards", "Redis time inside commands per delivery, per shard, 2 shards",
                  two_in, "µs", "1 shard", one_in, maximum=1.25),
        ratio_row("shards", "Redis CPU per delivery, per shard, 2 shards (half the load each)",
                  two_cpu, "µs", "1 shard", one_cpu, target="report"),
        ratio_row("shards", "deliveries/s, 2 shards, 2 workers", statistics.median(rates[2]),
                  "/s", "1 shard, 2 workers", statistics.median(rates[1]), target="report"),
        ratio_row("shards", "Redis network bytes per delivery, per shard, 2 shards", two_net,
                  "B", "1 shard", one_net, target="report"),
        Row("shards", "deliveries/s one Redis core carries (1e6 / Redis CPU per delivery)",
            per_core, "/s", target="report (README: Scale)"),
    ]  # fmt: skip


SCENARIO = Scenario("shards", run)
