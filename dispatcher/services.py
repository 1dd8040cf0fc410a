"""One object per process that holds every store, built once from `Settings`.

The API, the CLI and the worker are front ends over it: each rule that is more than a
store call (the address policy at registration, a checked event name and time window for
history, who disabled a callback and why, what redelivery may send) is written here once,
so every front end gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING

import structlog

from dispatcher.auth import Roles
from dispatcher.batch import Batcher
from dispatcher.clock import now_ms
from dispatcher.connections import REDIS_ERRORS, connect
from dispatcher.egress import policy_for
from dispatcher.errors import CallbackGone, InvalidInput
from dispatcher.health import Health
from dispatcher.history import Cursor, Recent, open_history, parse_window
from dispatcher.lookups import owned
from dispatcher.models import DeliveryStatus, Region, parse_event, parse_status
from dispatcher.producer import Producer
from dispatcher.queue import Queue
from dispatcher.redelivery import redeliver_window
from dispatcher.registry import validate_url
from dispatcher.registry.confirmed import ConfirmedRegistry
from dispatcher.registry.rules import checked_reason
from dispatcher.shard import Shard
from dispatcher.status import read_status

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from redis.asyncio import Redis

    from dispatcher.headers import AuthHeader
    from dispatcher.models import (
        Callback,
        CallbackPage,
        CreateCallBackResult,
        Event,
        HistoryPage,
        HistoryRecord,
        RedeliveryResult,
    )
    from dispatcher.redelivery import Check, Pace
    from dispatcher.registry import Registration
    from dispatcher.settings import Settings
    from dispatcher.status import Status

__all__ = ["DEFAULT_OVERLAP_HOURS", "MAX_OVERLAP_HOURS", "Services"]

log = structlog.get_logger("dispatcher.services")

DEFAULT_OVERLAP_HOURS = 24.0  # Svix's: the old secret stays valid for a day
MAX_OVERLAP_HOURS = 168.0
# how far back "Recent deliveries" looks: the last hour, day, or the whole retention
RECENT_WITHIN = {"1h": 3_600_000, "1d": 86_400_000, "all": None}
# URLs of a project's callbacks a project-wide listing reads: each costs two index reads;
# found among its first callbacks (many callbacks can share one URL)
RECENT_URLS_MAX = 100
RECENT_CALLBACKS_READ = 1_000


class Services:
    """The registry, history, endpoint health, queue, roles and producer of one process,
    on one Redis pool, and the operations the front ends share."""

    def __init__(self, settings: Settings, redis: Redis, shard: Shard | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.shard = shard = shard or Shard.single(settings.queue_name)
        self.keys = keys = shard.keys
        floor = shard.id_floor
        # its acknowledged changes confirmed by DISPATCHER_REDIS_MIN_REPLICAS replicas
        self.registry = ConfirmedRegistry.of(settings, redis, keys, floor)
        self.history = open_history(settings, redis, keys, floor)
        self.health = Health(redis, self.registry, settings)
        self.queue = Queue(redis, keys)
        # group commit of the API's small round trips (role checks, single emits)
        self.batcher = Batcher(redis, window=0)
        self.roles = Roles(redis, settings, keys, self.batcher)
        # emits that wait for replicas share their pipelines only with one another
        shared = None if settings.redis_min_replicas else self.batcher
        self.producer = Producer(settings, redis, batcher=shared, shard=shard)
        self.policies = {region: policy_for(settings, region) for region in Region}
        # each project's every-URL listing (`recent`): one at a time, gone when none runs
        self._listing: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._redelivering: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )  # each project's window redeliveries (`redeliver_failed`): one at a time

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, redis: Redis | None = None) -> AsyncIterator[Services]:
        """Services on `redis` (left open), or on a pool of their own (closed at the end)."""
        pool = connect(settings) if redis is None else redis
        services = cls(settings, pool)
        try:
            yield services
        finally:
            await services.close()
            if redis is None:
                await pool.aclose()

    async def close(self) -> None:
        """Release what the services opened besides the Redis pool (the history's own)."""
        await self.history.close()

    # ---- callbacks ---------------------------------------------------------------------

    async def check_target(self, url: str, region: Region, owner: str = "") -> str:
        """The URL, trimmed, once the region's address policy allows it (DNS included: the
        lookup counts as `owner`'s, `dispatcher.lookups`)."""
        url = validate_url(url)
        with owned(owner):
            await self.policies[region].check_resolved(url)
        return url

    @staticmethod
    def auth_header(name: str | None, value: str | None) -> AuthHeader | None:
        """A custom auth header from its two parameters: none, or both (checked when
        registered)."""
        if name is None and value is None:
            return None
        return name or "", value or ""

    async def register(self, registration: Registration, event: Event | str) -> int:
        """Register (or update and re-enable) one callback of a project, of one of its
        pipelines, or of the platform (`DEVOPS_ALL_PROJECT`), with its receiver controls;
        returns its id."""
        checked = registration.to(
            await self.check_target(registration.url, registration.region, registration.project_id)
        )
        callback_id, _ = await self.registry.register(checked, event)
        return callback_id

    async def register_batch(self, registration: Registration, events: str) -> CreateCallBackResult:
        """One URL for a comma-separated list of events; unknown names are reported."""
        checked = registration.to(
            await self.check_target(registration.url, registration.region, registration.project_id)
        )
        return await self.registry.register_batch(checked, events)

    async def rotate_secret(
        self,
        callback_id: int,
        project_id: str,
        secret_token: str,
        overlap_hours: float = DEFAULT_OVERLAP_HOURS,
        *,
        pipeline_id: str | None = None,
    ) -> Callback:
        """Give a callback a new secret token; the old one keeps signing beside it for
        `overlap_hours` (0 to 168), so receivers can switch without losing a delivery.
        Returns the callback, its rotation's end shown."""
        if not 0 <= overlap_hours <= MAX_OVERLAP_HOURS:
            raise InvalidInput(
                f"overlapHours must be from 0 to {MAX_OVERLAP_HOURS}", param="overlapHours"
            )
        await self.registry.rotate_secret(
            callback_id, project_id, secret_token, overlap_hours * 3600, pipeline_id=pipeline_id
        )
        return await self.registry.get(callback_id, project_id, pipeline_id)

    async def callbacks(
        self,
        project_id: str,
        page: int = 1,
        page_size: int = 20,
        *,
        pipeline_id: str | None = None,
    ) -> CallbackPage:
        """A project's callbacks (its pipelines' included), or one pipeline's, oldest first;
        `page_size` capped like history's."""
        size = min(page_size, self.settings.history_max_page_size)
        return await self.registry.list(project_id, page, size, pipeline_id=pipeline_id)

    async def callback(
        self, callback_id: int, project_id: str, *, pipeline_id: str | None = None
    ) -> Callback:
        """One of the project's (or pipeline's) callbacks."""
        return await self.registry.get(callback_id, project_id, pipeline_id)

    async def delete(
        self, callback_id: int, project_id: str, *, pipeline_id: str | None = None
    ) -> None:
        """Delete one of the project's callbacks (of that pipeline, when one is named)."""
        await self.registry.delete(project_id, callback_id, pipeline_id=pipeline_id)

    async def failures(self, callback_ids: Sequence[int]) -> dict[int, int]:
        """Consecutive final failures of those of the callbacks that have some."""
        return await self.health.failures(callback_ids)

    async def disable(
        self, callback_id: int, *, by: str, reason: str | None = None, project_id: str | None = None
    ) -> None:
        """Disable a callback; the reason shown in the list says who did it when none is given
        (one with control characters is refused)."""
        await self.registry.set_enabled(
            callback_id, False, checked_reason(reason) or f"disabled by {by}", project_id=project_id
        )

    async def enable(self, callback_id: int, *, project_id: str | None = None) -> None:
        """Enable a callback (also one the service disabled); its failure count starts again."""
        await self.registry.set_enabled(callback_id, True, project_id=project_id)

    # ---- history -----------------------------------------------------------------------

    async def history_page(
        self,
        project_id: str,
        url: str,
        event: str,
        start_time: str | None = None,
        end_time: str | None = None,
        page: int = 1,
        page_size: int = 20,
    ) -> HistoryPage:
        """The seed's query: a known event, a window in the configured time zone."""
        name, start_ms, end_ms = self._window(event, start_time, end_time)
        return await self.history.query(
            project_id,
            searched(url),
            name,
            start_ms=start_ms,
            end_ms=end_ms,
            page=page,
            page_size=page_size,
        )

    def _window(
        self, event: str, start_time: str | None, end_time: str | None
    ) -> tuple[str, int, int]:
        """A checked event name and the window in epoch ms (the history route's rules)."""
        start_ms, end_ms = parse_window(start_time, end_time, self.settings.tz)
        return parse_event(event).value, start_ms, end_ms

    async def get_record(self, record_id: int, project_id: str) -> HistoryRecord:
        """One history record of the project."""
        return await self.history.get(record_id, project_id)

    async def attempts(self, record: HistoryRecord) -> list[HistoryRecord]:
        """Every attempt of the record's delivery (retries, redeliveries), newest first;
        just the record when it names no delivery."""
        if record.delivery_id is None:
            return [record]
        return await self.history.attempts(record.delivery_id, record.project_id)

    async def redeliver(self, record_id: int, project_id: str | None = None) -> str:
        """Send one recorded request again; returns the job id. Refused when its callback
        is disabled (until it is enabled) or deleted (for good: a URL registered again is a
        new callback, which the old records do not name): the worker would drop it unsent
        (as the window's leaves such records out)."""
        record = await self.history.get(record_id, project_id)
        callback_id = record.callback_id
        if callback_id is not None and await self.registry.target(callback_id) is None:
            whose = f"callback {callback_id} of history record {record_id}"
            if await self.redis.exists(self.keys.callback(callback_id)):
                raise CallbackGone(f"{whose} is disabled: enable it, then redeliver")
            raise CallbackGone(
                f"{whose} is deleted: its records cannot be redelivered (a URL registered "
                "again is a new callback, with a new id, which they do not name)"
            )
        return await self.producer.redeliver(record)

    async def redeliver_failed(
        self,
        project_id: str,
        url: str,
        event: str,
        start_time: str | None = None,
        end_time: str | None = None,
        *,
        on_queued: Callable[[int], None] | None = None,
        check: Check | None = None,
        pace: Pace | None = None,
    ) -> RedeliveryResult:
        """Send again every delivery of a window that finally failed, once
        (`dispatcher.redelivery`); returns what was queued and what was left out."""
        name, start_ms, end_ms = self._window(event, start_time, end_time)
        failures = self.history.final_failures(
            project_id, searched(url), name, start_ms=start_ms, end_ms=end_ms
        )
        # each reads its window's every record: one of a project's at a time here
        async with self._redelivering.setdefault(project_id, asyncio.Lock()):
            return await redeliver_window(
                self.history,
                self.registry,
                self.producer,
                project_id,
                failures,
                on_queued=on_queued,
                check=check,
                pace=pace,
            )

    async def recent(
        self,
        project_id: str,
        *,
        url: str | None = None,
        status: str | None = None,
        within: str = "all",
        before: str | None = None,
        limit: int = 50,
    ) -> Recent:
        """The newest attempts of one callback URL across its events (its "Recent
        deliveries"), or of every URL of the project: those of the first
        `RECENT_URLS_MAX` URLs of its callbacks, and its failures of any URL (one index);
        of one status (`SUCCESS`, `FAILED`) when given, within the last hour (`1h`), day
        (`1d`) or the retention (`all`), older than the cursor `before`."""
        if within not in RECENT_WITHIN:
            raise InvalidInput(f"within must be one of {', '.join(RECENT_WITHIN)}", param="within")
        wanted = parse_status(status) if status else None
        cursor = Cursor.parse(before) if before else None
        now, span = now_ms(), RECENT_WITHIN[within]
        window = {"start_ms": 0 if span is None else now - span, "end_ms": now}
        if url is not None:
            return await self.history.recent(
                project_id, [searched(url)], status=wanted, before=cursor, limit=limit, **window
            )
        pages = []
        if wanted is not DeliveryStatus.SUCCESS:  # every URL's: the project's failures index
            pages.append(
                await self.history.failures(project_id, before=cursor, limit=limit, **window)
            )
        # and the first URLs' own indexes, as before that index (what a version before wrote
        # there only): up to 200 reads, so one such listing of a project at a time here
        async with self._listing.setdefault(project_id, asyncio.Lock()):
            urls = await self._urls(project_id)
            found = await self.history.recent(
                project_id, urls, status=wanted, before=cursor, limit=limit, **window
            )
        pages.append(found)
        return Recent.merged(pages, limit)

    async def _urls(self, project_id: str) -> list[str]:
        """The distinct URLs of a project's callbacks (its pipelines' included), the first
        `RECENT_URLS_MAX` among its first `RECENT_CALLBACKS_READ` callbacks."""
        urls: dict[str, None] = {}
        size, page = self.settings.history_max_page_size, 1
        pages = max(1, RECENT_CALLBACKS_READ // size)
        while len(urls) < RECENT_URLS_MAX and page <= pages:
            found = await self.registry.list(project_id, page, size)
            urls.update(dict.fromkeys(cb.url for cb in found.records))
            if page >= found.total_pages:
                break
            page += 1
        return list(urls)[:RECENT_URLS_MAX]

    async def dead_letters(
        self, project_id: str | None = None, limit: int = 50
    ) -> list[HistoryRecord]:
        """The latest deliveries that gave up, newest first (of one project, or all)."""
        return await self.history.dead(project_id, limit)

    # ---- operations --------------------------------------------------------------------

    async def upgrade(self) -> bool:
        """Bring stored data to this version's layout (`Registry.upgrade`); False when
        Redis could not be reached (try again later). Then index the failing callbacks as
        far as Redis lets (`Health.upgrade`: never a reason to fail a start)."""
        try:
            await self.registry.upgrade()
        except REDIS_ERRORS as exc:
            log.warning("registry.upgrade_postponed", error=str(exc))
            return False
        await self.health.upgrade()
        return True

    async def status(self) -> Status:
        """Queue depth and age, live workers, failing and disabled callbacks, the last hour."""
        return await read_status(self.redis, self.keys, self.queue, self.health)


def searched(url: str) -> str:
    """A URL to look history up by, trimmed as a registration trims it (`validate_url`), so
    the URL a callback was registered with finds its records as given, spaces around it
    included (it found nothing: review); any text, but a NUL (no callback's URL holds one,
    and PostgreSQL refuses it in text: a 500 there, an empty page in Redis)."""
    if "\x00" in url:
        raise InvalidInput("url must not contain a NUL character", param="url")
    return url.strip()
