"""The shards' failing listings merged (`failing.merged`): a platform-wide callback, which
fails on each shard its events are delivered from, shown and counted once."""

from __future__ import annotations

from dispatcher.failing import Failing, FailingGroup, FailingView, merged
from dispatcher.models import PLATFORM_PROJECT


def _group(project: str, count: int, *rows: tuple[int, int]) -> FailingGroup:
    shown = tuple(Failing(cid, n, 0, "HTTP 500", project) for cid, n in rows)
    return FailingGroup(project, count, shown)


def test_a_platform_callback_failing_on_two_shards_is_shown_and_counted_once() -> None:
    platform = PLATFORM_PROJECT
    one = FailingView(4, 2, (_group("a", 2, (1, 9), (2, 1)), _group(platform, 2, (7, 3), (8, 1))))
    two = FailingView(3, 2, (_group("b", 1, (3, 2)), _group(platform, 2, (7, 5), (9, 1))))
    found = merged([one, two], rows=2)
    assert (found.total, found.projects) == (6, 3)  # 7 once; the platform once
    assert [g.project_id for g in found.groups] == ["a", platform, "b"]
    shared = found.groups[1]
    assert shared.count == 3
    assert [(f.callback_id, f.failures) for f in shared.shown] == [(7, 5), (8, 1)]


def test_past_the_projects_shown_the_platform_stays() -> None:
    """The projects shown are those with the most failures, and the platform's."""
    groups = (_group("a", 1, (1, 9)), _group("b", 1, (2, 5)), _group(PLATFORM_PROJECT, 1, (3, 1)))
    found = merged([FailingView(3, 3, groups)], projects=1)
    assert [g.project_id for g in found.groups] == ["a", PLATFORM_PROJECT]
    assert (found.total, found.projects) == (3, 3)
