"""`dispatcher history migrate`: the history kept in Redis, copied into PostgreSQL.

Reads every record key of the Redis backend (SCAN, MGET by a thousand) and stores the
records with their ids through the shipper's loader, so running it twice, or while workers
already ship new records, stores each record once. Records past the retention are left
out. The Redis copies are not deleted: they expire by their TTL (retention + 1 day).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.clock import now_ms
from dispatcher.history import database
from dispatcher.history.kept import with_bodies
from dispatcher.history.loader import Loader, Row, parse_row

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = ["migrate"]

SCAN_COUNT = 1000


async def migrate(
    redis: Redis, keys: Keys, settings: Settings, *, on_batch: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Copy the Redis history into PostgreSQL; returns (records read, records new there)."""
    dead = {int(m) for m in await redis.zrange(keys.HISTORY_DEAD, 0, -1)}
    cutoff = now_ms() - settings.retention_ms
    conn = await database.connect(settings)
    loader = Loader(conn)
    read = stored = 0
    try:
        names: list[bytes] = []
        async for name in redis.scan_iter(match=keys.HISTORY_RECORD_PREFIX + "*", count=SCAN_COUNT):
            names.append(name)
            if len(names) >= SCAN_COUNT:
                n, new = await _copy(redis, keys, loader, names, dead, cutoff)
                read, stored, names = read + n, stored + new, []
                if on_batch is not None:
                    on_batch(n)
        if names:
            n, new = await _copy(redis, keys, loader, names, dead, cutoff)
            read, stored = read + n, stored + new
            if on_batch is not None:
                on_batch(n)
    finally:
        await conn.close()
    return read, stored


async def _copy(
    redis: Redis, keys: Keys, loader: Loader, names: list[bytes], dead: set[int], cutoff: int
) -> tuple[int, int]:
    rows: list[Row] = []
    for raw in await with_bodies(redis, keys, await redis.mget(names), keep_name=False):
        if raw is None:  # expired since the scan
            continue
        row = parse_row(raw)
        if row.created_ms >= cutoff:
            rows.append(row._replace(dead=row.id in dead))
    return len(rows), await loader.store(rows)
