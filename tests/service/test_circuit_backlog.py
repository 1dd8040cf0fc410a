"""A backlog behind an open circuit breaker: each delivery goes down its own schedule to its
final record, whatever the backlog (`dispatcher/worker/circuit.py`)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.worker.circuit import OPEN, MarkWaited, next_attempt
from tests.helpers import Receiver, RunWorker, all_records

DEAD = "http://127.0.0.1:9/down"  # nothing listens: every request fails at once


def deferrals(reason: str) -> float:
    found = REGISTRY.get_sample_value("dispatcher_deliveries_deferred_total", {"reason": reason})
    return found or 0.0


def circuit_deferrals() -> float:
    return deferrals("circuit")


@pytest.mark.parametrize("backlog", [6, 24])
async def test_a_backlog_behind_an_open_circuit_ends_on_its_schedule(
    settings: Settings, redis: Redis, run_worker: RunWorker, backlog: int
) -> None:
    """`backlog` deliveries to a dead host, its breaker open after one failure: each is
    put off at most once an attempt (at least its next step, or until the circuit may be
    probed), then, still open, its attempt is recorded failed without a request, and the
    next is due at once. Before, each went back to the queue due the moment the circuit
    half-opened, where one delivery a cool-down got through: 6 deliveries were put off 50
    times, 24 were put off 694 times (29 each) and claimed 766 times, their last final
    record 15 s after the emit for a schedule of 0.1 s (review)."""
    settings = settings.model_copy(
        update={"circuit_threshold": 1, "circuit_cooldown": 0.3,
                "retry_schedule": (0.05, 0.05), "retry_jitter": 0.2}
    )  # fmt: skip
    await Registry(redis).create("demo", DEAD, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for i in range(backlog):
        await producer.emit("demo", "BUILD_END", {"i": i})
    before = circuit_deferrals()
    worker = await run_worker(settings)
    deferred = circuit_deferrals() - before
    attempts = settings.max_attempts
    by_delivery: dict[str, list[int]] = defaultdict(list)
    records = await all_records(redis, settings, DEAD)
    for record in records:
        by_delivery[record.delivery_id].append(record.attempt)
    # put off at most once an attempt, claimed at most twice an attempt (and the fan-out)
    assert deferred <= backlog * attempts
    assert worker.jobs_complete <= backlog * (1 + 2 * attempts)
    unsent = [r for r in records if r.error_msg == OPEN]
    assert unsent and all(r.response_code is None and r.duration_ms == 0 for r in unsent)
    # every delivery: each attempt once, in order, the last one final (none started over)
    assert len(by_delivery) == backlog
    assert all(sorted(made) == list(range(1, attempts + 1)) for made in by_delivery.values())
    assert sum(r.final for r in records) == backlog


async def test_an_attempt_put_off_by_an_open_circuit_is_sent_when_it_may_be_probed(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """Waiting for a circuit is not an attempt: a receiver down for one request opens the
    breaker; the retry due meanwhile is put off, then sent as the circuit's probe, and
    succeeds (no unsent record)."""
    settings = settings.model_copy(
        update={"circuit_threshold": 1, "circuit_cooldown": 0.3, "retry_schedule": (0.05, 0.05)}
    )
    answers = iter([500])

    async def down_once(_: web.Request) -> web.StreamResponse:
        return web.Response(status=next(answers, 200))

    url = receiver.script("/flaky", down_once)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    before = circuit_deferrals()
    await run_worker(settings)
    records = await all_records(redis, settings, url)
    assert [(r.attempt, r.response_code) for r in records] == [(1, 500), (2, 200)]
    assert circuit_deferrals() - before == 1 and len(receiver.requests("/flaky")) == 2


async def test_the_waited_mark_never_goes_over_a_later_count_or_done(redis: Redis) -> None:
    """The put-off's mark (`MarkWaited`): over none or the count it read, never over a later
    attempt's count or "done" (a worker paused past its lease writes it late)."""
    progress = Keys().delivery("demo:evt.1@1")
    for found, made, left in [
        (None, "0", b"0w"), (b"0", "0", b"0w"), (b"1", "1", b"1w"),
        (b"2", "1", b"2"), (b"done", "1", b"done"), (b"1w", "0", b"1w"),
    ]:  # fmt: skip
        await redis.delete(progress)
        if found is not None:
            await redis.set(progress, found)
        await MarkWaited(progress, made, 60).run(redis)
        assert await redis.get(progress) == left
        if left != found:  # written, with the marks' time to live
            assert 0 < await redis.ttl(progress) <= 60
    marks = [None, b"0", b"0w", b"3w"]
    assert [next_attempt(m) for m in marks] == [(1, False), (1, False), (1, True), (4, True)]
