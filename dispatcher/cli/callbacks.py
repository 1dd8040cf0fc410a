"""`callbacks`, `roles` and `tokens`: who gets which event, who may manage them, and the
encryption of their secrets."""

from __future__ import annotations

from typing import Annotated

import typer

from dispatcher.auth import Role
from dispatcher.catalogue import CATALOGUE
from dispatcher.cli.common import (
    CLI_USER,
    Table,
    console,
    err,
    fmt_ms,
    load_settings,
    on_fleet,
    on_router,
    partial_end,
    tagged,
)
from dispatcher.failing import ONE_PROJECT_MOST, PROJECTS_SHOWN, SHOWN_PER_PROJECT
from dispatcher.headers import AuthHeader
from dispatcher.models import PLATFORM_PROJECT, Callback, Region
from dispatcher.registry import Options, Registration
from dispatcher.services import DEFAULT_OVERLAP_HOURS
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.tokens import TokenCipher

__all__ = ["callbacks_app", "roles_app", "tokens_app"]

callbacks_app = typer.Typer(help="Register, list and switch callbacks.", no_args_is_help=True)
roles_app = typer.Typer(help="Who is admin or member of which project.", no_args_is_help=True)
tokens_app = typer.Typer(help="Encryption of secret tokens at rest.", no_args_is_help=True)


ProjectOption = Annotated[
    str | None, typer.Option(help="Project id (or --all-projects for platform-wide callbacks)")
]
AllProjectsOption = Annotated[
    bool,
    typer.Option(
        "--all-projects", help=f"Platform-wide callbacks ({PLATFORM_PROJECT}): every project's"
    ),
]
PipelineOption = Annotated[str | None, typer.Option(help="Pipeline id: that pipeline's callbacks")]


def _owner(project: str | None, all_projects: bool) -> str:
    """The project whose callbacks a command is about: --project, or the platform's."""
    if all_projects == (project is not None):
        err.print(tagged("error", "red", ": give --project P or --all-projects (one of them)"))
        raise typer.Exit(2)
    return PLATFORM_PROJECT if all_projects else str(project)


def _auth_header(spec: str | None) -> AuthHeader | None:
    """`--auth-header 'Name: value'` as (name, value), like curl's -H."""
    if spec is None:
        return None
    name, colon, value = spec.partition(":")
    if not colon:
        err.print(tagged("error", "red", ": --auth-header takes 'Name: value'"))
        raise typer.Exit(2)
    return name.strip(), value.strip()


@callbacks_app.command("list")
def callbacks_list(
    project: ProjectOption = None,
    all_projects: AllProjectsOption = False,
    pipeline: PipelineOption = None,
    page: int = 1,
    page_size: int = 50,
) -> None:
    """A project's callbacks (its pipelines' too), one pipeline's, or the platform-wide
    ones; secrets never shown."""
    owner = _owner(project, all_projects)
    settings = load_settings()
    result = on_router(
        lambda r: r.callbacks(owner, changing=False).callbacks(
            owner, page, page_size, pipeline_id=pipeline
        )
    )
    table = Table(
        "id",
        "level",
        "pipeline",
        "event",
        "url",
        "region",
        "enabled",
        "disabled reason",
        "secrets",
        "controls",
    )
    for cb in result.records:
        table.add_row(
            str(cb.id),
            cb.level.value,
            cb.pipeline_id or "",
            cb.event.value,
            cb.url,
            cb.region.value,
            "yes" if cb.enabled else "no",
            cb.disabled_reason or "",
            _secrets(cb, settings),
            _controls(cb),
        )
    console.print(table)
    console.print(f"page {result.page}/{max(result.total_pages, 1)}, {result.count} callbacks")


def _secrets(cb: Callback, settings: Settings) -> str:
    """Which secrets a callback has (never them), and a rotation's end."""
    parts = ["token set"] if cb.has_secret_token else []
    parts += ["auth header set"] if cb.has_auth_header else []
    if cb.rotation_end_time is not None:
        parts.append(f"old token signs until {fmt_ms(cb.rotation_end_time, settings)}")
    return ", ".join(parts)


def _controls(cb: Callback) -> str:
    """A callback's limits and filter, and how often its filter failed."""
    parts = [f"{cb.max_per_second}/s"] if cb.max_per_second else []
    parts += [f"{cb.max_in_flight} in flight"] if cb.max_in_flight else []
    if cb.filter is not None:
        parts.append(f"filter: {cb.filter}")
    if cb.order_by is not None:
        parts.append(f"ordered by {cb.order_by}")
    if cb.filter_errors:
        parts.append(f"filter failed on {cb.filter_errors} events: {cb.filter_last_error}")
    return ", ".join(parts)


