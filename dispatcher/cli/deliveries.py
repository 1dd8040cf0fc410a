"""Events and what became of them: `emit`, `dead`, `redeliver`, `sweep`, `status`
(`history` has its own module)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from dispatcher import tracing
from dispatcher.cli.common import (
    Table,
    app,
    console,
    counting,
    err,
    fmt_ms,
    load_settings,
    on_fleet,
    on_router,
    partial_end,
    records_table,
    tagged,
)
from dispatcher.errors import Unavailable
from dispatcher.jobs import new_event_id
from dispatcher.models import RedeliveryResult
from dispatcher.shards import views
from dispatcher.shards.router import Router
from dispatcher.stats import duration


def _parse_data(data: str) -> dict[str, Any]:
    try:
        raw = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
        value = orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError) as exc:
        err.print(tagged("--data", "red", f" is not valid JSON (or @file): {exc}"))
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        err.print(tagged("--data", "red", " must be a JSON object"))
        raise typer.Exit(2)
    return value


@app.command()
def emit(
    project: Annotated[str, typer.Option(help="Project id")],
    event: Annotated[str, typer.Option(help="Event name, e.g. BUILD_END")],
    data: Annotated[str, typer.Option(help="JSON object, or @file.json")] = "{}",
    event_id: Annotated[str | None, typer.Option(help="Idempotency key")] = None,
) -> None:
    """Queue one event for delivery; prints its event id. A W3C trace context in
    TRACEPARENT (and TRACESTATE) of the environment goes with it to every receiver.
    Without --event-id the command makes one, and names it when Redis does not answer in
    time, with the command that emits the same event again safely."""
    payload = _parse_data(data)
    chosen = event_id or new_event_id()

    async def go(router: Router) -> str:
        try:
            return await router.of(project).producer.emit(project, event, payload, event_id=chosen)
        except Unavailable:
            if event_id is None:  # the caller knows an id of its own
                # the data as parsed (a file's, a multi-line text's: one ASCII line), the
                # command on a line of its own, never wrapped (pasted, a wrapped one ran
                # its first line alone: an emit under a new id)
                one_line = json.dumps(payload, separators=(",", ":"))
                again = ["dispatcher", "emit", "--project", project, "--event", event]
                again += ["--data", one_line, "--event-id", chosen]
                err.print(tagged("event id", "yellow", f" {chosen}; to emit it again:"))
                err.print(shlex.join(again), soft_wrap=True, highlight=False)
            raise

    with tracing.received(tracing.from_environment()):
        console.print(on_router(go))


@app.command()
def dead(
    project: Annotated[str | None, typer.Option(help="One project (default: all)")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first")] = 50,
) -> None:
    """Dead letters: the latest deliveries that gave up (their final attempt)."""
    settings = load_settings()
    found, silent = on_fleet(lambda r, silent: views.dead_letters(r, project, limit, silent))
    console.print(records_table(found, settings))
    console.print(f"{len(found)} dead letters")
    partial_end(silent)


@app.command()
def redeliver(
    record_id: Annotated[int | None, typer.Argument(help="One history record id")] = None,
    project: Annotated[str | None, typer.Option(help="Window: project id")] = None,
    url: Annotated[str | None, typer.Option(help="Window: callback URL")] = None,
    event: Annotated[str | None, typer.Option(help="Window: event name")] = None,
    since: Annotated[str | None, typer.Option(help="Window: 'yyyy-MM-dd HH:mm:ss'")] = None,
    until: Annotated[str | None, typer.Option(help="Window: 'yyyy-MM-dd HH:mm:ss'")] = None,
) -> None:
    """Send recorded requests again (same body and delivery id, current token): one record
    by id, or every delivery of a window that finally failed."""
    if record_id is not None:
        console.print(f"queued {on_router(lambda r: _redeliver(r, record_id))}")
        return
    if not (project and url and event):
        err.print("give a record id, or --project, --url and --event (and a window)")
        raise typer.Exit(2)

    async def window(router: Router) -> RedeliveryResult:
        with counting("redelivering", "queued") as advance:
            return await views.redeliver_failed(
                router, project, url, event, since, until, on_queued=advance
            )

    result = on_router(window)
    console.print(f"queued {result.queued} redeliveries")
    for count, what in (
        (
            result.already_queued,
            "already queued by an earlier call (not in the history yet), not again",
        ),
        (result.body_not_kept, "left out: request body not kept whole (cut, or lost)"),
        (result.callback_gone, "left out: callback disabled or deleted"),
    ):
        if count:
            console.print(f"{count} {what}")


@app.command()
def sweep() -> None:
    """Enforce the history retention now (the workers also do it every 5 minutes): Redis
    records past it, or PostgreSQL day partitions (and make the next days' ahead)."""

    async def go(router: Router) -> str:
        unit = router.home.history.sweep_unit
        with counting("sweeping", unit) as advance:
            removed = await router.each(lambda s: s.history.sweep(on_batch=advance))
            return f"removed {sum(removed)} {unit}"

    console.print(on_router(go))


UNKNOWN = "? (shard 0 did not answer)"


@app.command()
def status() -> None:
    """Queue depth, live workers, failing and disabled callbacks, the last hour and day."""
    st, silent = on_fleet(views.status)
    table = Table("what", "value", show_header=False)
    table.add_row("queue: jobs due", str(st.queue_due))
    table.add_row("queue: oldest due (s)", f"{st.oldest_due_s:.1f}")
    if st.oldest_due_job:  # one project's backlog, or the fleet's lateness: whose it is
        table.add_row("queue: oldest due job", st.oldest_due_job)
        table.add_row("queue: oldest due project", st.oldest_due_project or "?")
    home = st.of_home  # (its heartbeats and statistics are shard 0's: else unknown)
    table.add_row("workers alive", str(len(st.workers)) if home else UNKNOWN)
    for w in st.workers:
        table.add_row("  worker", f"{w['host']} pid {w['pid']}")
    table.add_row("callbacks failing", str(st.failing.total))
    table.add_row("callbacks failing: projects", str(st.failing.projects))
    table.add_row("callbacks disabled", str(st.disabled))
    table.add_row("ordered lanes blocked", str(st.lanes.blocked))
    for lane in st.lanes.shown:
        since = fmt_ms(lane.since_ms, load_settings())
        table.add_row(
            f"  lane {lane.callback_id} {lane.project_id} {lane.key!r}",
            f"head {lane.head}, {lane.waiting} waiting, since {since}",
        )
    for outcome in ("success", "retry", "failed", "gone"):
        count = str(st.last_hour.get(outcome, 0)) if home else UNKNOWN
        table.add_row(f"last hour: {outcome}", count)
    for span in (st.hour, st.day):
        percentiles = f"{duration(span.p50_ms)} / {duration(span.p99_ms)}" if home else UNKNOWN
        table.add_row(f"last {span.span.name}: attempt duration p50 / p99", percentiles)
    console.print(table)
    partial_end(silent)


async def _redeliver(router: Router, record_id: int) -> str:
    """Redeliver a record known by its id alone, from the shard that holds it."""
    holder = await views.holder(router, record_id, None)
    return await holder.redeliver(record_id)
