"""`dispatcher.lookups`: an owner's lookups hold their places until they end, even when
their callers stop waiting; other owners are not held; nothing stays behind."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dispatcher import lookups
from dispatcher.egress import AddressPolicy, GuardedResolver
from dispatcher.lookups import PER_OWNER, Names, bounded, owned


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


async def test_an_owners_lookups_of_a_name_at_once_are_one_kept_for_that_owner_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of new connections to one host looked it up once each (no cache at all,
    since aiohttp's shared one owner's lookups with another's). Now an owner's at once
    are one lookup, its answer kept 10 s for it alone."""
    names: Names[str] = Names(ttl=10)
    asked: list[str] = []

    async def lookup() -> str:
        asked.append(lookups.OWNER.get())
        await asyncio.sleep(0.01)
        return "10.0.0.1"

    with owned("a"):
        burst = await asyncio.gather(*(names.get("h:80", lookup) for _ in range(10)))
        again = await names.get("h:80", lookup)
    with owned("b"):
        theirs = await names.get("h:80", lookup)  # never another owner's answer
    assert (set(burst), again, theirs, asked) == ({"10.0.0.1"}, "10.0.0.1", "10.0.0.1", ["a", "b"])
    later = time.monotonic() + 10.5  # the names' clock only: the loop's runs on
    monkeypatch.setattr(lookups, "time", SimpleNamespace(monotonic=lambda: later))
    with owned("a"):
        await names.get("h:80", lookup)  # lapsed
    assert asked == ["a", "b", "a"]


async def test_an_owners_names_are_bounded_and_a_failure_is_not_kept() -> None:
    names: Names[str] = Names(per_owner=3, owners=2)
    asked: list[str] = []

    async def lookup(name: str) -> str:
        asked.append(name)
        if name == "bad":
            raise OSError("no such name")
        return name

    with owned("quiet"):
        await names.get("q", lambda: lookup("q"))
    with owned("noisy"):
        for n in range(10):
            await names.get(f"n{n}", lambda n=n: lookup(f"n{n}"))  # type: ignore[misc]
        for _ in range(2):
            with pytest.raises(OSError):
                await names.get("bad", lambda: lookup("bad"))
        await names.get("n9", lambda: lookup("n9"))  # among its 3 most recent
        await names.get("n0", lambda: lookup("n0"))  # pushed out by its own
    with owned("quiet"):
        await names.get("q", lambda: lookup("q"))  # its own answer, still kept
    assert asked == ["q", *(f"n{n}" for n in range(10)), "bad", "bad", "n0"]
    with owned("third"):
        await names.get("t", lambda: lookup("t"))  # a third owner: the least recent goes
    assert list(names._answers) == ["quiet", "third"]


async def test_a_lookup_goes_on_for_the_callers_still_waiting_and_only_for_them() -> None:
    names: Names[str] = Names()
    release, started = asyncio.Event(), list[str]()

    async def lookup() -> str:
        started.append("h")
        await release.wait()
        return "10.0.0.2"

    with owned("a"):
        left, stayed = (asyncio.ensure_future(names.get("h", lookup)) for _ in range(2))
        await asyncio.sleep(0.01)
        left.cancel()  # its attempt gave up: the other still waits for the same lookup
        release.set()
        assert await asyncio.wait_for(stayed, 1) == "10.0.0.2"
        release.clear()
        alone = asyncio.ensure_future(names.get("g", lookup))
        await asyncio.sleep(0.01)
        alone.cancel()  # no one waits: called off
        await asyncio.gather(alone, return_exceptions=True)
        release.set()
        assert await asyncio.wait_for(names.get("g", lookup), 1) == "10.0.0.2"
    assert len(started) == 3  # h once; g, called off, then again


async def test_a_caller_joining_a_lookup_just_called_off_gets_a_new_one() -> None:
    """The last caller's leaving called its lookup off, which stayed listed until the
    next turn of the loop: a caller joining it then got a CancelledError it never asked
    for, which no attempt records (review)."""
    names: Names[str] = Names()
    release = asyncio.Event()

    async def lookup() -> str:
        await release.wait()
        return "10.0.0.3"

    with owned("a"):
        first = asyncio.ensure_future(names.get("h", lookup))
        await asyncio.sleep(0.01)
        first.cancel()
        second = asyncio.ensure_future(names.get("h", lookup))  # in the same turn
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.wait_for(second, 1) == "10.0.0.3"


async def test_the_resolver_keeps_each_owners_answers_apart() -> None:
    """The delivery client's resolver looks a name up once per owner while its answer
    lasts, and checks the addresses of every answer, kept or not."""
    resolver = GuardedResolver(AddressPolicy(allow_internal=False))
    asked: list[str] = []
    answer = "93.184.216.34"

    async def resolve(host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        asked.append(lookups.OWNER.get())
        return [{"hostname": host, "host": answer, "port": port, "family": family,
                 "proto": 0, "flags": 0}]  # fmt: skip

    resolver._inner = SimpleNamespace(resolve=resolve)  # type: ignore[assignment]
    with owned("a"):
        first = await resolver.resolve("h.example", 80)
        again = await resolver.resolve("h.example", 80)
    with owned("b"):
        await resolver.resolve("h.example", 80)
    assert first[0]["host"] == again[0]["host"] == answer
    assert asked == ["a", "b"]
