"""What every command shares: settings, the services of the configured Redis, output."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from dispatcher.connections import REDIS_ERRORS
from dispatcher.connections import shown as redacted
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis
from dispatcher.errors import DispatcherError, InvalidSetting
from dispatcher.history import format_ms
from dispatcher.models import HistoryRecord
from dispatcher.placement import UNREAD
from dispatcher.registry.rules import TEXT_CONTROL
from dispatcher.settings import EMBEDDED, Settings
from dispatcher.shards.router import Router
from dispatcher.topology import check_shards, shards_of

if TYPE_CHECKING:
    from dispatcher.shard import Shard

__all__ = [
    "CLI_USER",
    "Table",
    "app",
    "checked",
    "console",
    "counting",
    "embedded_postgres",
    "err",
    "fmt_ms",
    "load_settings",
    "on_router",
    "records_table",
    "run_async",
    "shown",
    "tagged",
    "with_history_url",
    "with_redis_url",
]

T = TypeVar("T")
CLI_USER = "cli"

app = typer.Typer(
    help="callback-dispatcher: webhook delivery for CI/CD events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# No markup or emoji codes: what the CLI prints holds what projects and receivers wrote
# (URLs, reasons, filters, errors, lane keys), which Rich would read as its own markup ("[/]"
# stops the command, "[link=…]" disguises a link). Its own colours go through `tagged`.
console = Console(markup=False, emoji=False)
err = Console(stderr=True, markup=False, emoji=False)

# Control characters (`registry.rules.TEXT_CONTROL`: C0, DEL, C1, bidi overrides,
# zero-width), shown escaped: a terminal acts on ESC (clears the screen, retitles itself,
# hides rows), and registration refusing them (a reason, a pipeline id, a filter) leaves
# what no one registers, such as a filter's error quoting an event's value (`abs(data.x)`
# of "\x1b[2J": review).


def shown(text: str) -> str:
    r"""`text` with its control characters escaped (`\x1b`, `\u202e`), for a terminal."""
    return TEXT_CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class Table(RichTable):
    """Rich's table, its cells of text `shown`: they hold what projects and receivers
    wrote."""

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(shown(c) if isinstance(c, str) else c for c in cells), **options)


_LINKS = ("tcp://", "udp://", "sctp://")  # what a Kubernetes service link's values start with


def misspelt(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The `DISPATCHER_*` variables of `environ` that no setting reads but one is spelt
    like, each with it: pydantic-settings ignores them, so `DISPATCHER_SHUTDOWN_GRACEE=3`
    left the grace at 20 s without a word (review). Others (`DISPATCHER_PG_BIN`) pass, and
    so do those Kubernetes makes of a Service named `dispatcher...` (`DISPATCHER_PORT=
    tcp://...`, `..._SERVICE_HOST`, `..._PORT_8080_TCP`)."""
    settings = [f"DISPATCHER_{name.upper()}" for name in Settings.model_fields]
    found = []
    for name in sorted(n for n in environ if n.startswith("DISPATCHER_") and n not in settings):
        if "_SERVICE_" in name or "_PORT_" in name or environ[name].startswith(_LINKS):
            continue  # a service link's (its values are addresses)
        if like := difflib.get_close_matches(name, settings, n=1, cutoff=0.85):
            found.append((name, like[0]))
    return found


def tagged(tag: str, style: str, rest: str = "") -> Text:
    """`tag` in `style`, then `rest` as it is (its control characters escaped)."""
    return Text.assemble((tag, style), shown(rest))


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value stops the command with a clear message,
    and a variable spelt like a setting but none is said (`misspelt`)."""
    for name, like in misspelt(os.environ):
        said = f": {name} is no setting, ignored (not {like}?)"
        err.print(tagged("warning", "yellow", said), soft_wrap=True)  # one line in a log
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():  # a check of several settings names them in its message
            name = "_".join(str(p) for p in error["loc"]).upper()
            where = f" DISPATCHER_{name}:" if name else ":"
            err.print(tagged("configuration error", "red", f"{where} {error['msg']}"))
        raise typer.Exit(2) from None


# the positions of the shards this command's start-up check found silent (`checked`)
_silent: list[int] = []


def with_redis_url(settings: Settings) -> Settings:
    """DISPATCHER_REDIS_URL (checked, see `checked`), else the embedded Redis of a
    `dispatcher run` on this folder."""
    _silent.clear()  # this command's (`checked`): one process may run several (tests)
    if settings.redis_url is not None:
        return checked(settings)
    running = EmbeddedRedis(settings.data_dir).running_url()
    if running is None:
        err.print(
            tagged(
                "no Redis",
                "red",
                ": set DISPATCHER_REDIS_URL, or start `dispatcher run` (its "
                f"embedded Redis in {settings.data_dir} is found automatically)",
            )
        )
        raise typer.Exit(2)
    return settings.model_copy(update={"redis_url": running})


def checked(settings: Settings) -> Settings:
    """`settings` once `check_shards` found its Redis settings workable: one that cannot
    work (an unknown sentinel master, no sentinel answering, too few replicas, a reordered
    list of shards) stops the command with a message naming it; warnings go to stderr.
    The shards that did not answer are kept for `on_router`."""
    try:
        found = asyncio.run(check_shards(settings))
    except InvalidSetting as exc:
        err.print(tagged("configuration error", "red", f" {exc.param}: {exc.message}"))
        raise typer.Exit(2) from None
    for warning in found.warnings:
        err.print(tagged("warning", "yellow", f": {warning}"))
    _silent[:] = found.silent
    return settings


def embedded_postgres(settings: Settings) -> EmbeddedPostgres:
    """The private PostgreSQL of `DISPATCHER_HISTORY_URL=embedded`, its data in the data
    folder, beside the embedded Redis's."""
    return EmbeddedPostgres(data_dir=settings.data_dir / "postgres")


