"""Which shard a project lives on: rendezvous hashing, and explicit placements.

Rendezvous (highest random weight) hashing: each shard n scores a project by a hash of
(n, project id), and the highest score wins. Adding shard n moves exactly the projects it
now wins, about 1/(n+1) of them, and never one between two old shards. The placement
does not depend on the URLs, only on the shards' positions: the list only grows at its
end.

The hash runs over the shards *in use*, the first `:count` of the list (1 until
`dispatcher shards grow` says more): a shard added to the list takes no project until
then, so that adding one never sends a project's events where its callbacks are not.

An explicit placement (`dispatcher shards move` writes them) overrides the hash for one
project: `"<n>"` (the project is on shard n) or `"<from>><to>"` (it is moving: still on
`from`, its callbacks and roles frozen; see `move.py`). They live in one hash on the home
shard (shard 0), with `:count` and, while `grow` runs, `:growing` (the count to come: the
projects it would move are frozen until they are pinned); project ids hold no `:`. Every
process reads the hash at start and checks its version every
`DISPATCHER_PLACEMENT_REFRESH` seconds (one GET), reading it again only when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import RedisError

from dispatcher.connections import REDIS_ERRORS, waited_out
from dispatcher.errors import InvalidSetting, Unplaced
from dispatcher.lua import Key, Script
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = ["Placed", "Placement", "kept_fresh", "rendezvous"]

log = structlog.get_logger("dispatcher.shards")

MOVING = ">"
COUNT = ":count"  # how many shards the hash runs over
GROWING = ":growing"  # the count `dispatcher shards grow` is moving to
# What a refresh waits a turn out: an outage, or any reply error
UNREAD_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, RedisError)
UNREAD = (
    "shard 0 has not answered: it says which shard holds each project, so none can be "
    "placed (check the first URL of DISPATCHER_REDIS_SHARDS)"
)


def _score(index: int, project_id: str) -> bytes:
    return hashlib.blake2b(f"{index}/{project_id}".encode(), digest_size=8).digest()


def rendezvous(project_id: str, count: int) -> int:
    """The shard of `project_id` among `count` shards by the hash alone."""
    if count == 1:
        return 0
    return max(range(count), key=lambda index: _score(index, project_id))


@dataclass(frozen=True, slots=True)
class Placed:
    """An explicit placement: on shard `index`; `moving_to` when a move is under way."""

    index: int
    moving_to: int | None = None

    @classmethod
    def parse(cls, value: str) -> Placed:
        source, _, target = value.partition(MOVING)
        return cls(int(source), int(target) if target else None)

    def __str__(self) -> str:
        return (
            f"{self.index}" if self.moving_to is None else f"{self.index}{MOVING}{self.moving_to}"
        )


class Placement:
    """The placement of every project over `count` shards, its explicit part read from the
    home shard (`redis`, `keys`) and kept fresh by `run()`."""

    def __init__(self, count: int, redis: Redis | None = None, keys: Keys | None = None) -> None:
        self.count = count  # the shards listed
        self.redis = redis
        self.keys = keys
        self.active = 1 if count > 1 else count  # the shards the hash runs over
        self.growing: int | None = None
        self.explicit: dict[str, Placed] = {}
        self.version: bytes | None = None
        self.short: str | None = None  # why this process may not place projects (`load`)

    def shard_of(self, project_id: str) -> int:
        """The shard that holds `project_id` now; Unavailable while the home shard says
        more shards are in use than this process was given (`load`), or, with more than
        one shard, has not been read from yet (`kept_fresh` without a wait: it would hash
        projects over the wrong shards), or when the project was moved to a shard past
        this process's list. (One made without a home shard, `redis` None, is what it is
        given.)"""
        self.usable()
        if self.count > 1 and self.redis is not None and self.version is None:
            raise Unplaced(UNREAD)
        placed = self.explicit.get(project_id)
        if placed is None:
            return rendezvous(project_id, min(self.active, self.count))
        if placed.index >= self.count:  # it was hashed: its events went where nothing read
            raise Unplaced(
                f"project {project_id!r} was moved to shard {placed.index}, and this process "
                f"was given {self.count} shard(s): give it the whole DISPATCHER_REDIS_SHARDS"
            )
        return placed.index

    def usable(self) -> None:
        """Unavailable while the home shard says more shards are in use than this process
        was given (`load`): it would place projects on the wrong shard."""
        if self.short is not None:
            raise Unplaced(self.short)

    def moving(self, project_id: str) -> bool:
        """Whether `project_id`'s callbacks and roles are frozen: a move of it is under way,
        or `grow` may move it and has not pinned it yet."""
        placed = self.explicit.get(project_id)
        if placed is not None:
            return placed.moving_to is not None
        return self.growing is not None and rendezvous(project_id, self.active) != rendezvous(
            project_id, self.growing
        )

    async def load(self) -> bool:
        """Read the explicit placements when their version changed; True when it did.
        InvalidSetting when the home shard says more shards are in use than this process
        was given (with one URL too): it would hash the projects over the shards it knows,
        and queue, read and change them on the wrong one; `shard_of` refuses from then on."""
        if self.redis is None or self.keys is None:
            return False
        # (none written yet, the version is b"0": unchanged, not re-read every turn; review)
        version = await self.redis.get(self.keys.PLACEMENT_VERSION) or b"0"
        if version == self.version:
            return False
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.keys.PLACEMENT)  # type: ignore[misc]
        found = {k.decode(): v.decode() for k, v in raw.items()}
        self.active = int(found.pop(COUNT, "1"))
        growing = found.pop(GROWING, None)
        self.growing = None if growing is None else int(growing)
        self.explicit = {project: Placed.parse(value) for project, value in found.items()}
        self.version = version
        if self.active > self.count:
            self.short = (
                f"the home shard says {self.active} shards are in use, and this process was "
                f"given {self.count}: list every one of them, in order, in "
                "DISPATCHER_REDIS_SHARDS (or DISPATCHER_REDIS_CLUSTER_SHARDS)"
            )
            raise InvalidSetting(self.short, param="DISPATCHER_REDIS_SHARDS")
        return True

    async def run(self, every_s: float) -> None:
        """Keep the explicit placements fresh, for ever (a failed read waits a turn; an
        outage is logged as it begins and ends, not at each turn: review). A reply error
        (BUSY: a script past its time limit) ended it for good, silently: the process never
        saw a move or a grow again (review)."""
        failing = False
        while True:
            await asyncio.sleep(every_s)
            try:
                if await self.load():
                    log.info("shards.placement_loaded", explicit=len(self.explicit))
                if failing:
                    log.info("shards.placement_read_again")
                failing = False
            except InvalidSetting as exc:
                log.error("shards.too_few_shards", error=exc.message)
            except UNREAD_ERRORS as exc:  # an outage, or a reply (BUSY, NOPERM): next turn
                if not failing:
                    log.warning("shards.placement_unread", error=str(exc))
                failing = True

    async def write(
        self, project_id: str, placed: Placed | None, *, lease: tuple[str, str] | None = None
    ) -> bool:
        """Set (or, with None, remove) the explicit placement of `project_id`, and bump the
        version so that every process reads it at its next check. With a `lease` (its key
        and token), only while that key holds that token (a mover's: `shards.lease`), in
        the same script; returns whether it was written."""
        value = "" if placed is None else str(placed)
        if lease is None:
            await self._write({project_id: value or None})
        else:
            assert self.redis is not None and self.keys is not None
            k = self.keys
            written = await LeasedWrite(
                k.PLACEMENT, k.PLACEMENT_VERSION, lease[0], project_id, value, lease[1]
            ).run(self.redis)
            if not written:
                return False
        if placed is None:
            self.explicit.pop(project_id, None)
        else:
            self.explicit[project_id] = placed
        return True

    async def write_counts(self, active: int, growing: int | None) -> None:
        """Set the shards in use and (None: none) the count `grow` is moving to."""
        await self._write({COUNT: str(active), GROWING: None if growing is None else str(growing)})
        self.active, self.growing = active, growing

    async def _write(self, fields: dict[str, str | None]) -> None:
        assert self.redis is not None and self.keys is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, value in fields.items():
                if value is None:
                    pipe.hdel(self.keys.PLACEMENT, name)
                else:
                    pipe.hset(self.keys.PLACEMENT, name, value)
            pipe.incr(self.keys.PLACEMENT_VERSION)
            await pipe.execute()


@dataclass
class LeasedWrite(Script):
    """`Placement.write` under a lease: while `lease` holds `token`, sets the `project`'s
    field of the `placement` to `value` (removes it: empty) and bumps the `version`;
    returns 1, else 0."""

    LUA = """
    if redis.call('GET', lease) ~= token then return 0 end
    if value == '' then
      redis.call('HDEL', placement, project)
    else
      redis.call('HSET', placement, project, value)
    end
    redis.call('INCR', version)
    return 1
    """
    placement: Key
    version: Key
    lease: Key
    project: str
    value: str
    token: str


@contextlib.asynccontextmanager
async def kept_fresh(
    placement: Placement, every_s: float, wait_s: float | None = None, *, unread_ok: bool = False
) -> AsyncIterator[Placement]:
    """`placement` loaded (a home shard that does not answer is waited for: routing by the
    hash alone could send a moved project's events where its callbacks are not), then
    refreshed in the background until the block ends. With one shard, the count alone is
    read (`load`: InvalidSetting when more are in use), without waiting: a home shard that
    does not answer is read in the background until it does, and then as with more (a
    count that outgrows the one URL: `shard_of` refuses; it was read only at the start,
    review). `wait_s` bounds the wait (None: until the home shard answers): past it,
    Unavailable, or with `unread_ok` the block runs with the placement unread, placing no
    project (a view of every shard needs it only for a project's part)."""
    unread = False
    if placement.count > 1:
        try:
            async with asyncio.timeout(wait_s):
                await _loaded(placement)
        except TimeoutError:
            if not unread_ok:
                raise Unplaced(f"{UNREAD} (waited {wait_s:g} s)") from None
            unread = True  # (not read after: a view's short run, which would log its tries)
    task = None
    if placement.count == 1:  # no placement to wait for: the count is checked now
        try:
            await placement.load()
        except UNREAD_ERRORS as exc:  # (read in the background: an outage, BUSY, ...)
            if not waited_out(exc):  # an outage, BUSY, LOADING: not NOPERM (the ACL)
                raise
    if placement.redis is not None and not unread:  # one URL too: the count may grow (`load`)
        task = asyncio.create_task(placement.run(every_s))
    try:
        yield placement
    finally:
        if task is not None:
            await cancel_all([task])


async def _loaded(placement: Placement) -> None:
    """`placement` loaded, however long the home shard takes to answer."""
    delay = 0.1
    while True:
        try:
            await placement.load()
            return
        except UNREAD_ERRORS as exc:
            if not waited_out(exc):
                raise
            log.warning("shards.placement_unread", error=str(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
