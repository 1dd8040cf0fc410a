"""A worker's part in the PostgreSQL history: its shipper, and the backlog bound.

Each worker runs a shipper (`DISPATCHER_HISTORY_SHIP`, on by default); one at a time in the
fleet ships, the others stand by (see `dispatcher.history.shipper`). Every second the worker
reads how many records wait in Redis and the bytes they take: past
`DISPATCHER_HISTORY_BACKLOG_LIMIT` records, or past a share of the Redis' maxmemory
(`backlog_bytes`), it stops claiming jobs (deliveries wait in the queue, nothing is dropped
and the records do not fill Redis) until the shipper has caught up. With the Redis backend
all of this is idle.

An idle worker checks less often: after a check that found every backlog under half its
bounds (so not past them), with no job started since the check before, it waits twice as
long as before, up to `BACKLOG_IDLE_MAX_S` (every worker of an idle fleet read it every
second, for nothing). The bound is what stops a worker's claims, and a worker that starts
no job writes no record: the first job it starts wakes the watch for a check at once, and it
checks every second while it starts jobs. Its answer may then be up to 8 s old, and an idle
worker's claims ask every fraction of a second (a check before each would undo the wait):
while the watch waits longer than a second, a claim takes one job (`share`), whose start
wakes the check, and the next claim waits for that check (`fresh`, one round trip). So a
worker idle for hours, the backlog past the bound meanwhile, starts one job on the old
answer and stops, where its first claim took as many jobs as it had room for (200 by
default: review), and one checking every second claimed for up to a second on the last.

The watch outlives any error: an outage or a reply meaning "not now" (BUSY with a script,
LOADING: `transient_reply`) leaves the last answer to the next check, any other (an ACL
refusing XLEN) too, logged once until a check succeeds (a BUSY reply ended the watch for
good, the worker held or unbounded from then on: review).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, cast

import structlog

from dispatcher import metrics
from dispatcher.connections import REDIS_ERRORS, transient_reply
from dispatcher.history import heal
from dispatcher.history.postgres import PostgresHistory, backlog_of
from dispatcher.history.shipper import Shipper
from dispatcher.stopping import cancel_all
from dispatcher.worker.backlog_bytes import StreamBytes

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from dispatcher.services import Services

__all__ = ["Shipping"]

log = structlog.get_logger("dispatcher.worker")

BACKLOG_EVERY_S = 1.0  # while the worker starts jobs, or a backlog nears a bound
BACKLOG_IDLE_MAX_S = 8.0  # the longest wait of an idle worker's watch
NEAR = 0.5  # a backlog past this share of a bound is checked every second


class Shipping:
    """Started with the worker's loop, stopped after its last writes are in Redis: one
    shipper per shard served (each shard's stream), one backlog over them all."""

    def __init__(self, shards: list[Services]) -> None:
        self.settings = shards[0].settings
        self.shards = shards
        self.enabled = isinstance(shards[0].history, PostgresHistory)
        self.full = False  # the backlog is past its limit: claim nothing
        self.wait = BACKLOG_EVERY_S  # until the watch's next check
        self._bytes = [StreamBytes() for _ in shards]
        self._started = False  # a job started since the last check
        self._woken = asyncio.Event()
        self._checked = asyncio.Event()  # set at the end of the watch's next check
        self._failing = False  # a check's error said (once until a check succeeds)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ship: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        self.wait, self._woken = BACKLOG_EVERY_S, asyncio.Event()  # (the running loop's)
        self._checked = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._watch()))
        # The schema upgraded once PostgreSQL answers, shipping or not (`history.heal`).
        self._tasks.append(asyncio.create_task(heal.keep(self.settings)))
        if self.settings.history_ship:
            shippers = [
                Shipper(shard.redis, self.settings, shard.shard, stop=self._stop).run()
                for shard in self.shards
            ]
            self._ship = asyncio.create_task(_all(shippers))

    def job_started(self) -> None:
        """The worker started a job (it will write records): check every second again,
        and at once when the watch waits longer."""
        self._started = True
        if self.wait > BACKLOG_EVERY_S:
            self._woken.set()

    def share(self, share: int) -> int:
        """A claim's jobs: one while the watch waits longer than a second (its answer may
        be that old), else `share`."""
        return 1 if self.wait > BACKLOG_EVERY_S else share

    async def fresh(self) -> None:
        """Before a claim: when a job started while the watch waited longer than a second
        (it woke the watch), wait for that check's answer (one round trip; at most
        `BACKLOG_IDLE_MAX_S`)."""
        if self.wait > BACKLOG_EVERY_S and self._started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._checked.wait(), BACKLOG_IDLE_MAX_S)

    async def _watch(self) -> None:
        while True:
            calm = await self._check()
            idle, self._started = calm and not self._started, False
            self.wait = min(2 * self.wait, BACKLOG_IDLE_MAX_S) if idle else BACKLOG_EVERY_S
            self._woken.clear()  # a job started during the check: counted just above
            self._checked.set()  # (`fresh`)
            self._checked = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.wait)

    async def _check(self) -> bool:
        """`check`, its errors the next check's (see the module's doc); not calm then."""
        try:
            calm = await self.check()
        except REDIS_ERRORS:
            return False
        except Exception as exc:  # the watch must not end: `full` would stay as it is
            if not transient_reply(exc) and not self._failing:
                log.error("history.backlog_unchecked", error=repr(exc))
                self._failing = True
            return False
        self._failing = False
        return calm

    async def check(self) -> bool:
        """Read the backlog (of every shard served); set the gauges and whether the worker
        may claim (no shard's backlog past the limit, in records or bytes: each is one
        Redis's memory). Whether every backlog is under `NEAR` its bounds."""
        waiting, age, worst, held, over, near = 0, 0.0, 0, 0, False, False
        for shard, measured in zip(self.shards, self._bytes, strict=True):
            count, oldest, info = await _backlog(shard, measured)
            stream = shard.keys.HISTORY_STREAM
            size, past = await measured.over(shard.redis, stream, count, info)
            over, near = over or past, near or size > NEAR * measured.limit
            waiting, age, worst = waiting + count, max(age, oldest), max(worst, count)
            held += size
        metrics.HISTORY_BACKLOG.set(waiting)
        metrics.HISTORY_BACKLOG_AGE.set(age)
        metrics.HISTORY_BACKLOG_BYTES.set(held)
        full = over or worst >= self.settings.history_backlog_limit
        near = near or worst >= NEAR * self.settings.history_backlog_limit
        if full != self.full:
            if full:
                log.error(
                    "history.backlog_full",
                    waiting=waiting,
                    bytes=held,
                    oldest_s=round(age, 1),
                    limit=self.settings.history_backlog_limit,
                    past_bytes_bound=over,
                )
            else:
                log.info("history.backlog_ok", waiting=waiting, bytes=held)
            self.full = full
        return not near

    async def stop(self, within: float) -> None:
        """Stop the shipper, which first ships what is left while it leads (at most
        `within` seconds: what remains waits for another shipper), then the watch."""
        self._stop.set()
        if self._ship is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ship), within)
            await cancel_all([self._ship])
        await cancel_all(self._tasks)


async def _backlog(shard: Services, measured: StreamBytes) -> tuple[int, float, Any]:
    """A shard's records and the oldest one's age, and the bound's `INFO memory` reply
    when it went with them (one round trip: `StreamBytes.ask_bound`), else None."""
    history = cast("PostgresHistory", shard.history)
    async with shard.redis.pipeline(transaction=False) as pipe:
        history.ask_backlog(pipe)
        asked = measured.ask_bound(pipe, shard.redis)
        length, first, *info = await pipe.execute(raise_on_error=False)
    for reply in (length, first):
        if isinstance(reply, Exception):
            raise reply
    return (*backlog_of(length, first), info[0] if asked else None)


async def _all(shippers: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*shippers)
