"""Whether a worker process on this host is alive, for a liveness probe, without Redis.

Each worker touches a file of its own (`<tmp>/dispatcher-workers/<pid>.alive`, `tmp` as
`tempfile.gettempdir()` says: `TMPDIR`, else `/tmp`) every `MARK_S` on a timer of its own
(never behind a Redis call that waits out an outage), and removes it when it stops.
`dispatcher worker --check` passes while one of them is younger than `--fresh` (30 s): the
event loop of that worker turns.

The probe asked Redis for the host's heartbeat before: a Redis full (`maxmemory`, the
heartbeat's write refused) or away for more than a few minutes failed every pod's probe,
and the orchestrator killed the whole fleet, dropping the writes each worker held to wait
the outage out, though a restart cures no Redis outage (review).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

__all__ = ["MARK_S", "alive_here", "forget", "mark_alive"]

MARK_S = 5.0


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
