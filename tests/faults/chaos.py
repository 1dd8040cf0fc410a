"""What the fault tests share: a receiver that misbehaves on purpose and remembers what it
answered, and the verdict on a run (was any delivery lost, abandoned, ended two ways, or
recorded as a failure while the receiver had answered 2xx?)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiohttp import web
from redis.asyncio import Redis

from dispatcher.clock import now_ms
from dispatcher.history.redis import RedisHistory
from dispatcher.jobs import delivery_of
from dispatcher.keys import Keys
from dispatcher.models import DeliveryStatus, HistoryRecord
from dispatcher.settings import Settings
from tests.helpers import serving as serving_handler

keys = Keys()  # today's key names (one shard)


@dataclass(frozen=True, slots=True)
class Answer:
    """One request the receiver got and what it did: a status code, or "reset"."""

    delivery_id: str
    arrived_ms: int
    answered_ms: int
    answer: int | str


@dataclass
class FlakyReceiver:
    """Answers 500 to `fail` of the requests, resets the connection on `reset` of them, and
    sleeps 0 to `max_delay` seconds before answering; 200 otherwise. Seeded: reproducible.
    `wrong_bodies`: the delivery ids of requests whose body is not JSON, or whose data
    names (`id`) another event than the delivery's."""

    fail: float = 0.0
    reset: float = 0.0
    max_delay: float = 0.0
    seed: int = 7
    answers: list[Answer] = field(default_factory=list)
    wrong_bodies: list[str] = field(default_factory=list)
    base: str = ""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def url(self, path: str) -> str:
        return self.base + path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived = now_ms()
        body = await request.read()
        roll, delay = self.rng.random(), self.rng.uniform(0, self.max_delay)
        if delay:
            await asyncio.sleep(delay)
        delivery_id = request.headers.get("webhook-id") or request.headers["X-DEVOPS-DELIVERY-ID"]
        if not _names_its_event(body, delivery_id):
            self.wrong_bodies.append(delivery_id)
        if roll < self.reset:
            self.answers.append(Answer(delivery_id, arrived, now_ms(), "reset"))
            transport = request.transport
            if transport is not None:  # SO_LINGER 0: the close sends RST
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.close()
            raise asyncio.CancelledError  # aiohttp drops the request without an answer
        status = 500 if roll < self.reset + self.fail else 200
        self.answers.append(Answer(delivery_id, arrived, now_ms(), status))
        return web.Response(status=status, text="flaky" if status == 500 else "ok")

    def answered_2xx(self) -> set[str]:
        return {a.delivery_id for a in self.answers if a.answer == 200}


def _trail(log: Path | None, delivery_ids: list[str], most: int = 30) -> str:
    """The lines of `log` naming each of `delivery_ids` (the last `most` of each)."""
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    return "".join(
        f"\n--- {delivery_id} in {log.name}:\n"
        + "\n".join([line for line in lines if delivery_id in line][-most:])
        for delivery_id in delivery_ids
    )


def _names_its_event(body: bytes, delivery_id: str) -> bool:
    """Whether `body` is the JSON of the event `delivery_id` names (`{project}:{event
    id}.{callback id}`), as far as its data says (`id`)."""
    try:
        data = orjson.loads(body)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    event_id = delivery_id.partition(":")[2].rpartition(".")[0]
    return "id" not in data or data["id"] == event_id


@asynccontextmanager
async def serving(receiver: FlakyReceiver) -> AsyncIterator[FlakyReceiver]:
    async with serving_handler(receiver.handle) as base:
        receiver.base = base
        yield receiver


async def all_records(
    redis: Redis, settings: Settings, project: str, url: str, event: str
) -> list[HistoryRecord]:
    """Every record of (project, url, event) of the last hour, oldest first."""
    history, now = RedisHistory(redis, settings, keys), now_ms()
    found: list[HistoryRecord] = []
    page = 1
    while True:
        result = await history.query(project, url, event, start_ms=now - 3_600_000,
                                     end_ms=now + 60_000, page=page, page_size=100)  # fmt: skip
        found += result.records
        if page >= result.total_pages:
            return sorted(found, key=lambda r: (r.created_time, r.id))
        page += 1


