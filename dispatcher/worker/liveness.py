"""Whether a worker process on this host is alive, for a liveness probe, without Redis.

Each worker touches a file of its own (`<tmp>/dispatcher-workers/<pid>.alive`, `tmp` as
`tempfile.gettempdir()` says: `TMPDIR`, else `/tmp`) every `MARK_S` on a timer of its own
(never behind a Redis call that waits out an outage), and removes it when it stops.
`dispatcher worker --check` passes while one of them is younger than `--fresh` (30 s): the
event loop of that worker turns. `dispatcher-alive` (`main`) is the same check for probes,
without the CLI: a probe every 30 s that loaded the CLI cost a worker's pod ~1.7 CPU-s each.

The probe asked Redis for the host's heartbeat before: a Redis full (`maxmemory`, the
heartbeat's write refused) or away for more than a few minutes failed every pod's probe,
and the orchestrator killed the whole fleet, dropping the writes each worker held to wait
the outage out, though a restart cures no Redis outage (review).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["FRESH_MIN_S", "MARK_S", "alive_here", "checked", "forget", "main", "mark_alive"]

MARK_S = 5.0
FRESH_MIN_S = 6.0  # the least `--fresh`: a mark's period and then some


def _folder() -> Path:
    return Path(tempfile.gettempdir()) / "dispatcher-workers"


def _mine() -> Path:
    return _folder() / f"{os.getpid()}.alive"


async def mark_alive() -> None:
    """This process's loop turns now (an unwritable folder only costs the probe)."""
    path = _mine()
    with contextlib.suppress(OSError):
        try:
            path.touch()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def forget() -> None:
    """This process stops: its file goes."""
    with contextlib.suppress(OSError):
        _mine().unlink(missing_ok=True)


def alive_here(fresh: float) -> list[int]:
    """The pids of this host's workers whose loop turned within `fresh` seconds."""
    since = time.time() - fresh
    found = []
    with contextlib.suppress(OSError):
        for path in _folder().glob("*.alive"):
            with contextlib.suppress(OSError, ValueError):
                if path.stat().st_mtime >= since:
                    found.append(int(path.stem))
    return sorted(found)


def checked(fresh: float) -> tuple[int, str]:
    """The probe's exit status (0 while a worker of this host turned its loop within `fresh`
    seconds, else 1) and what it says."""
    pids = alive_here(fresh)
    said = f"{len(pids)} live worker(s) on {socket.gethostname()} (event loop turned within "
    said += f"{fresh:g} s)" + (f": pid {', '.join(map(str, pids))}" if pids else "")
    return (0 if pids else 1), said


def main() -> None:
    """`dispatcher-alive [--fresh S]`: `dispatcher worker --check`, for probes."""
    parser = argparse.ArgumentParser(
        prog="dispatcher-alive",
        description="Exit 0 if a worker on this host turned its event loop within --fresh s.",
    )
    parser.add_argument("--fresh", type=float, default=30.0, help="seconds (at least 6)")
    fresh = parser.parse_args().fresh
    if fresh < FRESH_MIN_S:
        parser.error(
            f"--fresh must be at least {FRESH_MIN_S:g} (a worker marks every {MARK_S:g} s)"
        )
    status, said = checked(fresh)
    print(said)
    raise SystemExit(status)
