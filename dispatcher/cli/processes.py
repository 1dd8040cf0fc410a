"""The long-running processes: `run`, `api`, `worker` (see `dispatcher.serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from typing import Annotated, Any

import typer

from dispatcher import tracing
from dispatcher.cli.common import (
    app,
    checked,
    console,
    embedded_postgres,
    err,
    load_settings,
    tagged,
    with_history_url,
    with_redis_url,
)
from dispatcher.connections import shown
from dispatcher.embedded import EmbeddedRedis
from dispatcher.settings import EMBEDDED, Settings
from dispatcher.worker.liveness import FRESH_MIN_S


def _listen(host: str | None, port: int | None) -> dict[str, Any]:
    """Settings overrides from the --host / --port options."""
    overrides: dict[str, Any] = {}
    if host:
        overrides["api_host"] = host
    if port is not None:
        overrides["api_port"] = port
    return overrides


@app.command()
def run(
    host: Annotated[str | None, typer.Option(help="API host")] = None,
    port: Annotated[int | None, typer.Option(help="API port")] = None,
) -> None:
    """API and worker in one process, on an embedded Redis unless DISPATCHER_REDIS_URL is
    set (and an embedded PostgreSQL history with DISPATCHER_HISTORY_URL=embedded).
    Development defaults: loopback receivers allowed, role checks off."""
    from dispatcher.logs import configure_logging
    from dispatcher.serve import install_uvloop, serve

    dev_defaults = {
        key: True
        for key in ("dev_mode", "open_access")
        if f"DISPATCHER_{key.upper()}" not in os.environ
    }
    settings = load_settings(**dev_defaults, **_listen(host, port))
    configure_logging(settings)
    tracing.setup()
    with contextlib.ExitStack() as servers:
        settings = _history(settings, servers)
        embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
        if embedded is None:
            settings = checked(settings)
        else:
            settings = settings.model_copy(update={"redis_url": embedded.start()})
            servers.callback(embedded.stop)
        base = f"http://{settings.api_host}:{settings.api_port}"
        where = f"  (embedded, data in {settings.data_dir})" if embedded else ""
        print(f"callback-dispatcher API on {base}  (docs: {base}/docs)", flush=True)
        print(f"console: {base}/console", flush=True)
        print(f"Redis: {shown(settings.redis_url or '')}{where}", flush=True)
        install_uvloop()
        asyncio.run(serve(settings, with_worker=True))


def _history(settings: Settings, servers: contextlib.ExitStack) -> Settings:
    """With a PostgreSQL history: the embedded server started (and stopped with `servers`)
    when the settings ask for it, the schema brought up to date."""
    if not settings.history_url:
        return settings
    from dispatcher.cli.history import upgrade_schema

    where = ""
    if settings.history_url == EMBEDDED:
        postgres = embedded_postgres(settings)
        try:
            url = servers.enter_context(postgres).url
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            err.print(tagged("the embedded PostgreSQL did not start", "red", f": {exc}"))
            raise typer.Exit(1) from None
        settings = settings.model_copy(update={"history_url": url})
        where = f" {url}  (embedded, data in {postgres.data_dir})"
    applied, version = upgrade_schema(settings)
    print(
        f"history: PostgreSQL{where}, schema version {version}"
        + (f" (applied {applied})" if applied else ""),
        flush=True,
    )
    return settings


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="API host")] = None,
    port: Annotated[int | None, typer.Option(help="API port")] = None,
) -> None:
    """The HTTP API alone (stateless; run as many as you like)."""
    from dispatcher.logs import configure_logging
    from dispatcher.serve import install_uvloop, serve

    settings = with_history_url(with_redis_url(load_settings(**_listen(host, port))))
    configure_logging(settings)
    tracing.setup()
    install_uvloop()
    asyncio.run(serve(settings, with_worker=False))


@app.command()
def worker(
    check: Annotated[
        bool,
        typer.Option("--check", help="Exit 0 if a worker on this host is alive (probes)"),
    ] = False,
    fresh: Annotated[
        float,
        typer.Option(
            "--fresh",
            min=FRESH_MIN_S,
            help="With --check: a worker is alive when its event loop "
            "turned within these seconds (it marks every 5 s)",
        ),
    ] = 30.0,
) -> None:
    """A delivery worker. Run any number, on any hosts, against one Redis."""
    from dispatcher.logs import configure_logging
    from dispatcher.serve import install_uvloop, work

    if check:
        raise typer.Exit(_check_worker(fresh))
    settings = with_history_url(with_redis_url(load_settings()))
    configure_logging(settings)
    tracing.setup()
    install_uvloop()
    work(settings)


def _check_worker(fresh: float) -> int:
    """0 while a worker on this host turned its event loop within `fresh` seconds
    (`worker.liveness`): Redis is not asked, since a restart cures no Redis outage."""
    from dispatcher.worker.liveness import checked

    status, said = checked(fresh)
    console.print(said)
    return status
