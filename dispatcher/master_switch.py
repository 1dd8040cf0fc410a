"""Following the sentinels' `+switch-master` at once, so that no connection goes on with a
master the sentinels replaced.

redis-py asks the sentinels for the master only when a connection connects. A connection
open to a master that stops answering without closing it (paused: SIGSTOP, a frozen VM, a
stalled network) is kept by its pool through the failover, idle; once the old master
answers again, and until the sentinels demote it (8 s and more), it takes that
connection's commands as a master: emits acknowledged there (`DISPATCHER_REDIS_MIN_REPLICAS`
0) were lost with its demotion, with 1 they answered 503 for as long while the new master
was up, and a worker's claims and writes there were undone (its deliveries repeated).

So each sentinel-backed pool, once used, runs a small task (`_follow`): subscribed to every
sentinel's `+switch-master` (one connection to each), it learns of a failover as the
sentinels make it, and it asks for the master (`SENTINEL MASTERS`) every
`DISPATCHER_REDIS_TIMEOUT` (what a listener missed while its sentinel was away). On a new
address, idle connections to the old one are closed, and one in use is closed before its
next command, which raises `MasterMoved` (a lost connection: retried, on the master). A
sentinel that fails or restarts is subscribed to again after a short pause. Nothing is
added to any command sent to Redis. The task ends with the pool's close (`disconnect`, as
the client's `aclose` does), and closes what it opened as it ends, cancelled too (a loop
that closes cancels it).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from dispatcher.addresses import host_port
from dispatcher.errors import describe

__all__ = ["SWITCH_MASTER", "FollowingPool", "FollowsSwitch", "MasterMoved"]

log = structlog.get_logger(__name__)

SWITCH_MASTER = "+switch-master"  # "<name> <old ip> <old port> <new ip> <new port>"
PAUSE_S = 0.5  # after a sentinel failed, before the next one


class MasterMoved(RedisConnectionError):
    """The sentinels named another master than this connection's: it is closed, and the
    command goes on a new connection (a lost connection to every caller)."""


class FollowingPool(SentinelConnectionPool):
    """A sentinel-backed pool of the master's connections that follows a failover at once
    (the module's doc)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._follower: asyncio.Task[None] | None = None
        self.heard = 0  # `+switch-master` messages followed (an answer asked before is stale)
        self.recheck_s = float(kwargs.get("socket_timeout") or 5.0)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        follower, loop = self._follower, asyncio.get_running_loop()
        if follower is None or follower.done() or follower.get_loop() is not loop:
            self._follower = loop.create_task(_follow(weakref.ref(self)))
        return await super().get_connection(*args, **kwargs)

    async def moved(self, address: tuple[str, int]) -> None:
        """The sentinels name the master at `address`: idle connections elsewhere closed,
        busy ones before their next command."""
        if self.master_address == address:
            return
        if self.master_address is None:  # no connection made yet
            self.master_address = address
            return
        log.warning(
            "redis.master_switched",
            master=self.service_name,
            old=host_port(*self.master_address),
            new=host_port(*address),
        )
        self.master_address = address
        await self.disconnect(inuse_connections=False)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """All the pool's connections (a client's close) closed once its follower is
        stopped, and with it its connections to the sentinels; only the idle ones (a
        switch), the follower going on."""
        if inuse_connections:
            await self.stop_following()
        await super().disconnect(inuse_connections)

    async def stop_following(self) -> None:
        """The follower cancelled and awaited: its listeners' connections and its idle ones
        to the sentinels closed (`_follow`)."""
        follower, self._follower = self._follower, None
        if follower is None or follower is asyncio.current_task():
            return
        if follower.get_loop() is not asyncio.get_running_loop():
            return
        follower.cancel()
        try:
            await follower
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # the closer's own: go on
                raise
        except Exception as exc:  # it died earlier (a sentinel's NOPERM): the close goes on
            log.warning("sentinel.follower_failed", error=describe(exc))


class FollowsSwitch(AbstractConnection):
    """Mixed into the master's connection class of a `FollowingPool`: before a command, a
    connection to another node than the master its pool knows is closed (`MasterMoved`)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        master = getattr(self, "connection_pool", None)
        master = getattr(master, "master_address", None)
        here = (getattr(self, "host", None), getattr(self, "port", None))
        if master is not None and self.is_connected and here != master:
            await self.disconnect()
            raise MasterMoved(
                f"{self._host_error()} is not the master now: the sentinels name "
                f"{host_port(*master)}"
            )
        await super().send_packed_command(command, check_health)


async def _follow(ref: weakref.ref[FollowingPool]) -> None:
    """Until the pool is gone (or its client closed): a listener on each sentinel, and the
    master asked for every `recheck_s` (what a listener missed while it reconnected). Ended
    (cancelled too, as a loop that closes cancels it), its listeners' connections are closed
    and the sentinels' idle ones (its questions'): a loop closed under it finds none open."""
    if (pool := ref()) is None:
        return
    sentinels, every = list(pool.sentinel_manager.sentinels), pool.recheck_s
    del pool  # (held only by the pool's client)
    listeners = [asyncio.create_task(_listen(ref, sentinel, every)) for sentinel in sentinels]
    try:
        while True:
            if not await _ask(ref) or not _going_on(ref):
                return
            await asyncio.sleep(every)
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        idle = (s.connection_pool.disconnect(inuse_connections=False) for s in sentinels)
        await asyncio.gather(*idle, return_exceptions=True)


async def _listen(ref: weakref.ref[FollowingPool], sentinel: Any, every: float) -> None:
    """Subscribed to `sentinel`'s `+switch-master`, again after a pause when it fails or
    restarts. Every sentinel is listened to: the one that led the failover announces it
    last (once the other replicas follow the new master: a second here), the others as
    soon as it tells them its new configuration. Returns when the pool is gone."""
    while _going_on(ref):
        pubsub = sentinel.pubsub()
        try:
            await pubsub.subscribe(SWITCH_MASTER)
            while _going_on(ref):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=every)
                if message is not None:
                    await _heard(ref, sentinel, message)
        except Exception as exc:  # the sentinel failed, or answered nonsense: again later
            log.debug("redis.sentinel_unheard", error=repr(exc))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        await asyncio.sleep(PAUSE_S)


def _going_on(ref: weakref.ref[FollowingPool]) -> bool:
    """Whether the pool is still there; CancelledError when this task was cancelled, the
    cancellation lost: on Python 3.11 redis-py sends each command under `asyncio.wait_for`,
    which drops a cancellation that comes as the send completes (the task went on, cancelled,
    for good: a client's close waited for it forever, a loop's close too)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return ref() is not None


