"""A Sentinel-backed pool's follower (`dispatcher.master_switch`): an answer of the
sentinels asked before a `+switch-master` was heard does not take the pool back."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from dispatcher.master_switch import FollowingPool, _ask, _heard

OLD, NEW = ("127.0.0.1", 7001), ("127.0.0.1", 7002)


class SlowSentinels:
    """Sentinels whose answer (the old master) comes once `answer` is set."""

    def __init__(self) -> None:
        self.sentinels: list[Any] = [object()]
        self.answer = asyncio.Event()

    async def discover_master(self, name: str) -> tuple[str, int]:
        await self.answer.wait()
        return OLD


async def test_an_answer_asked_before_a_switch_was_heard_is_not_followed() -> None:
    sentinels = SlowSentinels()
    pool = FollowingPool("mymaster", sentinels)
    pool.master_address = OLD
    asking = asyncio.create_task(_ask(weakref.ref(pool)))
    await asyncio.sleep(0)  # the question is out
    switch = {"data": f"mymaster {OLD[0]} {OLD[1]} {NEW[0]} {NEW[1]}".encode()}
    await _heard(weakref.ref(pool), sentinels.sentinels[0], switch)
    assert pool.master_address == NEW
    sentinels.answer.set()  # the sentinels' answer, made before the switch
    assert await asyncio.wait_for(asking, 5)
    assert pool.master_address == NEW  # it took the pool back to OLD (review)
    await pool.disconnect()