@callbacks_app.command("failing")
def callbacks_failing(
    project: Annotated[
        str | None, typer.Option(help="That project's failing callbacks, up to --limit")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=ONE_PROJECT_MOST, help="With --project: at most so many")
    ] = 100,
) -> None:
    """Callbacks whose latest deliveries failed (consecutive final failures), by project:
    the worst few of each of the projects with the most failures, or one project's."""
    settings = load_settings()
    rows = limit if project else SHOWN_PER_PROJECT
    found, silent = on_fleet(lambda router, silent: views.failing(router, project, rows, silent))
    table = Table("project", "id", "failures", "since", "last error")
    for group in found.groups:
        for f in group.shown:
            since, error = fmt_ms(f.since_ms, settings), f.last_error[:80]
            table.add_row(group.project_id, str(f.callback_id), str(f.failures), since, error)
        if group.count > len(group.shown):
            table.add_row(group.project_id, "…", f"{group.count - len(group.shown)} more", "", "")
    console.print(table)
    if not found.indexed:
        console.print(
            "what workers of the version before wrote or still write is being indexed "
            "(by the sweep, every 5 minutes): some may not show yet"
        )
    if project:
        count = sum(group.count for group in found.groups)
        console.print(f"{count} failing callbacks of project {project} ({found.total} in all)")
        partial_end(silent)
        return
    console.print(f"{found.total} failing callbacks, of {found.projects} projects")
    if found.projects > len(found.groups) or found.total > len(found.shown):
        console.print(
            f"shown: the worst {SHOWN_PER_PROJECT} of each of the {PROJECTS_SHOWN} projects "
            "with the most failures; --project P lists one project's"
        )
    partial_end(silent)


# The receiver controls of `callbacks add` (see dispatcher/registry/options.py).
MaxPerSecondOption = Annotated[
    int | None, typer.Option(help="Start at most this many deliveries a second (fleet-wide)")
]
MaxInFlightOption = Annotated[
    int | None, typer.Option(help="At most this many requests at once (fleet-wide)")
]
FilterOption = Annotated[
    str | None,
    typer.Option("--filter", help="JMESPath over {event, projectId, data}: deliver when truthy"),
]
OrderByOption = Annotated[
    str | None,
    typer.Option(help="Ordered delivery: a dotted path into the event's data (buildId) or '*'"),
]


@callbacks_app.command("add")
def callbacks_add(
    url: Annotated[str, typer.Option(help="Callback URL")],
    event: Annotated[str, typer.Option(help="Event name(s), comma-separated")],
    project: ProjectOption = None,
    all_projects: AllProjectsOption = False,
    pipeline: PipelineOption = None,
    region: Annotated[Region, typer.Option(help="Region")] = Region.DEVNET,
    token: Annotated[str | None, typer.Option(help="Secret token")] = None,
    auth_header: Annotated[
        str | None,
        typer.Option(help="'Name: value' of a header sent with every delivery (kept secret)"),
    ] = None,
    max_per_second: MaxPerSecondOption = None,
    max_in_flight: MaxInFlightOption = None,
    filter_: FilterOption = None,
    order_by: OrderByOption = None,
) -> None:
    """Register a URL for one or more events (an upsert), under the region's address policy:
    on a project, one of its pipelines (--pipeline), or every project (--all-projects),
    with its receiver controls."""
    owner, header = _owner(project, all_projects), _auth_header(auth_header)
    options = Options(max_per_second, max_in_flight, filter_, order_by)
    result = on_router(
        lambda r: r.callbacks(owner).register_batch(
            Registration(owner, url, region, CLI_USER, token, pipeline, header, options), event
        )
    )
    for name in result.success_events:
        console.print(tagged("registered", "green", f" {name}"))
    for name, reason in result.failure_events.items():
        err.print(tagged("refused", "red", f" {name}: {reason}"))
    if result.failure_events:
        raise typer.Exit(1)


@callbacks_app.command("rm")
def callbacks_rm(
    callback_id: int,
    project: ProjectOption = None,
    all_projects: AllProjectsOption = False,
    pipeline: PipelineOption = None,
) -> None:
    """Delete a callback."""
    owner = _owner(project, all_projects)
    on_router(lambda r: r.callbacks(owner).delete(callback_id, owner, pipeline_id=pipeline))
    console.print(f"deleted callback {callback_id}")


