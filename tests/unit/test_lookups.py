"""`dispatcher.lookups`: an owner's lookups hold their places until they end, even when
their callers stop waiting; other owners are not held; nothing stays behind."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher import lookups
from dispatcher.lookups import PER_OWNER, bounded, owned


async def test_an_owners_lookups_keep_their_places_past_their_callers() -> None:
    release = asyncio.Event()
    started: list[str] = []

    async def lookup(name: str) -> str:
        started.append(name)
        await release.wait()
        return name

    def start(name: str) -> asyncio.Future[str]:
        return asyncio.ensure_future(bounded(lambda: lookup(name)))

    with owned("evil"):
        callers = [start(f"e{n}") for n in range(6)]
    await asyncio.sleep(0.01)
    assert len(started) == PER_OWNER  # the others wait for a place
    for caller in callers:
        caller.cancel()  # their attempts timed out: the hung lookups keep their places
    await asyncio.gather(*callers, return_exceptions=True)
    with owned("evil"):
        late = start("late")
    with owned("demo"):
        assert await asyncio.wait_for(bounded(lambda: asyncio.sleep(0, "ok")), 1) == "ok"
    await asyncio.sleep(0.01)
    assert "late" not in started  # evil's places are still held
    release.set()
    assert await asyncio.wait_for(late, 1) == "late"
    assert lookups._GATES[asyncio.get_running_loop()] == {}  # nothing stays behind


async def test_a_failed_lookup_gives_its_place_back() -> None:
    async def fails() -> None:
        raise OSError("no such name")

    for _ in range(PER_OWNER + 1):
        with owned("p"), pytest.raises(OSError):
            await asyncio.wait_for(bounded(fails), 1)
