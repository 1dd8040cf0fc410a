"""Stopping background tasks for sure.

A cancel that lands while a task is inside the Redis client's read can be lost there: the
call returns as if nothing happened and the task goes on (seen with redis-py 5.3: a
producer's close waited for ever on its placement refresh, 2 closes in 53 in a loop).
So a task that must end is cancelled again until it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_all", "retrieved"]

AGAIN_EVERY_S = 0.5  # how long a cancelled task may take before it is cancelled again


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again those that
    swallowed it; what they raised is dropped."""
    every = list(tasks)
    pending = {task for task in every if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=AGAIN_EVERY_S)
    for task in every:
        if task.done():
            retrieved(task)


def retrieved(done: asyncio.Future[Any]) -> None:
    """Mark what a finished future raised as seen (its awaiter, if any, still gets it): no
    "exception was never retrieved" warning for one nobody waits for. Also a done
    callback."""
    if not done.cancelled():
        done.exception()
