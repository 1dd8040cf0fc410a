"""Receiver controls in the worker: a callback's limits around each attempt (`maxPerSecond`,
`maxInFlight`), shared by every worker of the fleet through Redis (its filter, at fan-out:
`filtering.py`).

The options come with the callback's row (the match script's, or `Registry.target`'s), so
a callback without limits costs no Redis command here. One with limits is *admitted*
before each attempt by one script (`Admit`, run with the others of the engine's shared
read pipeline as one call):

- starts: a sorted set of the starts of the last second; a start is admitted while fewer
  than `maxPerSecond` are in it (a sliding window: no second, wherever it begins, holds
  more);
- in flight: a sorted set of slots scored by when they lapse (the attempt's total timeout
  and a margin: it holds its share of the worker before it is admitted), so a worker
  killed mid-request cannot hold a slot for ever; the attempt's own write gives the slot
  back (`Release`, in the same pipeline as its record: with the batch's other releases,
  after their records, when the delivery ends there), whatever its outcome, and a run that
  raises gives it back through the writer;
- a line: deliveries that could not start wait their turn, taken per emitting project
  (start-time fair queueing): a delivery's turn is one past the later of its project's last
  and the turn started last. So a project's own newcomer never overtakes it, and projects
  flooding a platform-wide callback wait behind their own backlogs while another's
  deliveries take the next turns. A waiting delivery returns to the queue as a job due
  when its turn should come (no attempt spent, no record): the start that frees its place
  plus a second, or, for a slot, until a `Release` makes the first ones in line due at
  once. A delivery that does not come back in time (its job ended otherwise) leaves the
  line by itself.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dispatcher.lua import REDIS_NOW_MS, Key, Script
from dispatcher.worker.steps import Step

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from dispatcher.batch import Batcher
    from dispatcher.ending import JobEnd
    from dispatcher.jobs import DeliveryJob
    from dispatcher.keys import Keys
    from dispatcher.registry import CallbackTarget
    from dispatcher.settings import Settings
    from dispatcher.worker.shares import Shares, Slot
    from dispatcher.worker.writer import Then, Writer

__all__ = ["Admit", "Controls", "Release", "Releasing"]

log = structlog.get_logger("dispatcher.worker")


@dataclass
class Admit(Script):
    """Takes a start and a slot for a delivery when the callback's limits let it start now
    (returns 0), else puts it in line at its `emitter`'s next turn: {ms to wait, 1 when a
    slot (not the rate) holds it}. The keys are `keys.limits(callback)`; `per_second` and
    `in_flight` are the limits (0: none), `slot_ms` a slot's lease, `keep_ms` how long a
    waiting job keeps its place past its expected turn, `min_wait_ms` the smallest wait."""

    TOGETHER = True  # the admits of a read pipeline are one call (`Batcher.together`)
    LUA = (
        REDIS_NOW_MS
        + """
    local function next_turn()  -- one past the turn started last, and past its project's
      local taken = redis.call('HMGET', turns, ':', emitter)
      return math.max(tonumber(taken[1] or 0), tonumber(taken[2] or 0)) + 1
    end
    local now = redis_now_ms()
    local rate, cap = tonumber(per_second), tonumber(in_flight)
    local waiting, rank, turn = redis.call('ZCARD', line), false, false
    if waiting > 0 then
      local gone = redis.call('ZRANGEBYSCORE', seen, '-inf', now, 'LIMIT', 0, 500)
      if #gone > 0 then
        waiting = waiting - redis.call('ZREM', line, unpack(gone))
        redis.call('ZREM', seen, unpack(gone))
      end
      rank = redis.call('ZRANK', line, job)
      if rank then
        turn = tonumber(redis.call('ZSCORE', line, job))
        if turn > 1e12 then  -- put in line by a version before turns (by arrival, in ms)
          redis.call('ZREM', line, job)
          waiting, rank, turn = waiting - 1, false, false
        end
      end
    end
    local room, started, holding = math.huge, 0, 0
    if rate > 0 then
      redis.call('ZREMRANGEBYSCORE', starts, '-inf', now - 1000)
      started = redis.call('ZCARD', starts)
      room = rate - started
    end
    if cap > 0 then
      redis.call('ZREMRANGEBYSCORE', running, '-inf', now)
      holding = redis.call('ZCARD', running)
      room = math.min(room, cap - holding)
    end
    local ahead = rank or 0
    if not rank and waiting > 0 then  -- a newcomer: ahead of it, the turns before its own
      turn = next_turn()
      ahead = redis.call('ZCOUNT', line, '-inf', '(' .. turn)
    end
    if ahead < room then
      if rate > 0 then
        redis.call('ZADD', starts, now, token)
        redis.call('PEXPIRE', starts, 1000)
      end
      if cap > 0 then
        redis.call('ZADD', running, now + tonumber(slot_ms), token)
        redis.call('PEXPIRE', running, slot_ms)
      end
      if rank then
        redis.call('ZREM', line, job)
        redis.call('ZREM', seen, job)
      end
      if turn then  -- started from the line or past it: the line's clock is its turn
        if turn > tonumber(redis.call('HGET', turns, ':') or 0) then
          redis.call('HSET', turns, ':', turn)
        end
        if not rank then redis.call('HSET', turns, emitter, turn) end
        if redis.call('PTTL', turns) < 0 then redis.call('PEXPIRE', turns, keep_ms) end
      end
      return 0
    end
    local wait, by_slot = tonumber(min_wait_ms), 0
    if rate > 0 and rate - started <= ahead then
      local k = ahead - (rate - started)
      if started == 0 then
        wait = math.max(wait, 1000 * math.floor(ahead / rate))
      else
        local first = redis.call('ZRANGE', starts, k % started, k % started, 'WITHSCORES')
        wait = math.max(wait, tonumber(first[2]) + 1000 * (math.floor(k / started) + 1) - now)
      end
    end
    if cap > 0 and cap - holding <= ahead then
      local rounds = math.floor((ahead - (cap - holding)) / cap) + 1
      wait = math.max(wait, math.min(250 * rounds, tonumber(slot_ms)))
      by_slot = 1
    end
    if not rank then
      turn = turn or next_turn()  -- the first in line has none yet
      redis.call('ZADD', line, turn, job)
      redis.call('HSET', turns, emitter, turn)
    end
    local keep = wait + tonumber(keep_ms)
    redis.call('ZADD', seen, now + keep, job)
    for _, key in ipairs({line, seen, turns}) do
      if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
    end
    return {wait, by_slot}
    """
    )
    starts: Key
    running: Key
    line: Key
    seen: Key
    turns: Key
    per_second: int
    in_flight: int
    token: str
    job: str
    emitter: str
    slot_ms: int
    keep_ms: int
    min_wait_ms: int


@dataclass
class Release(Script):
    """Gives a slot back and makes the first jobs in line due now, as many as slots are
    free (`in_flight`: the callback's limit) and, with a rate (`per_second`), as many as
    may start in this second: woken past the rate, each was claimed, refused by `Admit` and
    put back (a callback at 50/s with 1,000 slots: ~780 such round trips a second, 2.2 times
    the scripts; review). The rest wake when `Admit` said their turn comes."""

    TOGETHER = True  # a batch's releases are one call, after its records (`Writer`)

    LUA = (
        REDIS_NOW_MS
        + """
    redis.call('ZREM', running, token)
    if redis.call('EXISTS', line) == 0 then return 0 end
    local now = redis_now_ms()
    local free = tonumber(in_flight) - redis.call('ZCOUNT', running, now, '+inf')
    if tonumber(per_second) > 0 then
      free = math.min(free, tonumber(per_second) - redis.call('ZCOUNT', starts, now - 999, '+inf'))
    end
    if free < 1 then return 0 end
    for _, job in ipairs(redis.call('ZRANGE', line, 0, free - 1)) do
      local due = redis.call('ZSCORE', queue, job)
      if due and tonumber(due) > now then redis.call('ZADD', queue, now, job) end
    end
    return 1
    """
    )
    starts: Key
    running: Key
    line: Key
    queue: Key
    token: str
    in_flight: int
    per_second: int


MIN_WAIT_MS = 50
# A slot outlives the longest its attempt may take, its request's total timeout, by this
# much (its share of the worker is waited for before it is admitted).
SLOT_MARGIN_S = 5.0


class Controls:
    """The limits of one worker process, over its shared reads (`reads`) and its writer."""

    def __init__(
        self, settings: Settings, keys: Keys, reads: Batcher, writer: Writer, shares: Shares
    ) -> None:
        self.reads = reads
        self.writer = writer
        self.keys = keys
        self.shares = shares
        self.queue_name = keys.QUEUE
        self.slot_ms = int((settings.total_timeout + SLOT_MARGIN_S) * 1000)
        self.keep_ms = int((settings.lease_seconds + SLOT_MARGIN_S) * 1000)
        # slot tokens: unique across the fleet (a random prefix per process), cheap to make
        self._prefix = os.urandom(6).hex() + ":"
        self._count = itertools.count()

    async def admitted(
        self,
        job: DeliveryJob,
        target: CallbackTarget,
        then: Then,
        attempt: Callable[[Then, Slot], Awaitable[None]],
        put_off: Callable[[float, str], Awaitable[None]],
        check: Callable[[], Awaitable[None]],
    ) -> None:
        """Run `attempt` once the callback's limits let the delivery start, its slot given
        back with the attempt's write (or after it, if it raised); or `put_off` the
        delivery: back in the queue, due when its turn should come (no attempt). The
        attempt's share of the worker (`shares.py`) comes first, then `check` (its job's
        lease), then the start: the attempt is sent as soon as it is admitted. Admitted
        first, it could wait for its share up to `shares.WAIT_S`, and the starts admitted
        over seconds behind a project's slow requests reached the receiver together (10 in
        a second at `maxPerSecond` 2; review)."""
        host = target.destination.host
        share = await self.shares.admit(job.emitter or job.project_id, host)
        if share is None:  # its project or host holds its share of the worker: later
            await put_off(self.shares.defer_s(host), "share")
            return
        admit = self._admit(job, target)
        try:
            await check()
            answer = await self.reads.together(admit)
        except BaseException:
            share.release(0.0)
            raise
        if answer != 0:
            share.release(0.0)
            wait_ms, by_slot = answer
            await self._wait(job, target, put_off, int(wait_ms) / 1000, bool(by_slot))
            return
        await self._started(target, then, lambda step: attempt(step, share), admit.token)

    def _admit(self, job: DeliveryJob, target: CallbackTarget) -> Admit:
        """The script that admits `job`'s delivery, with a new slot token."""
        options = target.options
        starts, running, line, seen, turns = self.keys.limits(target.id)
        return Admit(
            starts=starts,
            running=running,
            line=line,
            seen=seen,
            turns=turns,
            per_second=options.max_per_second or 0,
            in_flight=options.max_in_flight or 0,
            token=f"{self._prefix}{next(self._count)}",
            job=job.job_id,
            emitter=job.emitter,
            slot_ms=self.slot_ms,
            keep_ms=self.keep_ms,
            min_wait_ms=MIN_WAIT_MS,
        )

    async def _started(
        self, target: CallbackTarget, then: Then, attempt: Callable[[Then], Awaitable[None]],
        slot: str,
    ) -> None:  # fmt: skip
        """Run the admitted `attempt`; its `slot` of `maxInFlight` given back with its write."""
        if target.options.max_in_flight is None:
            await attempt(then)
            return
        releasing = Releasing(self._release_script(target, slot), then)
        try:
            await attempt(releasing)
        except BaseException:  # its write too may have been refused: give it back again
            self.writer.submit(releasing.release.queue_on)  # (a slot given back is gone)
            raise
        if not releasing.released:
            self.writer.submit(releasing.release.queue_on)

    async def _wait(
        self,
        job: DeliveryJob,
        target: CallbackTarget,
        put_off: Callable[[float, str], Awaitable[None]],
        wait: float,
        by_slot: bool,
    ) -> None:
        reason = "in_flight" if by_slot else "rate"
        log.debug(
            "delivery.deferred",
            delivery_id=job.delivery_id,
            callback_id=target.id,
            reason=reason,
            retry_in_s=wait,
        )
        await put_off(wait, reason)

    def _release_script(self, target: CallbackTarget, slot: str) -> Release:
        starts, running, line, _, _ = self.keys.limits(target.id)
        return Release(
            starts=starts,
            running=running,
            line=line,
            queue=self.queue_name,
            token=slot,
            in_flight=target.options.max_in_flight or 0,
            per_second=target.options.max_per_second or 0,
        )


