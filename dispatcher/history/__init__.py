"""The history store: one record per delivery attempt, behind one interface with two
backends (the repository pattern):

- `RedisHistory` (`redis.py`, the default): records in Redis next to the queue; zero
  set-up, bounded by Redis' memory.
- `PostgresHistory` (`postgres.py`, with `DISPATCHER_HISTORY_URL`): the worker appends
  each record to a Redis stream in the attempt's own pipeline; the shipper (`shipper.py`)
  copies the stream into day-partitioned tables (`schema.py`) in batches, off the hot path.

`open_history` picks one from the settings; `Services` holds it, and every front end and
the worker call the same methods. `tests/service/test_history.py` runs one contract against both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dispatcher.history.window import (
    MAX_ATTEMPTS_SHOWN,
    TIME_FORMAT,
    Cursor,
    Recent,
    format_ms,
    parse_window,
    truncate,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord
    from dispatcher.keys import Keys
    from dispatcher.lua import Script
    from dispatcher.models import DeliveryStatus, HistoryPage, HistoryRecord
    from dispatcher.settings import Settings

__all__ = [
    "MAX_ATTEMPTS_SHOWN",
    "TIME_FORMAT",
    "Cursor",
    "HistoryStore",
    "Recent",
    "format_ms",
    "open_history",
    "parse_window",
    "truncate",
]


class HistoryStore(Protocol):
    """What every backend provides. Writes go on the caller's Redis pipeline (the worker's
    group commit); reads raise `NotFound`, `InvalidInput` or `Unavailable`."""

    sweep_unit: str  # what `sweep` counts: "records" or "day partitions"

    async def assign_ids(self, records: Iterable[AttemptRecord]) -> None:
        """Give each record without an `id` a new one (ids always come from Redis)."""

    def recording(
        self, record: AttemptRecord, *, dead: bool = False, ending: Ending | None = None
    ) -> Script:
        """The write of one record, id assigned, and of what its attempt ends with
        (`dispatcher.ending`), as one idempotent script that may run together with others
        of its kind (`Script.queue_together`: the worker's `Writer` does)."""

    def record(
        self,
        pipe: Pipeline,
        record: AttemptRecord,
        *,
        dead: bool = False,
        ending: Ending | None = None,
    ) -> None:
        """Queue `recording` on `pipe`."""

    async def add(self, record: AttemptRecord, *, dead: bool = False) -> int:
        """Write one record now; returns its id."""

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
        """One page of the window, newest first, with the exact count."""

    async def get(self, record_id: int, project_id: str | None = None) -> HistoryRecord:
        """One record (of the project, when given)."""

    async def dead(self, project_id: str | None = None, limit: int = 50) -> list[HistoryRecord]:
        """The latest attempts after which their delivery gave up, newest first."""

    async def attempts(
        self,
        delivery_id: str,
        project_id: str,
        *,
        now_ms: int | None = None,
        limit: int = MAX_ATTEMPTS_SHOWN,
    ) -> list[HistoryRecord]:
        """The attempts of one delivery within the retention, newest first (`limit` of
        them at most)."""

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
        """The project's newest attempts to any of `urls`, every event included (a
        callback's "Recent deliveries"), of one `status` when given, in the window and
        older than `before`; newest first."""

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
        """The project's newest failed attempts, every URL and event (removed callbacks'
        included; with Redis history, those recorded by this version on), in the window
        and older than `before`; newest first."""

    def final_failures(
        self, project_id: str, url: str, event: str, *, start_ms: int, end_ms: int
    ) -> AsyncIterator[HistoryRecord]:
        """Every attempt of the window after which its delivery gave up."""

    async def sweep(
        self,
        *,
        now_ms: int | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Enforce the retention; returns how many `sweep_unit` were removed."""

    async def backlog(self) -> tuple[int, float]:
        """Records written but not yet queryable, and the age of the oldest (seconds)."""

    async def close(self) -> None:
        """Release what the store opened itself."""


def open_history(settings: Settings, redis: Redis, keys: Keys, id_floor: int = 0) -> HistoryStore:
    """The backend the settings name: PostgreSQL with `DISPATCHER_HISTORY_URL`, else Redis;
    its records on `redis`, under `keys`, their ids above `id_floor` (a shard's)."""
    if settings.history_url:
        from dispatcher.history.postgres import PostgresHistory

        return PostgresHistory(redis, settings, keys, id_floor)
    from dispatcher.history.redis import RedisHistory

    return RedisHistory(redis, settings, keys, id_floor)
