"""Pure retry arithmetic: the delay before the next attempt, and `Retry-After`."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

__all__ = ["next_delay", "parse_retry_after"]

_DIGITS = re.compile(r"[0-9]{1,10}")  # beyond ten digits it is no delay anyone honours


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds asked for by a `Retry-After` header: ASCII digits (delta-seconds) or an HTTP
    date; anything else is ignored (a receiver writes what it likes there).

    >>> parse_retry_after("120")
    120.0
    >>> parse_retry_after("soon") is None
    True
    >>> parse_retry_after("\u00b2") is None  # `isdigit()` says yes, `float()` raises
    True
    """
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def next_delay(
    schedule: Sequence[float],
    attempt: int,
    *,
    jitter: float = 0.0,
    retry_after: float | None = None,
    retry_after_cap: float = 3600.0,
    rng: random.Random | None = None,
) -> float | None:
    """Delay in seconds before attempt `attempt + 1`, or None when `attempt` was the last.

    `attempt` counts from 1. The schedule's delay gets ±`jitter` spread; a receiver's
    `Retry-After` replaces it when larger, capped at `retry_after_cap`.

    >>> next_delay([5, 30], 1)
    5.0
    >>> next_delay([5, 30], 3) is None
    True
    >>> next_delay([5, 30], 1, retry_after=60)
    60.0
    """
    if attempt < 1 or attempt > len(schedule):
        return None
    delay = float(schedule[attempt - 1])
    if jitter:
        delay *= (rng or random).uniform(1 - jitter, 1 + jitter)
    if retry_after is not None:
        delay = max(delay, float(min(retry_after, retry_after_cap)))
    return delay
