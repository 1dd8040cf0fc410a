"""The `dispatcher` command: run | api | worker | emit | callbacks | history | redeliver | ..."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console
from rich.table import Table

from dispatcher.auth import Role, Roles
from dispatcher.errors import DispatcherError
from dispatcher.history import History, parse_window
from dispatcher.models import Region
from dispatcher.producer import Producer
from dispatcher.redis import EmbeddedRedis, connect
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.tokens import TokenCipher, cipher_for

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    help="callback-dispatcher: webhook delivery for CI/CD events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
callbacks_app = typer.Typer(help="Register, list and switch callbacks.", no_args_is_help=True)
roles_app = typer.Typer(help="Who is admin or member of which project.", no_args_is_help=True)
tokens_app = typer.Typer(help="Encryption of secret tokens at rest.", no_args_is_help=True)
app.add_typer(callbacks_app, name="callbacks")
app.add_typer(roles_app, name="roles")
app.add_typer(tokens_app, name="tokens")

console = Console()
err = Console(stderr=True)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value stops the command with a clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            name = "DISPATCHER_" + "_".join(str(p) for p in error["loc"]).upper()
            err.print(f"[red]configuration error[/red] {name}: {error['msg']}")
        raise typer.Exit(2) from None


def _require_url(settings: Settings) -> str:
    """DISPATCHER_REDIS_URL, else the embedded Redis of a `dispatcher run` on this folder."""
    if settings.redis_url is not None:
        return settings.redis_url
    running = EmbeddedRedis(settings.data_dir).running_url()
    if running is None:
        err.print(
            "[red]no Redis[/red]: set DISPATCHER_REDIS_URL, or start `dispatcher run` (its "
            f"embedded Redis in {settings.data_dir} is found automatically)"
        )
        raise typer.Exit(2)
    return running


def _run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(factory())
    except DispatcherError as exc:
        err.print(f"[red]error[/red]: {exc.message}")
        raise typer.Exit(1) from None


async def _with_redis(settings: Settings, body: Callable[[Any], Awaitable[T]]) -> T:
    redis = await connect(settings, _require_url(settings))
    try:
        return await body(redis)
    finally:
        await redis.aclose()


def _registry(redis: Any, settings: Settings) -> Registry:
    return Registry(redis, cipher_for(settings))


# ---- services -------------------------------------------------------------------------


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(settings: Settings, url: str, *, with_worker: bool) -> None:
    """The API (and a worker) until SIGINT/SIGTERM; then the API stops taking requests and
    the worker finishes its jobs (up to DISPATCHER_SHUTDOWN_GRACE) before we return."""
    import signal

    import uvicorn

    from dispatcher.api import create_app
    from dispatcher.worker import create_worker

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # we own the signals: uvicorn would re-raise them and skip our clean-up

    settings = settings.model_copy(update={"redis_url": url})
    server = Server(
        uvicorn.Config(
            create_app(settings), host=settings.api_host, port=settings.api_port,
            log_config=None, lifespan="on",
        )
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = create_worker(settings, handle_signals=False) if with_worker else None
    tasks = [asyncio.create_task(server.serve())]
    if worker is not None:
        tasks.append(asyncio.create_task(worker.async_run()))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    server.should_exit = True
    if worker is not None:
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if worker is not None:
        try:
            await worker.close()
        except (RedisConnectionError, OSError) as exc:
            err.print(f"worker closed without Redis: {exc}")


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
    set. Development defaults: loopback receivers allowed, role checks off."""
    from dispatcher.logs import configure_logging

    dev_defaults = {
        key: True
        for key in ("dev_mode", "open_access")
        if f"DISPATCHER_{key.upper()}" not in os.environ
    }
    settings = load_settings(**dev_defaults, **_listen(host, port))
    configure_logging(settings)
    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    url = settings.redis_url or embedded.start()  # type: ignore[union-attr]
    base = f"http://{settings.api_host}:{settings.api_port}"
    where = f"  (embedded, data in {settings.data_dir})" if embedded else ""
    print(f"callback-dispatcher API on {base}  (docs: {base}/docs)", flush=True)
    print(f"Redis: {url}{where}", flush=True)
    _install_uvloop()
    try:
        asyncio.run(_serve(settings, url, with_worker=True))
    finally:
        if embedded is not None:
            embedded.stop()


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="API host")] = None,
    port: Annotated[int | None, typer.Option(help="API port")] = None,
) -> None:
    """The HTTP API alone (stateless; run as many as you like)."""
    from dispatcher.logs import configure_logging

    settings = load_settings(**_listen(host, port))
    configure_logging(settings)
    url = _require_url(settings)
    _install_uvloop()
    asyncio.run(_serve(settings, url, with_worker=False))


