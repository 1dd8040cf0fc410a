"""python -m bench [--quick] [--only a,b] [--profile]

Starts a private redis-server and the receiver, runs the scenarios, prints one table and
writes bench/results/<timestamp>.json and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profile, report
from bench.common import MAX_JOBS, POLL_DELAY, RESULTS_DIR, install_uvloop, machine_busy_seconds
from bench.harness import Bench, Scenario, Sizes, wanted_runs
from bench.postgres import PG_SETTINGS, create_databases
from bench.procs import BenchError, Receiver
from bench.report import Row
from bench.scenarios import SCENARIOS
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
MIN_SPAN_S = 1.0  # a scenario shorter than this ran its runs in the worker block


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (about 3 min)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BY_NAME)}"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the worker on the throughput scenario"
    )
    parser.add_argument("--profile-deliveries", type=int, default=5_000)
    parser.add_argument(
        "--profile-callbacks", type=int, default=1, help="callbacks per event when profiling"
    )
    parser.add_argument(
        "--profile-lanes",
        type=int,
        default=0,
        help="when profiling, callbacks ordered by `lane`, events over this many values",
    )
    parser.add_argument(
        "--profile-pg",
        action="store_true",
        help="when profiling, the worker keeps its history in PostgreSQL (and ships it)",
    )
    parser.add_argument(
        "--history-pg-total", type=int, help="records in the big PostgreSQL history table"
    )
    parser.add_argument(
        "--history-pg-hot", type=int, help="of which the queried (url, event) holds"
    )
    return parser.parse_args()


def _selected(only: str) -> list[Scenario]:
    """The scenarios `--only` names, in the registry's order (all without it)."""
    if not only:
        return list(SCENARIOS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    return [scenario for scenario in SCENARIOS if scenario.name in names]


async def _scenarios(
    bench: Bench, selected: list[Scenario]
) -> tuple[list[Row], dict[str, float], dict[str, float | None]]:
    """Run `selected` in order; returns the rows, seconds per scenario, and the cores other
    processes on the machine used meanwhile (this machine is shared: a busy neighbour
    shows up here, and in every figure)."""
    rows: list[Row] = []
    timings: dict[str, float] = {}
    others: dict[str, float | None] = {}
    for scenario in selected:
        name = scenario.name
        started = time.monotonic()
        machine0, own0 = machine_busy_seconds(), await bench.own_cpu()
        print(f"- {name} ...", flush=True)
        try:
            rows += await scenario.run(bench)
        except Exception as exc:  # one broken scenario must not hide the others
            if isinstance(exc, BenchError):
                print(f"  {name} failed: {exc}", flush=True)
            else:
                traceback.print_exc()
            rows.append(
                Row(name, "failed", None, "", target="-", ok=False, details={"error": repr(exc)})
            )
        elapsed = time.monotonic() - started
        busy = machine_busy_seconds() - machine0 - (await bench.own_cpu() - own0)
        timings[name] = round(elapsed, 1)
        if elapsed < MIN_SPAN_S:  # its runs were in the shared worker block: theirs tell
            others[name] = None
            print(f"  {name}: {elapsed:.1f}s (its runs measured with the worker block's)")
            continue
        others[name] = round(max(0.0, busy) / elapsed, 2)
        print(f"  {name}: {elapsed:.1f}s (other processes: {others[name]:.2f} cores)", flush=True)
    return rows, timings, others


async def _main(args: argparse.Namespace, url: str, logs: Path, pg_url: str | None = None) -> int:
    started = time.monotonic()
    sizes = Sizes.pick(args.quick)
    overrides = {"history_pg_total": args.history_pg_total, "history_pg_hot": args.history_pg_hot}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v})
    receiver = Receiver()
    await receiver.start()
    bench = Bench(url, receiver, sizes, logs)
    selected = _selected(args.only)
    bench.wanted = wanted_runs(selected)
    if pg_url is not None:
        bench.pg_url = pg_url
        (bench.history_url,) = await create_databases(pg_url, ("workers",))
    await bench.open()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        if args.profile:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            shape = profile.Shape(args.profile_callbacks, args.profile_lanes, args.profile_pg)
            result = await profile.run(bench, args.profile_deliveries, RESULTS_DIR, stamp, shape)
            text = profile.render(result)
            print(text)
            (RESULTS_DIR / f"profile-{stamp}.json").write_text(json.dumps(result, indent=2))
            (RESULTS_DIR / f"profile-{stamp}.txt").write_text(text + "\n")
            print(f"\nwritten: {RESULTS_DIR}/profile-{stamp}.{{json,txt,pyspy.txt,cprofile.txt}}")
            return 0
        rows, timings, others = await _scenarios(bench, selected)
    finally:
        await bench.close()
        await receiver.stop()
    wall = time.monotonic() - started
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": report.machine(),
        "wall_seconds": round(wall, 1),
        "scenario_seconds": timings,
        "sizes": sizes.__dict__,
        "worker_settings": {"max_jobs": MAX_JOBS, "poll_delay": POLL_DELAY},
        # Cores other processes on this (shared) machine used: per scenario, and per
        # worker-rate run.
        "other_processes_cores": others,
        "other_processes_cores_per_worker_run": {
            label: [round(run.others_cores, 2) for run in runs]
            for label, runs in bench.worker_runs.items()
        },
    }
    mode = "quick" if args.quick else "full"
    title = f"callback-dispatcher bench ({mode}, {meta['date']}, {meta['machine']['cores']} cores)"
    report.render(rows, title)
    print(
        f"other processes on this {meta['machine']['cores']}-core machine meanwhile (cores): "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in others.items() if cores is not None)
    )
    path = report.write(rows, meta)
    print(f"wall time {wall:.0f}s; written {path} and {RESULTS_DIR / 'latest.json'}")
    missed = [f"{row.scenario}: {row.figure}" for row in rows if row.ok is False]
    if missed:
        print("targets missed: " + "; ".join(missed))
    # Exit 1 only when a scenario could not be measured; a missed target is a finding.
    return 1 if any(row.value is None for row in rows) else 0


def main() -> int:
    args = _parse()
    install_uvloop()
    tmp = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    logs = tmp / "logs"
    logs.mkdir()
    redis = EmbeddedRedis(tmp / "redis", persist=False)
    postgres = None
    if (args.profile and args.profile_pg) or (
        not args.profile and any(scenario.postgres for scenario in _selected(args.only))
    ):
        tmp.chmod(0o755)  # as root, PostgreSQL runs as nobody, who must reach its folder
        postgres = EmbeddedPostgres(settings=dict(PG_SETTINGS), data_dir=tmp / "pg")
    code = 1
    try:
        url = redis.start()
        pg_url = postgres.start().url if postgres is not None else None
        code = asyncio.run(_main(args, url, logs, pg_url))
        return code
    finally:
        redis.stop()
        if postgres is not None:
            postgres.stop()
        if code != 0 and any(logs.iterdir()):  # keep the workers' logs for a post-mortem
            kept = RESULTS_DIR / f"logs-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
            shutil.copytree(logs, kept)
            print(f"worker logs kept in {kept}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
