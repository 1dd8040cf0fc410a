"""`Recent.merged`: the every-URL listings' merge of pages read after one cursor (the
project's failures index, the first URLs' indexes), page by page."""

from __future__ import annotations

from dispatcher.history.window import Cursor, Recent
from dispatcher.models import HistoryRecord


def rec(ms: int, record_id: int) -> HistoryRecord:
    return HistoryRecord.model_validate({
        "id": record_id, "projectId": "demo", "callBackUrl": "http://127.0.0.1/h",
        "events": "BUILD_END", "status": "FAILED", "startTime": ms, "endTime": ms,
        "createdTime": ms,
    })  # fmt: skip


def source(
    entries: list[tuple[int, int]], gone: set[int], before: Cursor | None, limit: int
) -> Recent:
    """A store's page of `entries` (ms, id), newest first, after `before`: its records
    are those not `gone`; a next page from its last entry when there were more."""
    older = sorted((e for e in entries if before is None or e < tuple(before)), reverse=True)
    page = older[:limit]
    records = [rec(ms, i) for ms, i in page if i not in gone]
    return Recent(records, Cursor(*page[-1]) if len(older) > limit and page else None)


def test_pages_through_two_sources_each_record_once_though_records_are_gone() -> None:
    """Two sources with a record in both (a failure in the project's index and in its
    URL's), ties at one millisecond, and records gone before their entries: paged by 2,
    every record still there is shown once, in order, and paging ends."""
    failures = [(10, 1), (20, 2), (20, 3), (30, 4), (40, 5), (50, 6), (60, 7)]
    urls = [(15, 8), (20, 3), (35, 9), (45, 10), (55, 11)]
    gone = {5, 6, 10}  # evicted: their entries stay
    expected = sorted({*failures, *urls} - {e for e in {*failures, *urls} if e[1] in gone})
    for limit in (1, 2, 3):
        seen: list[int] = []
        before = None
        for _ in range(30):
            page = Recent.merged(
                [source(failures, gone, before, limit), source(urls, gone, before, limit)], limit
            )
            seen += [r.id for r in page.records]
            if page.next is None:
                break
            assert before is None or page.next < before  # always older: no loop
            before = page.next
        assert seen == [i for _, i in reversed(expected)], limit


def test_a_record_in_both_pages_is_shown_once() -> None:
    both = [(20, 3), (30, 4)]
    page = Recent.merged([source(both, set(), None, 5), source(both, set(), None, 5)], 5)
    assert [r.id for r in page.records] == [4, 3] and page.next is None