def with_history_url(settings: Settings) -> Settings:
    """`DISPATCHER_HISTORY_URL=embedded`: the PostgreSQL of a `dispatcher run` on this
    folder; any other value as it is."""
    if settings.history_url != EMBEDDED:
        return settings
    running = embedded_postgres(settings).running_url()
    if running is None:
        err.print(
            tagged(
                "no embedded PostgreSQL",
                "red",
                ": start `dispatcher run` with "
                f"DISPATCHER_HISTORY_URL=embedded (its data in {settings.data_dir}) first",
            )
        )
        raise typer.Exit(2)
    return settings.model_copy(update={"history_url": running})


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(factory())
    except DispatcherError as exc:
        err.print(tagged("error", "red", f": {exc.message}"))
        raise typer.Exit(1) from None
    except REDIS_ERRORS as exc:
        err.print(tagged("Redis unreachable", "red", f": {exc}"))
        raise typer.Exit(1) from None


def on_router(body: Callable[[Router], Awaitable[T]], *, fleet: bool = False) -> T:
    """Run `body` with the router over the configured (or embedded) Redis's shards, once
    shard 0 says where each project is (waited for up to `DISPATCHER_REDIS_TIMEOUT`: an
    operator is told, not left waiting); a `fleet` view of every shard goes on without."""
    settings = with_history_url(with_redis_url(load_settings()))
    wait_s = settings.redis_timeout
    if 0 in _silent:  # found silent at start: not waited for again
        shards = shards_of(settings)
        if fleet or len(shards) == 1:  # the others' view; one Redis: every project on it
            wait_s = 0.0  # (its command may need only PostgreSQL: a history page)
        else:  # nothing to do without shard 0 (it says where each project is)
            _home_silent(shards)

    async def go() -> T:
        async with Router.open(settings, home_wait_s=wait_s, unread_ok=fleet) as router:
            return await body(router)

    return run_async(go)


def _home_silent(shards: list[Shard]) -> NoReturn:
    late = "did not answer within DISPATCHER_REDIS_TIMEOUT"
    if all(shard.url == shards[0].url for shard in shards):  # one Redis, or one cluster
        err.print(tagged("Redis unreachable", "red", f": {redacted(shards[0].url)} {late}"))
    else:
        err.print(tagged("error", "red", f": {UNREAD} (it {late})"))
    raise typer.Exit(1)


PARTIAL_EXIT = 3  # a fleet view printed without the shards that did not answer


def on_fleet(body: Callable[[Router, list[int]], Awaitable[T]]) -> tuple[T, list[int]]:
    """`on_router` for a view over every shard: `body` gets a list to add the positions of
    the shards that did not answer to (`views.answers`); returns what it returned, and it."""
    silent: list[int] = []
    return on_router(lambda router: body(router, silent), fleet=True), silent


def partial_end(silent: list[int]) -> None:
    """After a fleet view is printed: name the shards it lacks, and exit `PARTIAL_EXIT`."""
    if silent:
        shards = ", ".join(str(index) for index in sorted(silent))
        err.print(
            tagged(
                "partial",
                "yellow",
                f": shard(s) {shards} did not answer within DISPATCHER_REDIS_TIMEOUT; "
                f"shown: the others' (exit {PARTIAL_EXIT})",
            )
        )
        raise typer.Exit(PARTIAL_EXIT)


@contextlib.contextmanager
def counting(doing: str, done: str) -> Iterator[Callable[[int], None]]:
    """A live line "doing: N done" while it runs; call what it yields with each step's count."""
    with console.status(doing) as line:
        total = 0

        def advance(n: int) -> None:
            nonlocal total
            total += n
            line.update(f"{doing}: {total} {done}")

        yield advance


def fmt_ms(ms: int, settings: Settings) -> str:
    return format_ms(ms, settings.tz)


def records_table(records: list[HistoryRecord], settings: Settings) -> Table:
    table = Table("id", "time", "status", "code", "attempt", "ms", "delivery", "error")
    for rec in records:
        table.add_row(
            str(rec.id),
            fmt_ms(rec.created_time, settings),
            rec.status.value,
            str(rec.response_code or ""),
            str(rec.attempt),
            str(rec.duration_ms or ""),
            rec.delivery_id or "",
            (rec.error_msg or "")[:60],
        )
    return table