async def _heard(ref: weakref.ref[FollowingPool], sentinel: Any, message: dict[str, Any]) -> None:
    """A `+switch-master` of the pool's master followed, and the sentinel that said it
    asked first from then on, by the pool's connections too (the others may name the old
    master for a moment yet)."""
    words = bytes(message.get("data") or b"").decode(errors="replace").split()
    pool = ref()
    if pool is None or len(words) != 5 or words[0] != pool.service_name:
        return
    if not words[4].isdigit():
        return
    sentinels = pool.sentinel_manager.sentinels
    if sentinel in sentinels:
        at = sentinels.index(sentinel)
        sentinels[0], sentinels[at] = sentinels[at], sentinels[0]
    pool.heard += 1
    await pool.moved((words[3], int(words[4])))


async def _ask(ref: weakref.ref[FollowingPool]) -> bool:
    """Follow the master the sentinels name now (none named: a failover under way, or no
    sentinel answers: nothing to follow), unless a `+switch-master` was followed while the
    question was out: its answer may predate the switch, and followed it would take the
    pool back to the old master until the next question (review); False when the pool is
    gone."""
    if (pool := ref()) is None:
        return False
    heard = pool.heard
    try:
        address = await pool.sentinel_manager.discover_master(pool.service_name)
        if pool.heard == heard:  # else a switch heard meanwhile is newer than this answer
            await pool.moved((str(address[0]), int(address[1])))
    except RedisError as exc:  # none named (MasterNotFoundError), NOPERM, a timeout: again
        log.debug("redis.sentinel_unasked", error=repr(exc))  # later (an end: no following)
    return True
