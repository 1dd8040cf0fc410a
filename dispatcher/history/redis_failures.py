"""The Redis store's walk of a window's final failures (`RedisHistory.final_failures`,
what a window's redelivery sends again): the window's index read by rank, `PAGE` ids a
call, each id kept when it is among its project's dead letters (the attempts after which
a delivery gave up: final and failed), and only those records read, `RECORDS` a round
trip (at most ~1 MiB of 64 KiB bodies), as the walk goes. No body of another record is
read: the walk read every record of the window with its body, 100 at a time, successes
too, and threw them away (6,000 records of 60 KB for one failure: 2.9 s, MGETs of 6 MB
that held other clients' commands up to 41 ms; review)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.history.kept import with_bodies
from dispatcher.history.redis_page import WINDOW_RANKS
from dispatcher.lua import Key, Script
from dispatcher.models import DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable

    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.models import HistoryRecord

    Parse = Callable[[Iterable[bytes | None]], list[HistoryRecord]]

__all__ = ["PAGE", "RECORDS", "final_failures"]

PAGE = 1_000  # index entries looked at a call
RECORDS = 16  # records read a round trip


@dataclass
class DeadOfPage(Script):
    """One page of an `index` between `min_ms` and `max_ms`, newest first, by rank (as
    `redis_page.WINDOW_RANKS`): {how many in the window, the ids of its records among
    `dead`}."""

    LUA = (
        WINDOW_RANKS
        + """
    local found = {}
    if first <= last then
      for _, m in ipairs(redis.call('ZREVRANGE', index, first, last)) do
        local id = string.match(m, '^0*(%d+)$')
        if id and redis.call('ZSCORE', dead, id) then found[#found + 1] = id end
      end
    end
    return {total, found}
    """
    )
    index: Key
    dead: Key
    min_ms: int
    max_ms: int
    offset: int
    count: int


async def final_failures(
    redis: Redis, keys: Keys, parse: Parse, window: tuple[str, str, str, int, int]
) -> AsyncIterator[HistoryRecord]:
    """The records of a `window` (project, url, event, first and last ms) after which a
    delivery gave up, newest first (`parse`: stored records to records)."""
    project_id, url, event, start_ms, end_ms = window
    index, dead = keys.history_index(project_id, event, url), keys.history_dead(project_id)
    offset = 0
    while True:
        total, ids = await DeadOfPage(index, dead, start_ms, end_ms, offset, PAGE).run(redis)
        for at in range(0, len(ids), RECORDS):
            chunk = [keys.history_record(i.decode()) for i in ids[at : at + RECORDS]]
            raws = await redis.mget(chunk)
            for record in parse(await with_bodies(redis, keys, raws)):
                if record.final and record.status is DeliveryStatus.FAILED:
                    yield record
        offset += PAGE
        if offset >= int(total):
            return
