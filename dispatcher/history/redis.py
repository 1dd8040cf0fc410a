"""The Redis history backend (the default): one record per delivery attempt, queried by
(project, url, event) and time window, newest first, page by page; old records swept in
small batches. Bounded by Redis' memory (~1.5-9 KB per record).

Layout (see keys.py): each record is a JSON string with a TTL backstop; one sorted set per
(project, event, url) indexes record ids by createdTime, so the seed's query is a range
read (ZCOUNT + ZREVRANGEBYSCORE + MGET in one script), never a scan. Each index also holds
a mark, the member `~` scored +inf, so that the write that creates it knows (see
`redis_record.Record`); no read by time range sees it. A URL's attempts of every event
are indexed by status too, and a project's failed attempts of every URL (its console's
"Failures, last hour"). The sweep is `redis_upkeep`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher import clock, keys
from dispatcher.errors import NotFound
from dispatcher.history.ids import RecordIds
from dispatcher.history.kept import with_bodies
from dispatcher.history.redis_dead import dead_letters
from dispatcher.history.redis_failures import final_failures
from dispatcher.history.redis_page import WINDOW_RANKS
from dispatcher.history.redis_record import Record, record_script
from dispatcher.history.redis_upkeep import sweep
from dispatcher.history.window import (
    MAX_ATTEMPTS_SHOWN,
    Cursor,
    Recent,
    check_page,
    parse_record,
    parse_records,
    unknown_record,
)
from dispatcher.lua import Key, Script, run_pipeline
from dispatcher.models import DeliveryStatus, HistoryPage, HistoryRecord

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord
    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = ["RedisHistory"]

# Records outlive the retention by this much, so the sweep (not the TTL) decides, and a
# stopped sweep still cannot let the records grow without bound (an index the sweep has
# kept is given the same time to live: `redis_upkeep.Sweep`).
_TTL_MARGIN_S = 86_400


@dataclass
class Page(Script):
    """One page of an `index` between `min_ms` and `max_ms`, newest first: {how many in
    the window, the records}, `count` from `offset` (`redis_page.WINDOW_RANKS`). The
    records' ids are found here, so their keys are made here too (`record_prefix`)."""

    LUA = (
        WINDOW_RANKS
        + """
    local ids = {}
    if first <= last then ids = redis.call('ZREVRANGE', index, first, last) end
    local recs = {}
    if #ids > 0 then
      local ks = {}
      for i, m in ipairs(ids) do ks[i] = record_prefix .. string.match(m, '^0*(%d+)$') end
      recs = redis.call('MGET', unpack(ks))
    end
    return {total, recs}
    """
    )
    index: Key
    min_ms: int
    max_ms: int
    offset: int
    count: int
    record_prefix: str


@dataclass
class Newest(Script):
    """The newest `count` members of an index by time (a URL's of one status, or the
    project's failures) in [`oldest_ms`, `newest_ms`], after those at `newest_ms` from the
    `excluded` one up (a cursor: its record and those before it were shown; '' for
    none), with their scores."""

    LUA = """
    local skip = 0
    if excluded ~= '' then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, newest_ms, newest_ms)) do
        if m >= excluded then skip = skip + 1 end
      end
    end
    return redis.call('ZREVRANGEBYSCORE', index, newest_ms, oldest_ms, 'WITHSCORES',
                      'LIMIT', skip, count)
    """
    index: Key
    newest_ms: int
    excluded: str
    oldest_ms: int
    count: int


@dataclass
class Latest(Script):
    """The latest `limit` records of a delivery's attempts `ids` (a string of ids, see
    `Record`; or a zset of them by time, written before that layout), newest first (the
    last written first). Record keys are made from the ids read (`record_prefix`).
    Of a string, only its end is read: `limit` ids of up to 20 digits and their spaces
    (a string written before it was bounded may be long); the first id read is left out
    when it may be cut (the read is full and starts inside an id)."""

    LUA = """
    local found = {}
    local span = tonumber(limit) * 21
    local written = redis.pcall('GETRANGE', ids, -span, -1)
    if type(written) == 'string' then
      local all = {}
      for id in string.gmatch(written, '%d+') do all[#all + 1] = id end
      if #written == span and string.sub(written, 1, 1) ~= ' ' then table.remove(all, 1) end
      for i = #all, math.max(1, #all - tonumber(limit) + 1), -1 do found[#found + 1] = all[i] end
    elseif type(written) == 'table' then
      found = redis.call('ZREVRANGE', ids, 0, tonumber(limit) - 1)
    end
    if #found == 0 then return {} end
    local ks = {}
    for i, id in ipairs(found) do ks[i] = record_prefix .. id end
    return redis.call('MGET', unpack(ks))
    """
    ids: Key
    limit: int
    record_prefix: str


