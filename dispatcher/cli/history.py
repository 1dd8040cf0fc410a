"""`history` (the seed query, and its `ship`, `migrate` and `set-aside` commands) and `db`
(the PostgreSQL history's schema)."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from dispatcher.cli.common import (
    Table,
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
from dispatcher.history import database, set_aside
from dispatcher.history.migrate import Migrated, migrate
from dispatcher.history.schema import MIGRATIONS, Busy, schema_version, upgrade
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
set_aside_app = typer.Typer(
    help="PostgreSQL history: stream entries the shipper could not store (history_set_aside).",
    no_args_is_help=True,
)
history_app.add_typer(set_aside_app, name="set-aside")


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
    """Copy the history kept in Redis into PostgreSQL (idempotent: run it again at will).
    A record it cannot read is skipped, one PostgreSQL refuses set aside: both logged and
    counted, the others copied."""
    settings = _postgres_settings()

    async def go() -> list[Migrated]:
        shards = shards_of(settings)
        clients = connect_shards(settings, shards)
        done = []
        try:
            with database.unavailable(), counting("copying", "records") as advance:
                for shard, client in zip(shards, clients, strict=True):
                    done.append(
                        await migrate(
                            client, shard.keys, settings, shard.stream_name, on_batch=advance
                        )
                    )
        finally:
            await close_all(clients)
        return done

    read, stored, unreadable, aside = (sum(column) for column in zip(*run_async(go), strict=True))
    console.print(f"copied {stored} records ({read - stored - aside} were there already)")
    if unreadable:
        console.print(
            tagged(f"{unreadable} records unreadable", "yellow", ": skipped, left in Redis"
                   " (logged with their keys: history.migrate_unreadable)")
        )  # fmt: skip
    if aside:
        console.print(
            tagged(f"{aside} records refused by PostgreSQL", "yellow", ": set aside"
                   " (`dispatcher history set-aside list`, then `retry` once fixed)")
        )  # fmt: skip


@set_aside_app.command("list")
def set_aside_list(
    project: Annotated[str | None, typer.Option(help="Project id")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, oldest first")] = 100,
) -> None:
    """The entries set aside, oldest first, with why."""
    settings = _postgres_settings()

    async def go() -> list[set_aside.SetAside]:
        with database.unavailable():
            conn = await database.connect(settings)
            try:
                return await set_aside.listed(conn, project, limit)
            finally:
                await conn.close()

    rows = run_async(go)
    table = Table("stream id", "record", "project", "set aside", "error")
    for row in rows:
        kept = "" if row.whole else " (before version 7: the record's JSON only, not retried)"
        table.add_row(
            row.stream_id, row.record_id or "", row.project_id or "",
            row.set_aside_at.isoformat(timespec="seconds"), row.error + kept,
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(rows)} entries")


@set_aside_app.command("retry")
def set_aside_retry(
    stream_ids: Annotated[list[str] | None, typer.Argument(help="Stream ids (from `list`)")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every entry set aside")] = False,
) -> None:
    """Ship entries set aside again, once what refused them is fixed: their fields are
    appended to their stream as the worker wrote them (refused again: set aside again)."""
    if not stream_ids and not every:
        err.print("give the stream ids of the entries (see `list`), or --all")
        raise typer.Exit(2)
    settings = _postgres_settings()

    async def go() -> list[str]:
        shards = shards_of(settings)
        clients = connect_shards(settings, shards)
        streams = {
            shard.stream_name: (client, shard.keys.HISTORY_STREAM)
            for shard, client in zip(shards, clients, strict=True)
        }
        try:
            with database.unavailable():
                conn = await database.connect(settings)
                try:
                    return await set_aside.retry(conn, streams, None if every else stream_ids)
                finally:
                    await conn.close()
        finally:
            await close_all(clients)

    again = run_async(go)
    console.print(f"appended {len(again)} entries to the history stream again: shipped next")


def upgrade_schema(settings: Settings, *, wait: bool = True) -> tuple[list[int], int]:
    """Apply the missing migrations; returns those applied and the version now (`Busy`
    when not `wait` and another process is upgrading)."""

    async def go() -> tuple[list[int], int]:
        with database.unavailable():
            conn = await database.connect(settings)
            try:
                return await upgrade(conn, wait=wait), await schema_version(conn)
            finally:
                await conn.close()

    return run_async(go)


def _unreachable(settings: Settings) -> str | None:
    """Why PostgreSQL cannot be reached now (refused, timed out, starting or shutting down),
    or None when it answers. A refusal that is no outage (a wrong password, no such
    database) is no reason: `upgrade_schema` meets it and fails, as without --if-reachable."""

    async def go() -> str | None:
        try:
            conn = await database.connect(settings)
        except database.OUTAGE as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception:  # reported by upgrade_schema's own connection
            return None
        await conn.close()
        return None

    return run_async(go)


@db_app.command("upgrade")
def db_upgrade(
    if_reachable: Annotated[
        bool,
        typer.Option(
            "--if-reachable",
            help="Exit 0 with a warning when PostgreSQL is unreachable, or another process is"
            " upgrading (a step before the API starts: the API works without PostgreSQL);"
            " else upgrade as without it",
        ),
    ] = False,
) -> None:
    """Bring the history schema to the latest version (idempotent; safe to run at once
    from several processes). `dispatcher run` does it by itself. Without
    DISPATCHER_HISTORY_URL there is nothing to do (history lives in Redis). With
    --if-reachable, an unreachable PostgreSQL is a warning, not a failure: the API starts,
    and its history reads answer 503 until PostgreSQL is back and the schema upgraded (the
    API processes and the workers do it themselves then: `dispatcher.history.heal`)."""
    settings = load_settings()
    if not settings.history_url:
        console.print("history lives in Redis (no DISPATCHER_HISTORY_URL): nothing to upgrade")
        return
    if if_reachable and (why := _unreachable(settings)) is not None:
        err.print(
            tagged(
                "warning",
                "yellow",
                f": PostgreSQL is unreachable ({why}): the schema is not upgraded now; the"
                " API and the workers upgrade it once PostgreSQL is back (history reads answer"
                " 503 meanwhile)",
            )
        )
        return
    try:
        applied, version = upgrade_schema(settings, wait=not if_reachable)
    except Busy:  # a long migration under way (hours: an index a day): not waited for
        err.print(
            tagged(
                "warning",
                "yellow",
                ": another process is upgrading the schema"
                " now: not waited for; history reads answer 503 until it is done",
            )
        )
        return
    if applied:
        console.print(f"applied migrations {', '.join(map(str, applied))}: version {version}")
    else:
        console.print(f"up to date: version {version} (latest {MIGRATIONS[-1][0]})")