@callbacks_app.command("rotate")
def callbacks_rotate(
    callback_id: int,
    token: Annotated[str, typer.Option(help="The new secret token")],
    project: ProjectOption = None,
    all_projects: AllProjectsOption = False,
    pipeline: PipelineOption = None,
    overlap_hours: Annotated[
        float, typer.Option(help="Hours the old token keeps signing beside the new one")
    ] = DEFAULT_OVERLAP_HOURS,
) -> None:
    """Rotate a callback's secret token; both sign until the overlap ends."""
    owner, settings = _owner(project, all_projects), load_settings()
    found = on_router(
        lambda r: r.callbacks(owner).rotate_secret(
            callback_id, owner, token, overlap_hours, pipeline_id=pipeline
        )
    )
    if found.rotation_end_time is None:
        console.print(f"callback {callback_id}: new token in use, the old one no longer signs")
    else:
        until = fmt_ms(found.rotation_end_time, settings)
        console.print(f"callback {callback_id}: new token in use, the old one signs until {until}")


@callbacks_app.command("events")
def callbacks_events() -> None:
    """The event catalogue: where each event can be subscribed, what emits it."""
    table = Table("event", "levels", "about", "emitted by")
    for info in CATALOGUE:
        levels = ", ".join(level.value for level in info.levels)
        table.add_row(info.event.value, levels, info.about, info.emitted_by)
    console.print(table)


@callbacks_app.command("enable")
def callbacks_enable(callback_id: int) -> None:
    """Enable a callback (also one disabled by endpoint health)."""
    on_router(lambda r: r.switch_anywhere(callback_id, True, by=CLI_USER))
    console.print(f"enabled callback {callback_id}")


@callbacks_app.command("disable")
def callbacks_disable(
    callback_id: int, reason: Annotated[str | None, typer.Option(help="Why")] = None
) -> None:
    """Disable a callback with a reason."""
    on_router(lambda r: r.switch_anywhere(callback_id, False, by=CLI_USER, reason=reason))
    console.print(f"disabled callback {callback_id}")


@roles_app.command("grant")
def roles_grant(
    project: Annotated[str, typer.Option(help="Project id, or * for all")],
    user: Annotated[str, typer.Option(help="User name (X-DEVOPS-UID)")],
    role: Annotated[Role, typer.Option(help="admin or member")] = Role.MEMBER,
) -> None:
    """Give a user a role in a project."""
    on_router(lambda r: r.grant(project, user, role))
    console.print(f"{user} is {role.value} of {project}")


@roles_app.command("revoke")
def roles_revoke(
    project: Annotated[str, typer.Option(help="Project id, or *")],
    user: Annotated[str, typer.Option(help="User name")],
) -> None:
    """Take a user's role in a project away."""
    on_router(lambda r: r.revoke(project, user))
    console.print(f"{user} has no role in {project}")


@roles_app.command("list")
def roles_list(project: Annotated[str, typer.Option(help="Project id, or *")]) -> None:
    """Who has which role in a project."""
    found = on_router(lambda r: r.of(project).roles.list(project))
    table = Table("user", "role")
    for user, role in found.items():
        table.add_row(user, role.value)
    console.print(table)


@tokens_app.command("new-key")
def tokens_new_key() -> None:
    """Print a new Fernet key for DISPATCHER_TOKEN_KEYS."""
    console.print(TokenCipher.new_key())


@tokens_app.command("rotate")
def tokens_rotate() -> None:
    """Re-encrypt every stored token with the first key of DISPATCHER_TOKEN_KEYS; the
    callbacks of projects moving between shards are skipped (exit 1, as while any moved in
    the last 10 minutes: run it again once the moves end, before the old key is dropped).
    A secret no key decrypts is left as it is, its callback named (exit 1)."""
    counts = on_router(lambda r: r.each(lambda s: s.registry.rotate_tokens()))
    console.print(f"re-encrypted {sum(c.rotated for c in counts)} tokens")
    skipped, moving = sum(c.skipped for c in counts), sum(c.moving for c in counts)
    unreadable = [callback for c in counts for callback in c.unreadable]
    if skipped or moving:
        err.print(tagged("warning", "yellow", f": {_skipped(skipped, moving)}"))
    if unreadable:
        err.print(
            tagged(
                "error",
                "red",
                f": {len(unreadable)} callback(s) hold a secret no key of "
                "DISPATCHER_TOKEN_KEYS decrypts, left as it is (stored as given before keys "
                "were set, or under a key dropped since): callback "
                f"{', '.join(unreadable)}; set their token or auth header again",
            )
        )
    if skipped or moving or unreadable:
        raise typer.Exit(1)


def _skipped(skipped: int, moving: int) -> str:
    """What a key rotation left under the old key, or may have, for the moves meanwhile."""
    return (
        f"{skipped} callbacks of moving projects skipped: run rotate again once the moves "
        f"end; keep the old key until a run reports none ({moving} project(s) moving off "
        "a shard or moved off it in the last 10 minutes: a move's copy made while this ran "
        "may hold the old key)"
    )