@dataclass
class Verdict:
    """How each expected delivery ended, from history, the dropped list and the receiver."""

    expected: set[str]
    ended: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    abandoned: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)  # by a drop no test allows: why
    # ended, and dropped besides for a reason no test allows: two endings of one delivery
    strays: dict[str, str] = field(default_factory=dict)
    false_failed: list[HistoryRecord] = field(default_factory=list)
    unrecorded: set[str] = field(default_factory=set)  # answered 2xx, no SUCCESS record
    wrong_bodies: list[str] = field(default_factory=list)  # sent without their event's
    seen: dict[int, list[int | str]] = field(default_factory=dict)  # answers in a record's time

    def assert_nothing_lost(self, log: Path | None = None) -> None:
        """Nothing lost; else the summary, and the lines of the workers' `log` that name
        the first deliveries at fault (what they did is how the failure reads)."""
        at_fault = sorted(
            self.lost | self.abandoned | set(self.dropped) | set(self.strays)
            | self.unrecorded | {r.delivery_id or "" for r in self.false_failed}
        )  # fmt: skip
        assert not (at_fault or self.wrong_bodies), self.summary() + _trail(log, at_fault[:3])

    def summary(self) -> str:
        return (
            f"{len(self.expected)} deliveries: lost {len(self.lost)}, abandoned "
            f"{len(self.abandoned)}, dropped {len(self.dropped)}, ended and dropped besides "
            f"{len(self.strays)}, 2xx recorded as failed "
            f"{len(self.false_failed)}, answered 2xx without a SUCCESS record "
            f"{len(self.unrecorded)}, sent without their event's body {len(self.wrong_bodies)}"
            + "".join(
                f"\n  {delivery_id} dropped: {reason!r}"
                for delivery_id, reason in sorted(self.dropped.items())[:5]
            )
            + "".join(
                f"\n  {delivery_id} ended, and dropped besides: {reason!r}"
                for delivery_id, reason in sorted(self.strays.items())[:5]
            )
            + "".join(
                f"\n  record {r.id} of {r.delivery_id} (attempt {r.attempt}, "
                f"{r.start_time}..{r.end_time} ms): FAILED {r.error_msg!r}, "
                f"the receiver answered {self.seen[r.id]} meanwhile"
                for r in self.false_failed[:5]
            )
        )


async def drop_reasons(redis: Redis) -> dict[str, set[str]]:
    """The dropped list's reasons for each delivery it names (by its `deliveryId`, or by its
    job's id: a delivery's job id is its progress id)."""
    reasons: dict[str, set[str]] = {}
    for entry in await redis.lrange(keys.DROPPED, 0, -1):  # type: ignore[misc]  # sync|async
        drop = orjson.loads(entry)
        named = drop.get("deliveryId") or delivery_of(drop.get("jobId") or "")
        reasons.setdefault(named, set()).add(drop.get("reason") or "")
    return reasons


async def judge(
    redis: Redis, records: list[HistoryRecord], expected: set[str], receiver: FlakyReceiver,
    settings: Settings, allowed_drops: frozenset[str] = frozenset(),
) -> Verdict:  # fmt: skip
    """Every expected delivery must have ended: a SUCCESS record, a final FAILED record, or
    a recorded drop whose reason is in `allowed_drops` (a test that deletes or disables
    callbacks allows theirs; by default no drop is an ending: DESIGN's "Job lifecycle").
    One that ended so and was dropped besides, for a reason not allowed, is a stray: it
    was ended two ways (two workers, one delivery). Every delivery the receiver answered
    2xx must have a SUCCESS record. A FAILED record is false when, during its attempt, the
    receiver answered that delivery with a 2xx."""
    verdict = Verdict(expected, wrong_bodies=list(receiver.wrong_bodies))
    dropped = await drop_reasons(redis)
    by_delivery: dict[str, list[HistoryRecord]] = {}
    for record in records:
        by_delivery.setdefault(record.delivery_id or "", []).append(record)
    # a retry's queue member is its progress id (`{delivery id}@{emittedAt}`)
    queued = {delivery_of(m.decode()) for m in await redis.zrange(settings.queue_name, 0, -1)}
    for delivery_id in expected:
        mine = by_delivery.get(delivery_id, [])
        drops = dropped.get(delivery_id, set())
        if any(r.status is DeliveryStatus.SUCCESS or r.final for r in mine) or (
            drops & allowed_drops
        ):
            verdict.ended.add(delivery_id)
            if strays := drops - allowed_drops:  # ended, and ended again otherwise
                verdict.strays[delivery_id] = "; ".join(sorted(strays))
        elif drops:  # on record, but no test allows it: as lost as any
            verdict.dropped[delivery_id] = "; ".join(sorted(drops))
        elif mine and delivery_id not in queued:
            verdict.abandoned.add(delivery_id)
        else:
            verdict.lost.add(delivery_id)
    verdict.false_failed, verdict.seen = _false_failures(records, receiver)
    succeeded = {r.delivery_id for r in records if r.status is DeliveryStatus.SUCCESS}
    verdict.unrecorded = receiver.answered_2xx() - succeeded
    return verdict


def _false_failures(
    records: list[HistoryRecord], receiver: FlakyReceiver
) -> tuple[list[HistoryRecord], dict[int, list[int | str]]]:
    """The FAILED records of attempts the receiver answered 2xx, and nothing else, while
    they ran; with the answers it gave meanwhile."""
    false_failed: list[HistoryRecord] = []
    seen: dict[int, list[int | str]] = {}
    for record in records:
        if record.status is not DeliveryStatus.FAILED:
            continue
        during = [
            a.answer
            for a in receiver.answers
            if a.delivery_id == record.delivery_id
            and record.start_time <= a.arrived_ms
            and a.answered_ms <= record.end_time
        ]
        # Two attempts of one delivery can overlap (a failover lost a lease: the README's
        # "may repeat"): a FAILED record is the non-2xx answer's when one came meanwhile.
        if 200 in during and all(answer == 200 for answer in during):
            false_failed.append(record)
            seen[record.id] = during
    return false_failed, seen
