"""The wall clock in epoch milliseconds: what history records, leases, schedules and
statistics count in. One definition, low in the import graph (it imports nothing of ours)."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000
