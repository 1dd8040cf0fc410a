"""A Sentinel-backed pool's follower (`dispatcher/master_switch.py`: a task listening to
every sentinel's `+switch-master`, asking for the master now and then) leaves nothing open,
on a real Sentinel group: whichever way it ends (the client closed, at once or in full swing;
the pool disconnected; the loop closed under it; a command made while the client closes; a
sentinel that drops the connection as it subscribes), no task of it runs on and no
connection it opened is left for the garbage collector (a `ResourceWarning`: "unclosed
Connection", a stream writer of a closed loop); and a cancellation redis-py lost ends it
all the same."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

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


async def in_full_swing(redis: Redis, pool: FollowingPool) -> None:
    """A command made (the follower started), and a subscriber on every sentinel."""
    await redis.ping()

    async def subscribed() -> bool:
        seen = [await s.client_list() for s in pool.sentinel_manager.sentinels]
        return all(any(c.get("sub") == "1" for c in clients) for clients in seen)

    await until(subscribed, 10, "a subscriber on every sentinel")


async def closed(url: str) -> None:
    redis, pool = client(url)
    await in_full_swing(redis, pool)
    await redis.aclose()
    assert not following()


async def closed_at_once(url: str) -> None:
    """The close as the follower connects to the sentinels and subscribes."""
    for turns in range(0, 30, 3):
        redis, _ = client(url)
        await redis.ping()
        for _ in range(turns):
            await asyncio.sleep(0)
        await redis.aclose()
        assert not following()


async def disconnected(url: str) -> None:
    """The pool disconnected (all its connections, as a client's close does), the client
    left as it is."""
    redis, pool = client(url)
    await in_full_swing(redis, pool)
    await pool.disconnect()
    assert not following()


async def loop_closed(url: str) -> None:
    """The loop closes under the follower: the pool's own connections closed (idle ones,
    the follower going on), and the client left as it is."""
    redis, pool = client(url)
    await in_full_swing(redis, pool)
    await pool.disconnect(inuse_connections=False)


async def command_while_closing(url: str) -> None:
    """A command made while the client closes (its follower stopped, the pool not yet
    disconnected) starts a follower again: it ends with the close. (The pool full, the
    command is refused at once: the follower is all it starts, whichever ends first.)"""
    redis, pool = client(url)
    await in_full_swing(redis, pool)
    held = await pool.get_connection()
    pool.max_connections = 1
    closing = asyncio.create_task(redis.aclose())
    await asyncio.sleep(0)  # the close under way
    with pytest.raises(RedisConnectionError, match="Too many connections"):
        await redis.ping()
    await pool.release(held)
    await closing
    assert not following()


async def sentinel_drops_subscribers(url: str) -> None:
    """A sentinel (listed first) that closes the connection on SUBSCRIBE, tried again by
    its listener after its pause, then the close."""
    subscribes: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while line := await reader.readline():
                words = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    words.append((await reader.readexactly(size + 2))[:-2].lower())
                if words[0] == b"subscribe":
                    subscribes.append(words[1])
                    break
                writer.write(b"*0\r\n" if words[0] == b"sentinel" else b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis, _ = client(url.replace("://", f"://127.0.0.1:{port},", 1))
    await redis.ping()

    async def tried_twice() -> bool:
        return len(subscribes) >= 2

    await until(tried_twice, 10, "the listener subscribing again after its pause")
    await redis.aclose()
    assert not following()
    server.close()
    for writer in writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await server.wait_closed()


def left_open(path: Path, url: str) -> list[str]:
    """The ResourceWarnings of what `path` left open, once its loop is closed (as the CLI's
    `asyncio.run` or a test's loop closes it: its tasks cancelled) and the garbage
    collected. What earlier tests left is frozen meanwhile: not this one's to collect (its
    warnings would be counted here), nor walked by each collection (in a worker that ran
    many tests, a full collection took about a second)."""
    gc.freeze()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            asyncio.run(path(url))
            gc.collect()
    finally:
        gc.unfreeze()
    return sorted({str(w.message) for w in seen if issubclass(w.category, ResourceWarning)})


@pytest.mark.parametrize(
    "path",
    [
        closed,
        closed_at_once,
        disconnected,
        loop_closed,
        command_while_closing,
        sentinel_drops_subscribers,
    ],
)
def test_the_follower_leaves_no_task_and_no_connection_open(
    sentinel_group: SentinelGroup, path: Path
) -> None:
    assert left_open(path, sentinel_group.url) == []


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


def test_a_follower_whose_questions_are_refused_follows_on_and_closes(
    sentinel_group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sentinel refusing `SENTINEL MASTERS` (an ACL's NOPERM) ended the follower with that
    error (no following after it: the paused-master loss back), and the client's close then
    raised it, its connections to the master left open. Refused, it asks again later."""
    refused: list[asyncio.Task[Any]] = []

    async def refusing(url: str) -> None:
        redis, pool = client(url)
        discover = pool.sentinel_manager.discover_master

        async def refuse(name: str) -> Any:
            if (task := asyncio.current_task()) is not None and follows(task):
                refused.append(task)
                raise ResponseError("NOPERM this user has no permissions to run 'sentinel'")
            return await discover(name)

        monkeypatch.setattr(pool.sentinel_manager, "discover_master", refuse)

        async def asked_again() -> bool:
            return len(refused) >= 2

        await redis.ping()
        await until(asked_again, 10, "the follower asking again once refused")
        assert pool._follower is not None and not pool._follower.done()
        await redis.aclose()

    assert left_open(refusing, sentinel_group.url) == []


def test_a_close_that_is_cancelled_is_cancelled(sentinel_group: SentinelGroup) -> None:
    """The client's close waits for the follower; a cancellation of the closing task then
    (a request cancelled while its producer closes) was swallowed with the follower's own:
    the close returned as if not cancelled."""

    async def cancelled_closes(url: str) -> None:
        for turns in range(8):
            redis, pool = client(url)
            await in_full_swing(redis, pool)
            closing = asyncio.create_task(redis.aclose())
            for _ in range(turns):
                await asyncio.sleep(0)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            await redis.aclose()  # what the cancelled close left

    assert left_open(cancelled_closes, sentinel_group.url) == []
