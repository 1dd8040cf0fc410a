"""How a shard's failing claims are logged (`Served.claim`): once as an outage begins,
again every minute while it lasts or when Redis starts saying it is full, and once as it
ends; a shard whose claims fail now and then, once a minute at most."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from structlog.testing import capture_logs

from dispatcher.worker.served import Served


class Flaky:
    """Claims that fail as `plan` says (True: fail), in turn."""

    def __init__(self, plan: list[Any]) -> None:
        self.plan = plan

    async def claim(self, share: int, **_: object) -> list[object]:
        failure = self.plan.pop(0)
        if failure:
            raise failure
        return []


def shard(plan: list[Any]) -> Served:
    engine = SimpleNamespace(shares=SimpleNamespace(claim_budgets=lambda: ({}, {})))
    services = SimpleNamespace(shard=SimpleNamespace(index=3))
    return Served(services, None, Flaky(plan), engine)  # type: ignore[arg-type]  # stand-ins


async def said(run: Served, claims: int, clock: list[float], monkeypatch: Any) -> list[str]:
    monkeypatch.setattr("dispatcher.worker.served.time.monotonic", lambda: clock[0])
    with capture_logs() as logs:
        for _ in range(claims):
            await run.claim(10, [], 0.01)
            clock[0] += 1.0
    return [entry["event"] for entry in logs if entry["event"].startswith("worker.claim")]


async def test_an_outage_is_said_as_it_begins_each_minute_and_as_it_ends(monkeypatch: Any) -> None:
    down = RedisConnectionError("refused")
    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    run = shard([down] * 70 + [full] * 5 + [None])
    clock = [1000.0]
    events = await said(run, 76, clock, monkeypatch)
    assert events == [
        "worker.claim_failed",  # its first failure
        "worker.claim_failed",  # a minute on
        "worker.claim_failed",  # Redis full now
        "worker.claim_resumed",
    ], events


async def test_claims_failing_now_and_then_are_said_once_a_minute(monkeypatch: Any) -> None:
    """Every other claim fails for two minutes: each failure and each end was a line,
    60 of each (review); now two a minute."""
    down = RedisConnectionError("reset")
    run = shard([down, None] * 60)
    events = await said(run, 120, [1000.0], monkeypatch)
    assert events.count("worker.claim_failed") == 2, events
    assert events.count("worker.claim_resumed") == 2, events


async def test_redis_full_and_away_in_turn_are_said_once_a_minute(monkeypatch: Any) -> None:
    """Full, then away, then full again...: the first switch to full is said at once, the
    next not again within the minute (each was: review)."""
    down = RedisConnectionError("refused")
    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    events = await said(shard([down, full] * 30), 60, [1000.0], monkeypatch)
    assert events.count("worker.claim_failed") == 2, events
