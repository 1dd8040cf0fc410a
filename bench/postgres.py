"""The bench's private PostgreSQL (for the PostgreSQL history's scenarios): its settings
and fresh, migrated databases on it."""

from __future__ import annotations

import asyncpg

from dispatcher.history.schema import upgrade

# A durable PostgreSQL (fsync and synchronous commit on, the defaults) on disk, with room
# for a bulk fill between checkpoints.
PG_SETTINGS = {"shared_buffers": "512MB", "max_wal_size": "8GB", "checkpoint_timeout": "30min"}


async def create_databases(url: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Fresh databases on the server at `url`, migrated; returns their URLs."""
    conn = await asyncpg.connect(url)
    try:
        for name in names:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    base = url.rsplit("/", 1)[0]
    urls = tuple(f"{base}/{name}" for name in names)
    for each in urls:
        conn = await asyncpg.connect(each)
        try:
            await upgrade(conn)
        finally:
            await conn.close()
    return urls