@app.command()
def worker(
    check: Annotated[
        bool, typer.Option("--check", help="Exit 0 if a worker on this host is alive (probes)")
    ] = False,
) -> None:
    """A delivery worker. Run any number, on any hosts, against one Redis."""
    import socket
    import time

    from dispatcher.logs import configure_logging

    settings = load_settings()
    url = _require_url(settings)
    if check:
        raise typer.Exit(_check_worker(url, socket.gethostname()))
    from dispatcher.worker import create_worker

    configure_logging(settings)
    _install_uvloop()
    while True:  # a Redis outage longer than the client's retries must not end the fleet
        try:
            create_worker(settings, url).run()
            return
        except (RedisConnectionError, OSError) as exc:
            err.print(f"worker lost Redis ({exc}); starting again in 5 s")
            time.sleep(5)


def _check_worker(url: str, host: str) -> int:
    """0 when a worker on `host` has a fresh heartbeat; fails fast when Redis is away."""
    from redis.asyncio import Redis

    from dispatcher.status import live_workers

    async def go() -> int:
        redis = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            alive = await live_workers(redis, host)
        except (RedisConnectionError, OSError) as exc:
            err.print(f"Redis unreachable: {exc}")
            return 1
        finally:
            await redis.aclose()
        console.print(f"{len(alive)} live worker(s) on {host}")
        return 0 if alive else 1

    return asyncio.run(go())


# ---- producers ------------------------------------------------------------------------


def _parse_data(data: str) -> dict[str, Any]:
    try:
        raw = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
        value = orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError) as exc:
        err.print(f"[red]--data[/red] is not valid JSON (or @file): {exc}")
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        err.print("[red]--data[/red] must be a JSON object")
        raise typer.Exit(2)
    return value


@app.command()
def emit(
    project: Annotated[str, typer.Option(help="Project id")],
    event: Annotated[str, typer.Option(help="Event name, e.g. BUILD_END")],
    data: Annotated[str, typer.Option(help="JSON object, or @file.json")] = "{}",
    event_id: Annotated[str | None, typer.Option(help="Idempotency key")] = None,
) -> None:
    """Queue one event for delivery; prints its event id."""
    settings = load_settings()
    settings = settings.model_copy(update={"redis_url": _require_url(settings)})
    payload = _parse_data(data)

    async def go() -> str:
        async with Producer(settings) as producer:
            return await producer.emit(project, event, payload, event_id=event_id)

    console.print(_run(go))


# ---- callbacks ------------------------------------------------------------------------


@callbacks_app.command("list")
def callbacks_list(
    project: Annotated[str, typer.Option(help="Project id")],
    page: int = 1,
    page_size: int = 50,
) -> None:
    """A project's callbacks (tokens never shown)."""
    settings = load_settings()
    result = _run(
        lambda: _with_redis(
            settings, lambda r: _registry(r, settings).list(project, page, page_size)
        )
    )
    table = Table("id", "event", "url", "region", "enabled", "disabled reason", "token")
    for cb in result.records:
        table.add_row(
            str(cb.id), cb.event.value, cb.url, cb.region.value, "yes" if cb.enabled else "no",
            cb.disabled_reason or "", "set" if cb.has_secret_token else "",
        )  # fmt: skip
    console.print(table)
    console.print(f"page {result.page}/{max(result.total_pages, 1)}, {result.count} callbacks")


@callbacks_app.command("failing")
def callbacks_failing() -> None:
    """Callbacks whose latest deliveries failed (consecutive final failures)."""
    from dispatcher.status import failing_callbacks

    settings = load_settings()
    found = _run(lambda: _with_redis(settings, failing_callbacks))
    table = Table("id", "failures", "since", "last error")
    for f in found:
        table.add_row(str(f.callback_id), str(f.failures), _fmt_ms(f.since_ms, settings),
                      f.last_error[:80])  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} failing callbacks")


