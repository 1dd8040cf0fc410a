"""Group commit: concurrent callers share a pipeline, get their own results and errors, and
survive Redis forgetting its scripts; the API's role checks and emits use it."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from dispatcher.auth import Role
from dispatcher.batch import Batcher, QueueCommands
from dispatcher.errors import Forbidden
from dispatcher.lua import ArgList, Key, KeyList, Lua, Script, run_pipeline
from dispatcher.services import Services
from dispatcher.settings import Settings
from dispatcher.worker.writer import Writer
from tests.helpers import command

ECHO = Lua("return ARGV[1] .. ':' .. KEYS[1]")


@dataclass
class Bump(Script):
    """Adds `by` to `counter` and returns it, with the `note` it was given."""

    LUA = """
    local total = redis.call('INCRBY', counter, by)
    return {total, note}
    """
    TOGETHER = True
    counter: Key
    by: int
    note: str


@dataclass
class Spread(Script):
    """Adds `by` to each of `counters` (a list: any number) and returns the totals, with
    the `notes` it was given (a list too)."""

    LUA = """
    local totals = {}
    for i, counter in ipairs(counters) do totals[i] = redis.call('INCRBY', counter, by) end
    return {totals, notes}
    """
    TOGETHER = True
    tag: Key
    counters: KeyList
    by: int
    notes: ArgList


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


async def test_a_caller_cancelled_while_its_full_batch_is_sent_strands_no_other(
    redis: Redis,
) -> None:
    """The caller that fills a batch sends it; cancelled meanwhile (a read ahead that was
    dropped, a job past its timeout), the pipeline still answers the batch's others."""
    batcher = Batcher(redis, window=10.0, max_batch=2)  # sent only when full
    other = asyncio.create_task(batcher.execute(echo("a", 1)))
    await asyncio.sleep(0)
    filler = asyncio.create_task(batcher.execute(echo("b", 2)))
    await asyncio.sleep(0)  # it is sending the batch
    filler.cancel()
    assert await asyncio.wait_for(other, 5) == [b"1:a"]


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


async def test_scripts_run_together_in_one_call_each_answer_and_error_its_own(
    redis: Redis,
) -> None:
    """`queue_together`: one EVALSHA for many calls of a script, their answers in order; a
    call that fails (INCRBY on text) leaves its error in its place, the others run."""
    await redis.set("text", "not a number")
    calls = [Bump("a", 1, "one"), Bump("text", 1, "bad"), Bump("a", 2, "three"), Bump("b", 5, "")]
    await run_pipeline(redis, lambda pipe: Bump.queue_together(pipe, [Bump("w", 0, "")]))  # loaded
    await redis.config_resetstat()
    (answers,) = await run_pipeline(redis, lambda pipe: Bump.queue_together(pipe, calls))
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_incrby"]["calls"] == 4
    assert answers[0] == [1, b"one"] and answers[2] == [3, b"three"] and answers[3] == [5, b""]
    assert isinstance(answers[1], ResponseError) and "not an integer" in str(answers[1])
    assert await redis.mget("a", "b", "text") == [b"3", b"5", b"not a number"]
    await redis.script_flush()  # the joint script comes back as the single ones do
    assert await run_pipeline(redis, lambda pipe: Bump.queue_together(pipe, calls[:1])) == [
        [[4, b"one"]]
    ]


async def test_scripts_with_lists_run_together_each_with_its_own_lengths(redis: Redis) -> None:
    """A script with list fields (a fan-out's lane entries) runs together too: each call's
    keys and arguments, of any length, reach it as they were given; one that fails (INCRBY
    on text) fails alone."""
    await redis.set("text", "not a number")
    calls = [
        Spread("t", ["a"], 1, []),
        Spread("t", ["a", "b", "c"], 2, ["x", "y"]),
        Spread("t", ["text", "a"], 1, ["z"]),
        Spread("t", ["b"], 5, ["last"]),
    ]
    await run_pipeline(redis, lambda pipe: Spread.queue_together(pipe, [Spread("t", [], 0, [])]))
    await redis.config_resetstat()
    (answers,) = await run_pipeline(redis, lambda pipe: Spread.queue_together(pipe, calls))
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert answers[0] == [[1], []]
    assert answers[1] == [[3, 2, 2], [b"x", b"y"]]
    assert isinstance(answers[2], ResponseError) and "not an integer" in str(answers[2])
    assert answers[3] == [[7], [b"last"]]
    assert await redis.mget("a", "b", "c") == [b"3", b"7", b"2"]


