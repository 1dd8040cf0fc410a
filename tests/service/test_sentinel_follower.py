"""A Sentinel-backed pool's follower (`dispatcher/master_switch.py`: a task listening to
every sentinel's `+switch-master`, asking for the master now and then), on a real Sentinel
group: a cancellation redis-py lost ends it all the same, and it leaves nothing open."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from dispatcher.connections import connect
from dispatcher.embedded import SentinelGroup
from dispatcher.master_switch import FollowingPool
from tests.helpers import make_settings, until

Path = Callable[[str], Coroutine[Any, Any, None]]


def follows(task: asyncio.Task[Any]) -> bool:
    """Whether `task` is a follower's (its own or a listener's)."""
    return getattr(task.get_coro(), "__name__", "") in ("_follow", "_listen")


def following() -> list[asyncio.Task[Any]]:
    """The follower's tasks still running."""
    return [task for task in asyncio.all_tasks() if follows(task)]


def client(url: str) -> tuple[Redis, FollowingPool]:
    redis = connect(make_settings(url, redis_timeout=1))
    pool = redis.connection_pool
    assert isinstance(pool, FollowingPool)
    return redis, pool


def left_open(path: Path, url: str) -> list[str]:
    """The ResourceWarnings of what `path` left open, once its loop is closed (as the CLI's
    `asyncio.run` or a test's loop closes it: its tasks cancelled) and the garbage
    collected."""
    gc.collect()  # (what an earlier test left is not this one's)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(path(url))
        gc.collect()
    return sorted({str(w.message) for w in seen if issubclass(w.category, ResourceWarning)})


SENDER: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar("sender")


def test_a_follower_whose_cancellation_was_lost_ends_all_the_same(
    sentinel_group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 redis-py sends each command under `asyncio.wait_for`, which drops a
    cancellation that comes as the send completes: the task goes on as if not cancelled.
    Each of the follower's tasks is cancelled so here, once, in its first send (SENTINEL
    MASTERS, a subscription's handshake): each ends all the same. Before, it went on for
    good, and the client's close (or the loop's) that cancelled it waited for it forever."""
    send, send_now = AbstractConnection.send_packed_command, AbstractConnection._send_packed_command
    cancelled: set[asyncio.Task[Any]] = set()
    lost: set[asyncio.Task[Any]] = set()

    async def sending(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        task, token = asyncio.current_task(), SENDER.set(asyncio.current_task())
        try:
            await send(self, command, check_health)
        finally:
            SENDER.reset(token)
        if task in cancelled and task is not None and task.cancelling():
            lost.add(task)  # sent, as if not cancelled

    async def sent_now(self: AbstractConnection, command: Any) -> None:
        sender = SENDER.get(None)  # (this runs in wait_for's own task)
        if sender is not None and follows(sender) and sender not in cancelled:
            cancelled.add(sender)
            sender.cancel()  # as the send completes
        await send_now(self, command)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", sending)
    monkeypatch.setattr(AbstractConnection, "_send_packed_command", sent_now)

    async def cancellation_lost(url: str) -> None:
        redis, _ = client(url)
        await redis.ping()

        async def ended() -> bool:
            return len(cancelled) == 4 and not following()  # the follower, 3 listeners

        await until(ended, 10, "the follower's tasks ending, each cancelled once")
        await redis.aclose()

    assert left_open(cancellation_lost, sentinel_group.url) == []
    assert len(lost) == 4 or sys.version_info >= (3, 12)  # (3.12's wait_for loses none)