@callbacks_app.command("add")
def callbacks_add(
    project: Annotated[str, typer.Option(help="Project id")],
    url: Annotated[str, typer.Option(help="Callback URL")],
    event: Annotated[str, typer.Option(help="Event name(s), comma-separated")],
    region: Annotated[Region, typer.Option(help="Region")] = Region.DEVNET,
    token: Annotated[str | None, typer.Option(help="Secret token")] = None,
) -> None:
    """Register a URL for one or more events (an upsert)."""
    settings = load_settings()
    result = _run(
        lambda: _with_redis(
            settings,
            lambda r: _registry(r, settings).create_batch(
                project, url, event, region, token, creator="cli"
            ),
        )
    )
    for name in result.success_events:
        console.print(f"[green]registered[/green] {name}")
    for name, reason in result.failure_events.items():
        err.print(f"[red]refused[/red] {name}: {reason}")
    if result.failure_events:
        raise typer.Exit(1)


@callbacks_app.command("rm")
def callbacks_rm(
    callback_id: int, project: Annotated[str, typer.Option(help="Project id")]
) -> None:
    """Delete a callback."""
    settings = load_settings()
    _run(
        lambda: _with_redis(settings, lambda r: _registry(r, settings).delete(project, callback_id))
    )
    console.print(f"deleted callback {callback_id}")


@callbacks_app.command("enable")
def callbacks_enable(callback_id: int) -> None:
    """Enable a callback (also one disabled by endpoint health)."""
    settings = load_settings()
    _run(
        lambda: _with_redis(
            settings, lambda r: _registry(r, settings).set_enabled(callback_id, True)
        )
    )
    console.print(f"enabled callback {callback_id}")


@callbacks_app.command("disable")
def callbacks_disable(
    callback_id: int, reason: Annotated[str, typer.Option(help="Why")] = "disabled by operator"
) -> None:
    """Disable a callback with a reason."""
    settings = load_settings()
    _run(
        lambda: _with_redis(
            settings, lambda r: _registry(r, settings).set_enabled(callback_id, False, reason)
        )
    )
    console.print(f"disabled callback {callback_id}")


# ---- history --------------------------------------------------------------------------


def _fmt_ms(ms: int, settings: Settings) -> str:
    return datetime.fromtimestamp(ms / 1000, settings.tz).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@app.command()
def history(
    project: Annotated[str, typer.Option(help="Project id")],
    url: Annotated[str, typer.Option(help="Callback URL")],
    event: Annotated[str, typer.Option(help="Event name")],
    since: Annotated[str | None, typer.Option(help="'yyyy-MM-dd HH:mm:ss'")] = None,
    until: Annotated[str | None, typer.Option(help="'yyyy-MM-dd HH:mm:ss'")] = None,
    page: int = 1,
    page_size: int = 20,
) -> None:
    """Delivery attempts of one (url, event), newest first."""
    settings = load_settings()

    async def go(redis: Any) -> Any:
        start_ms, end_ms = parse_window(since, until, settings.tz)
        return await History(redis, settings).query(
            project, url, event, start_ms=start_ms, end_ms=end_ms, page=page, page_size=page_size
        )

    result = _run(lambda: _with_redis(settings, go))
    table = Table("id", "time", "status", "code", "attempt", "ms", "delivery", "error")
    for rec in result.records:
        table.add_row(
            str(rec.id), _fmt_ms(rec.created_time, settings), rec.status.value,
            str(rec.response_code or ""), str(rec.attempt), str(rec.duration_ms or ""),
            rec.delivery_id or "", (rec.error_msg or "")[:60],
        )  # fmt: skip
    console.print(table)
    console.print(
        f"page {result.page}/{max(result.total_pages, 1)}, {result.count} records "
        f"({settings.timezone})"
    )


@app.command()
def redeliver(
    record_id: Annotated[int | None, typer.Argument(help="One history record id")] = None,
    project: Annotated[str | None, typer.Option(help="Bulk: project id")] = None,
    url: Annotated[str | None, typer.Option(help="Bulk: callback URL")] = None,
    event: Annotated[str | None, typer.Option(help="Bulk: event name")] = None,
    since: Annotated[str | None, typer.Option(help="Bulk: 'yyyy-MM-dd HH:mm:ss'")] = None,
    until: Annotated[str | None, typer.Option(help="Bulk: 'yyyy-MM-dd HH:mm:ss'")] = None,
) -> None:
    """Send recorded requests again (same body and delivery id, current token): one record
    by id, or every delivery of a window that finally failed (with a progress bar)."""
    settings = load_settings()
    if record_id is not None:

        async def one(redis: Any) -> str:
            record = await History(redis, settings).get(record_id)
            return await Producer(settings, redis).redeliver(record)

        console.print(f"queued {_run(lambda: _with_redis(settings, one))}")
        return
    if not (project and url and event):
        err.print("give a record id, or --project, --url and --event (and a window)")
        raise typer.Exit(2)

    async def bulk(redis: Any) -> int:
        from rich.progress import Progress

        history, producer = History(redis, settings), Producer(settings, redis)
        start_ms, end_ms = parse_window(since, until, settings.tz)
        first = await history.query(project, url, event, start_ms=start_ms, end_ms=end_ms,
                                    page_size=100)  # fmt: skip
        queued = 0
        with Progress(console=console) as progress:
            task = progress.add_task("redelivering", total=first.count)
            for page in range(1, first.total_pages + 1):
                batch = first if page == 1 else await history.query(
                    project, url, event, start_ms=start_ms, end_ms=end_ms, page=page,
                    page_size=100,
                )  # fmt: skip
                for record in batch.records:
                    if record.final and record.status.value == "FAILED":
                        await producer.redeliver(record)
                        queued += 1
                    progress.advance(task)
        return queued

    console.print(f"queued {_run(lambda: _with_redis(settings, bulk))} redeliveries")


