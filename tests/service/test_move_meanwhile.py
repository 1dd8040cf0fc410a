"""What changes on a moving project's old shard while its move runs, and what the move
makes of it, on two real shards: the retention sweep removing the oldest records of an
index the move is copying."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dispatcher.clock import now_ms
from dispatcher.history.moving import copy_project
from dispatcher.history.redis import RedisHistory
from dispatcher.shards.router import Router
from tests.service.test_shard_growth import two_empty_shards

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import pytest

    from dispatcher.embedded import EmbeddedRedis
    from dispatcher.history.record import AttemptRecord

DAY_MS = 86_400_000
URL = "http://127.0.0.1:9/h"


def _record(created_ms: int) -> AttemptRecord:
    return {
        "projectId": "mv", "callBackUrl": URL, "events": "BUILD_END", "status": "SUCCESS",
        "createdTime": created_ms, "startTime": created_ms, "endTime": created_ms,
        "requestBody": "{}", "deliveryId": "mv:e.1",
    }  # fmt: skip


async def test_a_history_copy_misses_no_record_when_the_retention_sweep_runs_meanwhile(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index of 1,000 records, the 20 oldest past the retention; the old shard's
    retention sweep (a cron job every 5 minutes) runs between two reads of the index by
    the copy, and removes those 20. Every one of the 980 within the retention is copied.
    Before, the copy read the index by position (ZRANGE start..start+499): its second page
    began 20 records late, those 20 were never read, and the move then removed them from
    the old shard: gone from both (review)."""
    async with Router.open(two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        assert isinstance(src.history, RedisHistory) and isinstance(dst.history, RedisHistory)
        now = now_ms()
        for n in range(20):
            await src.history.add(_record(now - 7 * DAY_MS - 60_000 + n))
        for n in range(980):
            await src.history.add(_record(now - DAY_MS + n))
        real: Callable[..., Awaitable[Any]] = src.redis.execute_command
        reads: list[str] = []
        swept: list[int] = []

        async def sweeping(*args: Any, **options: Any) -> Any:
            """The sweep runs before the copy's second read of an index, whatever read."""
            name = args[1] if len(args) > 1 else ""
            if args[0] in ("ZRANGE", "ZSCAN", "ZRANGEBYSCORE") and str(name).startswith(
                src.keys.HISTORY_INDEX_PREFIX
            ):
                reads.append(args[0])
                if len(reads) == 2:
                    swept.append(await src.history.sweep())
            return await real(*args, **options)

        monkeypatch.setattr(src.redis, "execute_command", sweeping)
        await copy_project(src.history, dst.history, "mv", lambda: None)
        monkeypatch.undo()
        assert swept == [20]  # between two reads
        page = await dst.history.query(
            "mv", URL, "BUILD_END", start_ms=now - 2 * DAY_MS, end_ms=now, page=1, page_size=1
        )
        assert page.count == 980