class Releasing(Step):
    """What follows an attempt that holds a slot of its callback's `maxInFlight`: the
    slot given back (`release`), then `then`. When the delivery ends with its record in
    a joint call and `then` only ends its job, the release runs with the batch's others
    (`joint`: before the batch's own commands, so a delivery put in line by the same
    batch is not woken by it, and waits its turn's time) and the record's script ends the
    job (`job_end`); else both are queued in the attempt's write. `released`: one of these
    was taken (the caller gives the slot back when not, or when the attempt raised: a
    `Release` of a slot given back does nothing)."""

    __slots__ = ("_end", "release", "released", "then")

    def __init__(self, release: Release, then: Then) -> None:
        self.release, self.then = release, then
        self.released = False
        self._end: JobEnd | None = None

    def __call__(self, pipe: Pipeline, delay: float | None) -> None:
        self.released = True
        self.release.queue_on(pipe)
        self.then(pipe, delay)

    def joint(self, delay: float | None) -> Script | None:
        then = self.then
        end = then.job_end(delay) if isinstance(then, Step) else None
        if end is None:  # `then` does more than end the job: both go in the write
            return None
        self._end, self.released = end, True
        return self.release

    def job_end(self, delay: float | None) -> JobEnd | None:
        """`then`'s job end, once `joint` took the release (the engine asks it first)."""
        return self._end
