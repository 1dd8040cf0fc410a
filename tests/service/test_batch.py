"""Group commit: concurrent callers share a pipeline, get their own results and errors, and
survive Redis forgetting its scripts; the API's role checks and emits use it."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from dispatcher.auth import Role
from dispatcher.batch import Batcher, QueueCommands
from dispatcher.errors import Forbidden
from dispatcher.lua import Lua, run_pipeline
from dispatcher.services import Services
from dispatcher.settings import Settings
from tests.helpers import command

ECHO = Lua("return ARGV[1] .. ':' .. KEYS[1]")


def echo(key: str, value: str | int) -> QueueCommands:
    """ECHO's call to queue on a pipeline."""
    return lambda pipe: ECHO.queue_on(pipe, [key], [value])


async def test_callers_share_a_round_trip_and_get_their_own_results(redis: Redis) -> None:
    batcher = Batcher(redis, window=0.01)
    await batcher.execute(lambda pipe: ECHO.queue_on(pipe, ["warm"], ["up"]))  # script loaded
    before = int((await redis.info("stats"))["total_commands_processed"])
    results = await asyncio.gather(*(batcher.execute(echo(f"k{i}", i)) for i in range(50)))
    assert [r for (r,) in results] == [f"{i}:k{i}".encode() for i in range(50)]
    after = int((await redis.info("stats"))["total_commands_processed"])
    assert after - before == 50 + 1  # the 50 scripts and the INFO itself: no SCRIPT EXISTS


async def test_one_callers_error_stays_its_own(redis: Redis) -> None:
    await redis.set("text", "not a number")
    batcher = Batcher(redis, window=0.01)
    good = batcher.execute(command("INCR", "counter"))
    bad = batcher.execute(command("INCR", "text"))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0] == [1]
    assert isinstance(results[1], ResponseError)


async def test_scripts_come_back_after_redis_forgets_them(redis: Redis) -> None:
    await redis.script_flush()
    assert await ECHO(redis, ["k"], ["direct"]) == b"direct:k"
    await redis.script_flush()
    assert await run_pipeline(redis, lambda pipe: ECHO.queue_on(pipe, ["k"], ["pipe"])) == [
        b"pipe:k"
    ]
    await redis.script_flush()
    batcher = Batcher(redis)
    assert await batcher.execute(lambda pipe: ECHO.queue_on(pipe, ["k"], ["batch"])) == [b"batch:k"]


async def test_a_dead_connection_fails_every_waiting_caller() -> None:
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    batcher = Batcher(nowhere)
    calls = [batcher.execute(command("GET", "x")) for _ in range(3)]
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, RedisConnectionError | OSError)
    with pytest.raises((RedisConnectionError, OSError)):
        await batcher.execute(command("GET", "x"))
    await nowhere.aclose()


async def test_role_checks_and_emits_of_concurrent_requests_share_round_trips(
    redis: Redis, settings: Settings
) -> None:
    """What the API does per emit request (a role check, an enqueue), 40 at once: a few
    connections between them, not one each, and every caller gets its own answer."""
    strict = settings.model_copy(update={"open_access": False})
    services = Services(strict, redis)
    await services.roles.grant("demo", "admin-user", Role.ADMIN)
    await redis.ping()  # the pool's first connection

    async def request(user: str, n: int) -> str:
        await services.roles.require("demo", user, Role.ADMIN)
        return await services.producer.emit("demo", "BUILD_END", {"n": n})

    opened = int((await redis.info("stats"))["total_connections_received"])
    users = ["admin-user", "stranger"] * 20
    answers = await asyncio.gather(
        *(request(user, n) for n, user in enumerate(users)), return_exceptions=True
    )
    opened = int((await redis.info("stats"))["total_connections_received"]) - opened
    assert opened <= 2  # one each: 40
    assert all(isinstance(a, Forbidden) for a in answers[1::2])
    ids = [i for i in answers[::2] if isinstance(i, str)]
    assert len(set(ids)) == 20
    queued = await redis.zrange(settings.queue_name, 0, -1)
    assert sorted(i.decode() for i in queued) == sorted(f"demo:{i}" for i in ids)
