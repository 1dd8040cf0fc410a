"""Shards' failing callbacks as one view (`dispatcher.failing`): a callback read on several
shards counted once, a moving project's counted on its own shard alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.failing import (
    PROJECTS_SHOWN,
    SHOWN_PER_PROJECT,
    Failing,
    FailingGroup,
    FailingView,
)
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["merged"]


def merged(
    found: Sequence[FailingView], rows: int = SHOWN_PER_PROJECT, projects: int = PROJECTS_SHOWN
) -> FailingView:
    """Shards' views as one, `rows` of each project and the `projects` with the most
    failures (and the platform's) shown: a callback read on several shards (a platform-wide
    one fails on each) shown and counted once, with its worst count. A group counted 0 (a
    moving project's copies, read on a shard other than its own: `read`'s `elsewhere`)
    adds its rows, and no count but theirs."""
    best: dict[str, dict[int, Failing]] = {}
    counted: dict[str, int] = {}
    read_rows: dict[str, int] = {}
    counted_ids: dict[str, set[int]] = {}
    again = 0  # projects counted on more than one shard
    for group in (group for view in found for group in view.groups):
        name = group.project_id
        of = best.setdefault(name, {})
        if group.count:
            again += name in counted
            counted[name] = counted.get(name, 0) + group.count
            read_rows[name] = read_rows.get(name, 0) + len(group.shown)
            counted_ids.setdefault(name, set()).update(f.callback_id for f in group.shown)
        for one in group.shown:
            seen = of.get(one.callback_id)
            if seen is None or one.failures > seen.failures:
                of[one.callback_id] = one
    twice = {n: read_rows[n] - len(ids) for n, ids in counted_ids.items()}  # read again
    count = {n: max(counted.get(n, 0) - twice.get(n, 0), len(of)) for n, of in best.items()}
    groups = [
        FailingGroup(name, count[name], tuple(_worst(of.values())[:rows]))
        for name, of in best.items()
        if count[name] > 0
    ]
    groups.sort(key=lambda g: (-max((f.failures for f in g.shown), default=0), g.project_id))
    kept = [g for i, g in enumerate(groups) if i < projects or g.project_id == PLATFORM_PROJECT]
    return FailingView(
        total=sum(v.total for v in found) - sum(twice.values()),
        projects=sum(v.projects for v in found) - again,
        groups=tuple(kept),
        indexed=all(v.indexed for v in found),
    )


def _worst(found: Iterable[Failing]) -> list[Failing]:
    return sorted(found, key=lambda f: (-f.failures, f.callback_id))
