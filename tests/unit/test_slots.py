"""A worker's slots (`dispatcher.worker.slots`): the jobs of a shard whose writes are
stuck count for none while that lasts, but the jobs running never pass twice the slots."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dispatcher.worker.slots import Slots


@dataclass
class StandInWriter:
    stuck_now: bool = False

    def stuck(self) -> bool:
        return self.stuck_now


@dataclass
class StandInServed:
    index: int
    writer: StandInWriter


async def test_stuck_shards_free_their_jobs_slots_up_to_twice_the_slots() -> None:
    """Three shards whose batches stick one after the other, 4 slots: shard 0's 4 jobs
    count for none once its writes stick, and shard 1 takes 4 more; once shard 1's stick
    too, no more are taken (the review's case ran 12 jobs on 4 slots)."""
    writers = [StandInWriter() for _ in range(3)]
    slots = Slots(4, 4, [StandInServed(i, w) for i, w in enumerate(writers)])
    waiting = asyncio.Event()

    async def job() -> None:
        await waiting.wait()

    def claim(shard: int, count: int) -> None:
        for _ in range(count):
            key = (shard, f"job-{len(slots.running)}")
            slots.running[key] = asyncio.create_task(job())

    try:
        claim(0, slots.left())
        assert (len(slots.running), slots.left()) == (4, 0)
        writers[0].stuck_now = True
        assert slots.left() == 4  # shard 0's jobs wait for their writes
        claim(1, slots.left())
        writers[1].stuck_now = True
        assert slots.left() == 0  # 8 running: twice the slots
        writers[0].stuck_now = False
        assert slots.left() == 0
    finally:
        waiting.set()
        await asyncio.gather(*slots.running.values())
