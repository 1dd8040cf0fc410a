"""`history` (the seed query, and its `ship` and `migrate` commands) and `db` (the
PostgreSQL history's schema)."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from dispatcher.cli.common import (
    console,
    counting,
    err,
    load_settings,
    on_router,
    records_table,
    run_async,
    tagged,
    with_redis_url,
)
from dispatcher.history import database
from dispatcher.history.migrate import migrate
from dispatcher.history.schema import MIGRATIONS, schema_version, upgrade
from dispatcher.history.shipper import Shipper
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.topology import close_all, connect_shards, shards_of

__all__ = ["db_app", "history_app", "upgrade_schema"]

history_app = typer.Typer(
    help="Delivery attempts of one (url, event); `ship` and `migrate` for PostgreSQL history.",
    invoke_without_command=True,
)
db_app = typer.Typer(help="The PostgreSQL history's schema.", no_args_is_help=True)


@history_app.callback()
def history(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="Project id")] = None,
    url: Annotated[str | None, typer.Option(help="Callback URL")] = None,
    event: Annotated[str | None, typer.Option(help="Event name")] = None,
    since: Annotated[str | None, typer.Option(help="'yyyy-MM-dd HH:mm:ss'")] = None,
    until: Annotated[str | None, typer.Option(help="'yyyy-MM-dd HH:mm:ss'")] = None,
    page: int = 1,
    page_size: int = 20,
) -> None:
    """Delivery attempts of one (url, event), newest first (the history route's rules)."""
    if ctx.invoked_subcommand is not None:
        return
    if not (project and url and event):
        err.print("give --project, --url and --event (or a command: ship, migrate)")
        raise typer.Exit(2)
    settings = load_settings()
    result = on_router(
        lambda r: views.history_page(r, project, url, event, since, until, page, page_size)
    )
    console.print(records_table(result.records, settings))
    console.print(
        f"page {result.page}/{max(result.total_pages, 1)}, {result.count} records "
        f"({settings.timezone})"
    )


def _postgres_settings() -> Settings:
    settings = with_redis_url(load_settings())
    if not settings.history_url:
        err.print(
            tagged("no PostgreSQL history", "red", ": set DISPATCHER_HISTORY_URL=postgresql://...")
        )
        raise typer.Exit(2)
    return settings


@history_app.command("ship")
def ship(
    drain: Annotated[
        bool, typer.Option("--drain", help="Ship what waits now, then exit (no election)")
    ] = False,
) -> None:
    """Ship history records from Redis to PostgreSQL until SIGINT/SIGTERM (one shipper of
    the fleet ships at a time; workers too unless DISPATCHER_HISTORY_SHIP=false)."""
    from dispatcher.logs import configure_logging

    settings = _postgres_settings()
    configure_logging(settings)

    async def go() -> int:
        shards = shards_of(settings)
        clients = connect_shards(settings, shards)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        shippers = [
            Shipper(client, settings, shard, elect=not drain, stop=stop)
            for shard, client in zip(shards, clients, strict=True)
        ]
        try:
            return sum(await asyncio.gather(*(_ship(s, drain=drain) for s in shippers)))
        finally:
            for shipper in shippers:
                await shipper.close()
            await close_all(clients)

    console.print(f"shipped {run_async(go)} records")


async def _ship(shipper: Shipper, *, drain: bool) -> int:
    """One shard's stream: shipped until stopped, or (`drain`) what waits now."""
    if not drain:
        await shipper.run()
        return shipper.shipped
    with database.unavailable():
        await shipper.open()
        return await shipper.drain()


@history_app.command("migrate")
def migrate_command() -> None:
    """Copy the history kept in Redis into PostgreSQL (idempotent: run it again at will)."""
    settings = _postgres_settings()

    async def go() -> tuple[int, int]:
        shards = shards_of(settings)
        clients = connect_shards(settings, shards)
        read = stored = 0
        try:
            with database.unavailable(), counting("copying", "records") as advance:
                for shard, client in zip(shards, clients, strict=True):
                    n, new = await migrate(client, shard.keys, settings, on_batch=advance)
                    read, stored = read + n, stored + new
        finally:
            await close_all(clients)
        return read, stored

    read, stored = run_async(go)
    console.print(f"copied {stored} records ({read - stored} were there already)")


def upgrade_schema(settings: Settings) -> tuple[list[int], int]:
    """Apply the missing migrations; returns those applied and the version now."""

    async def go() -> tuple[list[int], int]:
        with database.unavailable():
            conn = await database.connect(settings)
            try:
                return await upgrade(conn), await schema_version(conn)
            finally:
                await conn.close()

    return run_async(go)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the history schema to the latest version (idempotent; safe to run at once
    from several processes). `dispatcher run` does it by itself. Without
    DISPATCHER_HISTORY_URL there is nothing to do (history lives in Redis)."""
    settings = load_settings()
    if not settings.history_url:
        console.print("history lives in Redis (no DISPATCHER_HISTORY_URL): nothing to upgrade")
        return
    applied, version = upgrade_schema(settings)
    if applied:
        console.print(f"applied migrations {', '.join(map(str, applied))}: version {version}")
    else:
        console.print(f"up to date: version {version} (latest {MIGRATIONS[-1][0]})")