async def test_a_batchers_callers_run_their_scripts_together_before_the_commands(
    redis: Redis,
) -> None:
    """`Batcher.together` (a read pipeline's admits): the callers of one window share one
    EVALSHA, each gets its own answer, one that fails raises alone, and the commands
    queued meanwhile run after the joint call."""
    await redis.set("text", "not a number")
    batcher = Batcher(redis, window=0.01)
    await batcher.together(Bump("a", 0, "warm"))  # the joint script loaded
    await redis.config_resetstat()
    calls = [Bump("a", 1, "one"), Bump("text", 1, "bad"), Bump("a", 2, "three")]
    after = batcher.execute(command("GET", "a"))  # queued first, answered after the scripts
    results = await asyncio.gather(
        *(batcher.together(call) for call in calls), after, return_exceptions=True
    )
    assert results[0] == [1, b"one"] and results[2] == [3, b"three"] and results[3] == [b"3"]
    assert isinstance(results[1], ResponseError) and "not an integer" in str(results[1])
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_incrby"]["calls"] == 3
    await redis.script_flush()  # a restarted Redis: the joint script is loaded again
    assert await batcher.together(Bump("a", 1, "again")) == [4, b"again"]


@dataclass
class Noted(Script):
    """Appends `note` to the list `log`; answers the list's length."""

    LUA = "return redis.call('RPUSH', log, note)"
    TOGETHER = True
    log: Key
    note: str


@dataclass
class Tail(Script):
    """The same, of another kind (a write's second script)."""

    LUA = Noted.LUA
    TOGETHER = True
    log: Key
    note: str


async def test_a_writes_lead_and_tail_run_after_every_lead_before_its_commands(
    redis: Redis,
) -> None:
    """A batch's leads run first, all of them (a kind's together), then the tails, then
    each write's own commands; each write's answer starts with its lead's and its tail's.
    A lead Redis refuses fails its write; the tail after it still runs (as a write's own
    commands after a refused one always did)."""
    await redis.set("taken", "a string")
    writer = Writer(redis, _no_ids, window=0.05)
    leads = ["log", "log", "taken", "log"]
    try:
        answers = await asyncio.gather(*(
            writer.submit(command("RPUSH", "log", f"own {n}"), (),
                          functools.partial(Noted, leads[n], f"lead {n}"), Tail("log", f"tail {n}"))
            for n in range(4)
        ), return_exceptions=True)  # fmt: skip
    finally:
        await writer.close()
    order = [entry.decode() for entry in await redis.lrange("log", 0, -1)]  # type: ignore[misc]
    assert order == ["lead 0", "lead 1", "lead 3", "tail 0", "tail 1", "tail 2", "tail 3",
                     "own 0", "own 1", "own 2", "own 3"]  # fmt: skip
    assert answers[0] == [1, 4, 8] and answers[3] == [3, 7, 11]
    assert isinstance(answers[2], ResponseError) and "WRONGTYPE" in str(answers[2])
    with pytest.raises(ValueError, match="a tail follows a lead"):
        writer.submit(command("PING"), (), None, Tail("log", "alone"))


@dataclass
class Alone(Script):
    """A script that does not run together."""

    LUA = "return redis.call('RPUSH', log, note)"
    log: Key
    note: str


async def test_a_write_whose_tail_cannot_run_together_fails_alone(redis: Redis) -> None:
    """A bug in the scripts a write leads with (here a tail that does not run together)
    is that write's error; the writes around it land and the writer goes on."""
    writer = Writer(redis, _no_ids, window=0.05)
    lead = functools.partial(Noted, "log", "lead")
    try:
        first = writer.submit(command("SET", "before", 1), (), lead, Tail("log", "tail"))
        bad = writer.submit(command("SET", "bad", 1), (), lead, Alone("log", "alone"))
        last = writer.submit(command("SET", "after", 1))
        assert list(await asyncio.wait_for(asyncio.gather(first, last), 10)) == [
            [1, 2, True], [True]
        ]  # fmt: skip
        with pytest.raises(TypeError, match="Alone does not run together"):
            await bad
        assert await redis.exists("before", "after", "bad") == 2 and writer.pending == 0
    finally:
        await writer.close()


async def _no_ids(records: object) -> None:
    """The writer's record ids: none here."""


def test_only_a_script_of_the_kind_runs_together() -> None:
    @dataclass
    class Other(Script):
        LUA = "return 1"
        key: Key
        value: int

    with pytest.raises(TypeError, match="Other does not run together"):
        Other.queue_together(None, [Other("k", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="given a Other"):
        Bump.queue_together(None, [Bump("a", 1, ""), Other("k", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="runs together only with keys and arguments"):
        type("Keyless", (Script,), {"LUA": "return 1", "TOGETHER": True,
                                    "__annotations__": {"value": "int"}})  # fmt: skip
