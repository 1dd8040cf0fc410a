"""Where a worker's time goes on the throughput scenario (`python -m bench --profile`).

Three runs of the same scenario (1 worker, 1 callback/event):
1. py-spy (sampling, non-blocking) when it is installed: time shares per cost bucket and
   per function, turned into CPU µs per delivery with the run's measured CPU time;
2. cProfile inside the worker: calls per delivery and cost per call;
3. redis-py instrumented: Redis round trips (socket writes) and commands per delivery;
then the worker's HTTP path alone against a raw aiohttp loop (CPU per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import pstats
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import BenchError, WorkerProcess, run_loadgen
from dispatcher.registry import Options

if TYPE_CHECKING:
    from bench.harness import Bench

# Innermost matching frame wins: a sample inside delivery.send is "HTTP", even though
# Worker._run and Engine.fan_out are on the stack too.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("Writer._flush_forever", "durable group commit (records, progress, job ends of many jobs)"),
    ("Batcher._flush", "read pipelines (callback match of many jobs)"),
    ("Batcher._flush_soon", "read pipelines (callback match of many jobs)"),
    ("send", "HTTP POST (aiohttp) incl. response read"),
    ("Sender._refusal", "egress policy check of the callback's address"),
    ("mask_headers", "headers masked for the record"),
    ("attempt", "delivery.attempt: building the request"),
    ("Engine._write", "attempt write (queue, wait for the commit)"),
    ("attempt_record", "history record of the attempt"),
    ("Batcher.execute", "waiting on / queueing into the read pipelines"),
    ("request_headers", "headers + HMAC signature"),
    ("observe", "metrics + per-attempt log call"),
    ("encode_body", "body encoding (orjson)"),
    ("Engine.attempt", "dispatcher: attempt bookkeeping"),
    ("Engine.fan_out", "dispatcher: fan-out bookkeeping"),
    ("Worker._run", "job loop: decode, timeout, end"),
    ("Claims.claim", "job loop: batch claim (one Lua round trip)"),
    ("Worker._claim_loop", "job loop: claiming, waiting for room"),
    ("Worker._every", "job loop: heartbeat, lease renewal, health check"),
)
OTHER = "event loop, GC, other"
_FRAME = re.compile(r"^(?P<name>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


@dataclass
class Samples:
    total: int = 0
    buckets: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    leaf: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)


def _split(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    return match.group("name"), match.group("file")


def _package(path: str) -> str:
    if path.startswith(("<frozen", "asyncio/")) or "/" not in path:
        return "asyncio/stdlib" if path.startswith("asyncio/") else path.split("/")[0]
    return path.split("/")[0]


def parse_raw(text: str) -> Samples:
    """py-spy `--format raw` (collapsed stacks: `f1;f2;...;fn count`)."""
    samples = Samples()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(f) for f in stack.split(";")]
        names = [f"{name} ({path})" for name, path in frames]
        samples.total += count
        for name in set(names):
            samples.inclusive[name] += count
        samples.leaf[names[-1]] += count
        samples.packages[_package(frames[-1][1])] += count
        bucket = OTHER
        for name, _path in reversed(frames):
            label = next((lbl for anchor, lbl in BUCKETS if anchor == name), None)
            if label:
                bucket = label
                break
        samples.buckets[bucket] += count
    return samples


def _shares(counter: Counter[str], total: int, cpu_us: float, top: int) -> list[dict[str, Any]]:
    return [
        {"what": key, "share": round(n / total, 4), "us_per_delivery": round(cpu_us * n / total, 1)}
        for key, n in counter.most_common(top)
    ]


def _cprofile_summary(path: Path, deliveries: int, top: int = 30) -> tuple[str, list[Any]]:
    stats = pstats.Stats(str(path))
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]  # undeclared in typeshed
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]  # undeclared
        rows.append(
            {
                "function": f"{name} ({Path(file).name}:{line})",
                "calls_per_delivery": round(ncalls / deliveries, 2),
                "tottime_us_per_delivery": round(1e6 * tottime / deliveries, 1),
                "cumtime_us_per_delivery": round(1e6 * cumtime / deliveries, 1),
            }
        )
    rows.sort(key=lambda r: r["tottime_us_per_delivery"], reverse=True)
    return buffer.getvalue(), rows[:top]


@dataclass(frozen=True)
class Shape:
    """What the profiled worker delivers: `callbacks` per event, ordered by `lane` over
    `lanes` values when `lanes` (see `scenarios/ordered.py`); its history in the bench's
    PostgreSQL when `postgres` (the worker ships it too)."""

    callbacks: int = 1
    lanes: int = 0
    postgres: bool = False

    def describe(self) -> str:
        ordered = f", ordered over {self.lanes} lanes" if self.lanes else ""
        history = ", PostgreSQL history" if self.postgres else ""
        return f"{self.callbacks} callback(s) per event{ordered}{history}"


async def _run_once(bench: Bench, n: int, extra: list[str], shape: Shape) -> WorkerProcess:
    """A worker waiting for GO over a queue of `n` deliveries, shaped by `shape`."""
    options = Options(order_by="lane") if shape.lanes else None
    if shape.postgres:
        if bench.history_url is None:
            raise BenchError("--profile-pg: the bench's PostgreSQL is not running")
        extra = [*extra, "--history-url", bench.history_url]
    worker, _ = await asyncio.gather(
        WorkerProcess.start(bench.url, extra=extra, log_path=bench.logs / "profile.log"),
        bench.prepare(shape.callbacks, n // shape.callbacks, options, lanes=shape.lanes),
    )
    await bench.receiver.reset()
    return worker


async def _finish(bench: Bench, worker: WorkerProcess, n: int) -> dict[str, Any]:
    result = await worker.finish(within=60 + n / 50)
    stats = await bench.receiver.stats()
    result["received"] = stats["count"]
    result["rate"] = n / (result["end"] - result["start"])
    return result


def _pyspy() -> str | None:
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.exists() else None)


def _summarise(out: Path, result: dict[str, Any], n: int) -> dict[str, Any] | None:
    if not out.exists():
        return None
    samples = parse_raw(out.read_text())
    cpu_us = 1e6 * result["cpu_s"] / n
    return {
        "rate": result["rate"],
        "worker_cpu_us_per_delivery": round(cpu_us, 1),
        "samples": samples.total,
        "buckets": _shares(samples.buckets, samples.total, cpu_us, 20),
        "inclusive": _shares(samples.inclusive, samples.total, cpu_us, 60),
        "self": _shares(samples.leaf, samples.total, cpu_us, 30),
        "packages": _shares(samples.packages, samples.total, cpu_us, 15),
    }


async def _pyspy_run(
    bench: Bench, n: int, out: Path, rate_hz: int, shape: Shape
) -> dict[str, Any] | None:
    pyspy = _pyspy()
    if pyspy is None:
        return None
    worker = await _run_once(bench, n, [], shape)
    spy = await asyncio.create_subprocess_exec(
        pyspy, "record", "--pid", str(worker.pid), "--rate", str(rate_hz), "--format", "raw",
        "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # py-spy attaches
    worker.go()
    result = await _finish(bench, worker, n)
    try:
        await asyncio.wait_for(spy.wait(), 30)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            spy.kill()
        await spy.wait()
    return _summarise(out, result, n)


async def run(
    bench: Bench, n: int, out_dir: Path, stamp: str, shape: Shape | None = None
) -> dict[str, Any]:
    """The three runs over `n` deliveries shaped by `shape`; writes
    profile-<stamp>.{json,txt} (and the raw py-spy stacks)."""
    shape = shape or Shape()
    report: dict[str, Any] = {"deliveries": n, "shape": shape.describe()}
    pyspy_out = out_dir / f"profile-{stamp}.pyspy.txt"
    report["pyspy"] = await _pyspy_run(bench, n, pyspy_out, 250, shape)

    prof = out_dir / f"profile-{stamp}.cprofile"
    worker = await _run_once(bench, n, ["--cprofile", str(prof)], shape)
    worker.go()
    report["cprofile_run"] = await _finish(bench, worker, n)
    text, rows = _cprofile_summary(prof, n)
    report["cprofile_top"] = rows

    worker = await _run_once(bench, n, ["--count-round-trips"], shape)
    worker.go()
    counted = await _finish(bench, worker, n)
    report["round_trips_per_delivery"] = round(counted["round_trips"] / n, 2)
    report["commands_per_delivery"] = {
        name: round(count / n, 2)
        for name, count in sorted(counted["commands"].items(), key=lambda kv: -kv[1])
    }
    (out_dir / f"profile-{stamp}.cprofile.txt").write_text(text)
    try:  # the worker's HTTP path alone, against raw aiohttp (same receiver, same load)
        report["http_paths"] = await run_loadgen(
            "http",
            ["--url", f"{bench.receiver.base}/hook/0", "--n", "4000", "--repeats", "3"],
            within=180,
        )
    except BenchError as exc:  # e.g. the dispatcher's HTTP API changed under the bench
        report["http_paths"] = {"error": str(exc)}
    return report


def render(report: dict[str, Any]) -> str:
    """A plain-text summary of `run`'s report."""
    lines = [f"deliveries per run: {report['deliveries']:,}, {report.get('shape', '')}"]
    spy = report.get("pyspy")
    if spy:
        lines.append(
            f"py-spy run: {spy['rate']:,.0f} deliveries/s, worker CPU "
            f"{spy['worker_cpu_us_per_delivery']:,.0f} µs per delivery, {spy['samples']} samples"
        )
        lines.append("\nwhere the worker's CPU goes (µs per delivery, share):")
        lines += [
            f"  {b['us_per_delivery']:7.1f}  {100 * b['share']:5.1f}%  {b['what']}"
            for b in spy["buckets"]
        ]
        lines.append("\nby package of the running (leaf) frame:")
        lines += [
            f"  {b['us_per_delivery']:7.1f}  {100 * b['share']:5.1f}%  {b['what']}"
            for b in spy["packages"]
        ]
        lines.append("\ntop functions, inclusive:")
        lines += [
            f"  {b['us_per_delivery']:7.1f}  {100 * b['share']:5.1f}%  {b['what']}"
            for b in spy["inclusive"][6:40]
        ]
    else:
        lines.append("py-spy not installed: `.venv/bin/pip install py-spy` for time shares")
    lines.append(f"\nRedis round trips per delivery: {report['round_trips_per_delivery']}")
    lines.append(
        "Redis commands per delivery: "
        + ", ".join(f"{k} {v}" for k, v in report["commands_per_delivery"].items())
    )
    http = report.get("http_paths", {})
    if "cpu_us_per_request" in http:
        lines.append(
            "\nHTTP path alone, CPU µs per request (200 concurrent, same receiver): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in http["cpu_us_per_request"].items())
        )
    lines.append("\ncProfile, top by own time (µs per delivery, calls per delivery):")
    lines += [
        f"  {r['tottime_us_per_delivery']:7.1f}  {r['calls_per_delivery']:6.2f}  {r['function']}"
        for r in report["cprofile_top"][:25]
    ]
    return "\n".join(lines)