class RedisHistory:
    """Attempt records in Redis."""

    sweep_unit = "records"

    def __init__(self, redis: Redis, settings: Settings, keys: Keys, id_floor: int = 0) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys
        self._ids = RecordIds(redis, keys, id_floor)
        self._ttl_s = settings.retention_ms // 1000 + _TTL_MARGIN_S  # a record's

    async def assign_ids(self, records: Iterable[AttemptRecord]) -> None:
        """Give each record without an `id` a new one (see `RecordIds`)."""
        await self._ids.assign(records)

    async def backlog(self) -> tuple[int, float]:
        """Records written but not yet queryable, and the oldest one's age: none here."""
        return 0, 0.0

    async def close(self) -> None:
        """Nothing of its own to close (the Redis pool is the caller's)."""

    def recording(
        self, record: AttemptRecord, *, dead: bool = False, ending: Ending | None = None
    ) -> Record:
        """The script that writes one record (id assigned, the seed's fields, camelCase)
        with its indexes, and what its attempt ends with (`ending`); writing it twice
        stores it once."""
        return record_script(self.keys, record, self._ttl_s, dead, ending)

    def record(
        self,
        pipe: Pipeline,
        record: AttemptRecord,
        *,
        dead: bool = False,
        ending: Ending | None = None,
    ) -> None:
        """Queue `recording` on `pipe` (the caller executes it with its other writes, one
        round trip)."""
        self.recording(record, dead=dead, ending=ending).queue_on(pipe)

    async def add(self, record: AttemptRecord, *, dead: bool = False) -> int:
        """Write one record now; returns its id."""
        await self.assign_ids([record])
        await run_pipeline(self.redis, lambda pipe: self.record(pipe, record, dead=dead))
        return int(record["id"])

    async def query(
        self,
        project_id: str,
        url: str,
        event: str,
        *,
        start_ms: int,
        end_ms: int,
        page: int = 1,
        page_size: int = 20,
        now_ms: int | None = None,
    ) -> HistoryPage:
        """One page of the window, newest first. Records past the retention are not shown,
        even before the sweep has removed them, so `count` stays exact."""
        page_size = check_page(page, page_size, self.settings.history_max_page_size)
        start_ms = max(start_ms, self._cutoff(now_ms))
        if start_ms > end_ms:
            return HistoryPage(records=[], count=0, total_pages=0, page_size=page_size, page=page)
        index = self.keys.history_index(project_id, event, url)
        offset, prefix = (page - 1) * page_size, self.keys.HISTORY_RECORD_PREFIX
        total, raws = await Page(index, start_ms, end_ms, offset, page_size, prefix).run(self.redis)
        records = parse_records(await with_bodies(self.redis, self.keys, raws))
        return HistoryPage(
            records=records,
            count=int(total),
            total_pages=math.ceil(int(total) / page_size),
            page_size=page_size,
            page=page,
        )

    def _cutoff(self, now_ms: int | None = None) -> int:
        """The oldest time a read shows: what is past the retention is hidden at once, even
        before the sweep removes it (its key lives a day longer)."""
        return (clock.now_ms() if now_ms is None else now_ms) - self.settings.retention_ms

    async def get(self, record_id: int, project_id: str | None = None) -> HistoryRecord:
        key = self.keys.history_record(record_id)
        [raw] = await with_bodies(self.redis, self.keys, [await self.redis.get(key)])
        record = None if raw is None else parse_record(raw)
        if (
            record is None
            or project_id not in (None, record.project_id)
            or record.created_time < self._cutoff()
        ):
            raise NotFound(unknown_record(record_id, project_id))
        return record

    async def dead(self, project_id: str | None = None, limit: int = 50) -> list[HistoryRecord]:
        """The latest deliveries that gave up (the dead-letter view), of one project or of
        all, newest first, within the retention: one entry a delivery, its newest attempt,
        none redelivered since (`redis_dead`: two round trips, more when entries it looked
        at were left out)."""
        key = self.keys.HISTORY_DEAD if project_id is None else self.keys.history_dead(project_id)
        raws = await dead_letters(self.redis, self.keys, key, self._cutoff(), limit)
        return parse_records(await with_bodies(self.redis, self.keys, raws))

    async def attempts(
        self,
        delivery_id: str,
        project_id: str,
        *,
        now_ms: int | None = None,
        limit: int = MAX_ATTEMPTS_SHOWN,
    ) -> list[HistoryRecord]:
        """The attempts of one delivery still within the retention (its retries and
        redeliveries), newest first, in one round trip."""
        found = await self._latest(self.keys.history_attempts(delivery_id), limit)
        cutoff = self._cutoff(now_ms)
        found.sort(key=lambda r: (r.created_time, r.id), reverse=True)
        return [r for r in found if r.project_id == project_id and r.created_time >= cutoff]

    async def _latest(self, key: str, limit: int) -> list[HistoryRecord]:
        raws = await Latest(key, limit, self.keys.HISTORY_RECORD_PREFIX).run(self.redis)
        return parse_records(await with_bodies(self.redis, self.keys, raws))

    async def recent(
        self,
        project_id: str,
        urls: Sequence[str],
        *,
        start_ms: int,
        end_ms: int,
        status: DeliveryStatus | None = None,
        before: Cursor | None = None,
        limit: int = 50,
        now_ms: int | None = None,
    ) -> Recent:
        """The newest attempts to any of `urls` (one index per URL and status)."""
        failed = [False, True] if status is None else [status is DeliveryStatus.FAILED]
        indexes = [self.keys.history_url_index(project_id, url, f) for url in urls for f in failed]
        return await self._newest(indexes, start_ms, end_ms, before, limit, now_ms)

    async def failures(
        self,
        project_id: str,
        *,
        start_ms: int,
        end_ms: int,
        before: Cursor | None = None,
        limit: int = 50,
        now_ms: int | None = None,
    ) -> Recent:
        """The project's newest failed attempts, every URL and event: one index."""
        index = self.keys.history_failed(project_id)
        return await self._newest([index], start_ms, end_ms, before, limit, now_ms)

    async def _newest(
        self,
        indexes: list[str],
        start_ms: int,
        end_ms: int,
        before: Cursor | None,
        limit: int,
        now_ms: int | None,
    ) -> Recent:
        """The newest `limit` + 1 of each index in the window, older than `before`, in one
        round trip, merged, and the records of the first `limit` in a second one; a next
        page when there were more entries (a record gone before its entry, evicted from a
        full Redis, leaves its page short, not the listing cut)."""
        start_ms = max(start_ms, self._cutoff(now_ms))
        newest, excluded = end_ms, ""
        if before is not None and before.created_ms <= end_ms:
            newest, excluded = before.created_ms, keys.history_member(before.id)
        if start_ms > newest or not indexes:
            return Recent([], None)

        def newest_of_each(pipe: Pipeline) -> None:
            for index in indexes:
                Newest(index, newest, excluded, start_ms, limit + 1).queue_on(pipe)

        found: list[tuple[int, int]] = []  # (ms, id) of each index's newest
        for reply in await run_pipeline(self.redis, newest_of_each):
            found += (
                (int(float(ms)), int(m)) for m, ms in zip(reply[::2], reply[1::2], strict=True)
            )
        found.sort(reverse=True)
        shown = found[:limit]  # the next page starts after the last of these, record or not
        keys_of = [self.keys.history_record(record_id) for _, record_id in shown]
        raws = await self.redis.mget(keys_of) if keys_of else []
        records = parse_records(await with_bodies(self.redis, self.keys, raws))
        return Recent(records, Cursor(*shown[-1]) if len(found) > limit and shown else None)

    async def final_failures(
        self, project_id: str, url: str, event: str, *, start_ms: int, end_ms: int
    ) -> AsyncIterator[HistoryRecord]:
        """Every attempt of the window after which its delivery gave up, newest first;
        read by id, no other record read (`redis_failures`)."""
        start_ms = max(start_ms, self._cutoff(None))
        if start_ms > end_ms:
            return
        window = (project_id, url, event, start_ms, end_ms)
        found = final_failures(self.redis, self.keys, parse_records, window)
        async for record in found:
            yield record

    async def sweep(
        self,
        *,
        now_ms: int | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Remove records older than the retention, `sweep_batch` a Redis call, until done
        or a bound is reached (`redis_upkeep.sweep`: a bounded run goes on where the last
        one stopped); returns how many were removed."""
        return await sweep(
            self.redis, self.keys, self._cutoff(now_ms), self.settings.sweep_batch,
            keep_s=self._ttl_s, max_batches=max_batches, max_seconds=max_seconds,
            on_batch=on_batch,
        )  # fmt: skip