@app.command()
def sweep() -> None:
    """Remove history past the retention now (the workers also do it every 5 minutes)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    settings = load_settings()

    async def go(redis: Any) -> int:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console) as bar:
            task = bar.add_task("sweeping: 0 removed")
            removed = 0

            def advance(n: int) -> None:
                nonlocal removed
                removed += n
                bar.update(task, description=f"sweeping: {removed} removed")

            return await History(redis, settings).sweep(on_batch=advance)

    console.print(f"removed {_run(lambda: _with_redis(settings, go))} records")


@app.command()
def status() -> None:
    """Queue depth, live workers, failing and disabled callbacks, the last hour."""
    from dispatcher.status import read_status

    settings = load_settings()
    st = _run(lambda: _with_redis(settings, lambda r: read_status(r, settings.queue_name)))
    table = Table("what", "value", show_header=False)
    table.add_row("queue: jobs due", str(st.queue_due))
    table.add_row("queue: oldest due (s)", f"{st.oldest_due_s:.1f}")
    table.add_row("workers alive", str(len(st.workers)))
    for w in st.workers:
        table.add_row("  worker", f"{w['host']} pid {w['pid']}")
    table.add_row("callbacks failing", str(len(st.failing)))
    table.add_row("callbacks disabled", str(st.disabled))
    for outcome in ("success", "retry", "failed", "gone"):
        table.add_row(f"last hour: {outcome}", str(st.last_hour.get(outcome, 0)))
    console.print(table)


# ---- roles ----------------------------------------------------------------------------


@roles_app.command("grant")
def roles_grant(
    project: Annotated[str, typer.Option(help="Project id, or * for all")],
    user: Annotated[str, typer.Option(help="User name (X-DEVOPS-UID)")],
    role: Annotated[Role, typer.Option(help="admin or member")] = Role.MEMBER,
) -> None:
    """Give a user a role in a project."""
    settings = load_settings()
    _run(lambda: _with_redis(settings, lambda r: Roles(r, settings).grant(project, user, role)))
    console.print(f"{user} is {role.value} of {project}")


@roles_app.command("revoke")
def roles_revoke(
    project: Annotated[str, typer.Option(help="Project id, or *")],
    user: Annotated[str, typer.Option(help="User name")],
) -> None:
    """Take a user's role in a project away."""
    settings = load_settings()
    _run(lambda: _with_redis(settings, lambda r: Roles(r, settings).revoke(project, user)))
    console.print(f"{user} has no role in {project}")


@roles_app.command("list")
def roles_list(project: Annotated[str, typer.Option(help="Project id, or *")]) -> None:
    """Who has which role in a project."""
    settings = load_settings()
    found = _run(lambda: _with_redis(settings, lambda r: Roles(r, settings).list(project)))
    table = Table("user", "role")
    for user, role in found.items():
        table.add_row(user, role.value)
    console.print(table)


# ---- tokens ---------------------------------------------------------------------------


@tokens_app.command("new-key")
def tokens_new_key() -> None:
    """Print a new Fernet key for DISPATCHER_TOKEN_KEYS."""
    console.print(TokenCipher.new_key())


@tokens_app.command("rotate")
def tokens_rotate() -> None:
    """Re-encrypt every stored token with the first key of DISPATCHER_TOKEN_KEYS."""
    settings = load_settings()
    count = _run(lambda: _with_redis(settings, lambda r: _registry(r, settings).rotate_tokens()))
    console.print(f"re-encrypted {count} tokens")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
