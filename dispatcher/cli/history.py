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
    on_services,
    records_table,
    run_async,
    with_redis_url,
)
from dispatcher.connections import connect
from dispatcher.history import database
from dispatcher.history.migrate import migrate
from dispatcher.history.schema import MIGRATIONS, schema_version, upgrade
from dispatcher.history.shipper import Shipper
from dispatcher.settings import Settings

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
    result = on_services(
        lambda s: s.history_page(project, url, event, since, until, page, page_size)
    )
    console.print(records_table(result.records, settings))
    console.print(
        f"page {result.page}/{max(result.total_pages, 1)}, {result.count} records "
        f"({settings.timezone})"
    )


def _postgres_settings() -> Settings:
    settings = with_redis_url(load_settings())
    if not settings.history_url:
        err.print("[red]no PostgreSQL history[/red]: set DISPATCHER_HISTORY_URL=postgresql://...")
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
        redis = connect(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        shipper = Shipper(redis, settings, elect=not drain, stop=stop)
        try:
            if not drain:
                await shipper.run()
                return shipper.shipped
            with database.unavailable():
                await shipper.open()
                return await shipper.drain()
        finally:
            await shipper.close()
            await redis.aclose()

    console.print(f"shipped {run_async(go)} records")


@history_app.command("migrate")
def migrate_command() -> None:
    """Copy the history kept in Redis into PostgreSQL (idempotent: run it again at will)."""
    settings = _postgres_settings()

    async def go() -> tuple[int, int]:
        redis = connect(settings)
        try:
            with database.unavailable(), counting("copying", "records") as advance:
                return await migrate(redis, settings, on_batch=advance)
        finally:
            await redis.aclose()

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
