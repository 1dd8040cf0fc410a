"""A fleet's shards as the operator grows them: a grow never places a project on a shard
without the platform-wide callbacks and `*` roles (and one stopped is finished by the
next), a process given fewer shards than are in use refuses to act, and the fleet views
show the shards that answer when one does not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis as redis_py
from redis.asyncio import Redis
from structlog.testing import capture_logs
from typer.testing import CliRunner

from dispatcher.auth import ALL_PROJECTS, Role
from dispatcher.cli import app
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import InvalidSetting, Unavailable
from dispatcher.failing import read as read_failing
from dispatcher.keys import Keys
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.placement import Placement, kept_fresh
from dispatcher.producer import Producer
from dispatcher.registry import Registration
from dispatcher.registry.copies import callback_ids
from dispatcher.settings import Settings
from dispatcher.shards import views
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.stopping import cancel_all
from dispatcher.topology import check_shards
from tests.helpers import make_settings, until
from tests.service.test_shard_growth import two_empty_shards


def _platform(url: str) -> Registration:
    return Registration(PLATFORM_PROJECT, url, Region.DEVNET, "t")


async def _on_new_shard(router: Router) -> tuple[int, dict[str, Role]]:
    new = router.shards[1]
    return len(await callback_ids(new.registry, PLATFORM_PROJECT)), await new.roles.list(
        ALL_PROJECTS
    )


class _Watched(Mover):
    """A mover that looks, at each of its waits, at what the home shard says is in use and
    what the new shard holds; at its first, a platform-wide callback is added by a process
    of the longer list and one by a process of the shorter (which writes to shard 0 only)."""

    seen: list[tuple[int, int, dict[str, Role]]]
    short: Settings

    async def settle(self) -> None:
        if not self.seen:
            await self.router.platform.register(_platform("https://example.com/long"), "BUILD_END")
            async with Router.open(self.short) as short:
                await short.platform.register(_platform("https://example.com/short"), "BUILD_END")
        fresh = Placement(2, self.router.home.redis, self.router.home.keys)
        await fresh.load()
        self.seen.append((fresh.active, *await _on_new_shard(self.router)))


async def test_a_grow_copies_the_platform_callbacks_before_the_new_shard_takes_a_project(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """No wait of a grow sees the longer count in use while the new shard lacks the
    platform-wide callbacks or `*` roles (it published the count first, then waited ~6 s,
    then copied: a Ctrl-C meanwhile left the new shard in use, empty; review), and the
    platform-wide callbacks added while it runs, by a process of either list, are there
    at its end."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        await router.platform.register(_platform("https://example.com/all"), "BUILD_END")
        await router.home.roles.grant(ALL_PROJECTS, "alice", Role.ADMIN)  # shard 0's only
        mover = _Watched(router, lambda _: None, settle_s=0.01)
        mover.seen, mover.short = [], make_settings(shard_servers[0].url)
        await mover.grow()
        in_use = [(callbacks, roles) for active, callbacks, roles in mover.seen if active == 2]
        assert in_use and all(c >= 2 and roles == {"alice": Role.ADMIN} for c, roles in in_use)
        assert (await _on_new_shard(router))[0] == 3


async def test_grow_with_nothing_to_grow_copies_the_platform_callbacks_again(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A grow of the version before stopped after publishing the count left the new shard
    in use without the platform-wide callbacks; the next grow said "nothing to grow" and
    copied nothing (review). It copies them now, and says so."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        await router.home.register(_platform("https://example.com/all"), "BUILD_END")
        await router.home.roles.grant(ALL_PROJECTS, "alice", Role.ADMIN)
        await router.placement.write_counts(2, None)  # where the stopped grow left it
        said: list[str] = []
        assert await Mover(router, said.append, settle_s=0.01).grow() == []
        assert await _on_new_shard(router) == (1, {"alice": Role.ADMIN})
        assert "nothing to grow" in said[0] and "copied to every shard again" in said[0]


async def test_a_process_given_fewer_shards_than_are_in_use_refuses_to_act(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """With two shards in use, a process given shard 0 alone (one URL) hashed every project
    onto it: `callbacks list` of a project of shard 1 showed none, and its emit was queued
    on shard 0, where it matched no callback: lost, with no record (review). It refuses to
    start now, naming DISPATCHER_REDIS_SHARDS; and one running when the count outgrows its
    list refuses to place a project (503) from its next placement refresh on, one given a
    single URL too (it read the count only at its start: review)."""
    settings = two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        await router.placement.write_counts(2, None)
    alone = make_settings(shard_servers[0].url)
    for opening in (Router.open(alone), Producer(alone)):
        with pytest.raises(InvalidSetting, match=r"2 shards are in use.*given 1.*REDIS_SHARDS"):
            async with opening:
                pass
    with pytest.raises(InvalidSetting, match="DISPATCHER_REDIS_SHARDS"):
        await check_shards(alone)
    async with Router.open(settings) as router, Producer(settings) as producer:
        router.of("p1")
        await Placement(2, router.home.redis, router.home.keys).write_counts(3, None)
        await until(lambda: _refused(router.placement, producer), 5, "the refresh saw it")
        with pytest.raises(Unavailable, match=r"3 shards are in use.*given 2"):
            await producer.emit("p1", "BUILD_END", {})
        with pytest.raises(Unavailable, match="REDIS_SHARDS"):
            router.of("p1")
        await Placement(2, router.home.redis, router.home.keys).write_counts(1, None)
    async with Router.open(alone) as router, Producer(alone) as producer:  # one URL
        router.of("p1")
        await Placement(1, router.home.redis, router.home.keys).write_counts(2, None)
        await until(lambda: _refused(router.placement, producer), 5, "the refresh saw it")
        with pytest.raises(Unavailable, match=r"2 shards are in use.*given 1"):
            await producer.emit("p1", "BUILD_END", {})


async def _refused(placement: Placement, producer: Producer) -> bool:
    return None not in (placement.short, producer._placement.short)


def test_the_cli_given_fewer_shards_than_are_in_use_refuses_to_act(
    shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`callbacks list` with shard 0's URL alone, two shards in use: it showed none of a
    project of shard 1, exit 0 (review); it stops now, naming the setting."""
    for server in shard_servers:
        redis_py.Redis.from_url(server.url).flushall()
    redis_py.Redis.from_url(shard_servers[0].url).hset(Keys().PLACEMENT, ":count", "2")
    monkeypatch.setenv("DISPATCHER_REDIS_URL", shard_servers[0].url)
    monkeypatch.delenv("DISPATCHER_REDIS_SHARDS", raising=False)
    listed = CliRunner().invoke(app, ["callbacks", "list", "--project", "p1"])
    assert listed.exit_code == 2 and "DISPATCHER_REDIS_SHARDS" in listed.output
    assert "2 shards are in use" in listed.output


@pytest.fixture
def silent_url(silent: int) -> str:
    """A Redis URL whose server takes connections and never answers (a hung shard)."""
    return f"redis://127.0.0.1:{silent}/0"


def test_the_fleet_views_show_the_shards_that_answer_and_name_the_silent_one(
    shard_servers: list[EmbeddedRedis], silent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status`, `dead`, `callbacks failing` and `shards list` with shard 1 hung: each
    prints the view of shard 0, names shard 1 and exits 3. They failed whole, with no view,
    after ~18 s (review)."""
    _fleet_of(monkeypatch, shard_servers[0].url, silent_url)
    _shown_without(1, (["shards", "list"], "did not answer"))
    of_project = CliRunner().invoke(app, ["dead", "--project", "p1"])  # on shard 0
    assert of_project.exit_code == 0 and "0 dead letters" in of_project.output


def test_with_shard_0_silent_the_fleet_views_show_the_others_and_the_rest_say_why(
    shard_servers: list[EmbeddedRedis], silent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 0 hung (it says which shard holds each project): every command waited for
    it without end, `status` included (review). The fleet views show shard 1 and name
    shard 0 (exit 3), what only shard 0 knows shown as unknown, not as the others' none
    (review: "workers alive 0"); a command about a project fails as soon as the start-up
    check found shard 0 silent, saying so (exit 1; it waited for it again, and asked it).
    No shard answering, a view is no view (it printed an empty one: review)."""
    _fleet_of(monkeypatch, silent_url, shard_servers[1].url)
    shown = _shown_without(0, (["shards", "list"], "did not answer"))
    for row in ("workers alive", "last hour: success", "last hour: attempt duration"):
        [line] = [line for line in shown["status"].splitlines() if row in line]
        assert "? (shard 0 did not answer)" in line, line
    listing = shown["shards list"]
    assert "not yet (grow)" not in listing and "?" in listing  # its placement unread
    listed = CliRunner().invoke(app, ["callbacks", "list", "--project", "p1"])
    assert listed.exit_code == 1, listed.output
    assert "shard 0 has not answered" in listed.output and "within" in listed.output
    of_project = CliRunner().invoke(app, ["dead", "--project", "p1"])  # placed by shard 0
    assert of_project.exit_code == 1 and "shard 0 has not answered" in of_project.output
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(64)
        silent_too = f"redis://127.0.0.1:{other.getsockname()[1]}/0"
        monkeypatch.setenv("DISPATCHER_REDIS_SHARDS", json.dumps([silent_url, silent_too]))
        for command in (["dead"], ["callbacks", "failing"], ["status"]):
            nothing = CliRunner().invoke(app, command)
            assert nothing.exit_code == 1 and "no shard answered" in nothing.output, command
        every = CliRunner().invoke(app, ["shards", "list"])  # still where each one is
        assert every.exit_code == 3 and every.output.count("did not answer") >= 2


def test_with_its_only_redis_silent_a_command_does_not_wait_for_it_again(
    silent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up check asks each server a PING, side by side, and asks a silent one
    nothing more; the command then opens its router without waiting for shard 0's
    placement again (one Redis: every project is on it), and does its own work, which may
    need only PostgreSQL (a history page). It waited a Redis timeout for each step in
    turn, five in all (5 s at a 1 s timeout, 25 s at the default) before it said so."""
    monkeypatch.delenv("DISPATCHER_REDIS_SHARDS", raising=False)
    monkeypatch.setenv("DISPATCHER_REDIS_URL", silent_url)
    monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "0.25")
    waited: list[object] = []

    def opened(*args: object, **kwargs: object) -> None:
        waited.append(kwargs.get("home_wait_s"))
        raise redis_py.ConnectionError("its Redis is away")

    with monkeypatch.context() as patched:
        patched.setattr(Router, "open", opened)
        said = CliRunner().invoke(app, ["callbacks", "list", "--project", "p1"])
    assert said.exit_code == 1 and "Redis unreachable" in said.output, said.output
    assert "did not answer within" in said.output  # the start-up check's warning
    assert waited == [0.0]
    for command in (["status"], ["dead", "--project", "p1"]):  # fleet views: not waited for
        nothing = CliRunner().invoke(app, command)
        assert nothing.exit_code == 1, (command, nothing.output)
        assert "no shard answered" in nothing.output or "unreachable" in nothing.output


def _fleet_of(monkeypatch: pytest.MonkeyPatch, *urls: str) -> None:
    """The CLI on the shards at `urls` (the live ones emptied), a Redis timeout of 0.25 s."""
    for url in urls:
        with contextlib.suppress(redis_py.TimeoutError):
            redis_py.Redis.from_url(url, socket_timeout=0.5).flushall()
    monkeypatch.delenv("DISPATCHER_REDIS_URL", raising=False)
    monkeypatch.setenv("DISPATCHER_REDIS_SHARDS", json.dumps(urls))
    monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "0.25")


def _shown_without(silent: int, *more: tuple[list[str], str]) -> dict[str, str]:
    """Each fleet view (and `more`) shows the others, names shard `silent` and exits 3;
    returns what each printed, by command."""
    printed = {}
    for command, shown in (
        (["status"], "queue: jobs due"),
        (["dead"], "0 dead letters"),
        (["callbacks", "failing"], "0 failing callbacks"),
        *more,
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 3, (command, result.output)
        assert shown in result.output and f"shard(s) {silent} did not answer" in result.output
        printed[" ".join(command)] = result.output
    return printed


def test_with_shard_0_silent_the_postgresql_dead_letters_are_shown(
    shard_servers: list[EmbeddedRedis], silent_url: str, pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """With the PostgreSQL history every dead letter is in the database: `dead` shows
    them with shard 0 silent (it refused: the platform's home is shard 0, whatever the
    placement says, and placing it asked for the unread placement; review)."""
    _fleet_of(monkeypatch, silent_url, shard_servers[1].url)
    monkeypatch.setenv("DISPATCHER_HISTORY_URL", pg_url)
    dead = CliRunner().invoke(app, ["dead"])
    assert dead.exit_code == 0 and "0 dead letters" in dead.output, dead.output


async def test_a_placement_is_read_again_only_once_changed_and_an_outage_said_once(
    redis: Redis, silent_url: str
) -> None:
    """Every process reads the placement every 2 s (one URL too). One never written (a
    single Redis's) was read whole at each turn, an info line each time; an outage was
    logged at each turn (review). It is read again only once changed, and an outage is
    said as it begins."""
    placement = Placement(1, redis, Keys())
    assert await placement.load() and not await placement.load()
    await placement.write_counts(1, None)
    assert await placement.load() and not await placement.load()
    away = Redis.from_url(silent_url, socket_timeout=0.05)
    try:
        with capture_logs() as logs:
            running = asyncio.create_task(Placement(1, away, Keys()).run(0.01))
            await asyncio.sleep(0.5)
            await cancel_all([running])
    finally:
        await away.aclose()
    said = [entry["event"] for entry in logs]
    assert said.count("shards.placement_unread") == 1, said


async def test_the_placement_refresh_outlives_a_busy_home_shard(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A BUSY reply (a script past its time limit on shard 0) ended the refresh for good,
    silently: the process never saw a move or a grow again (review). It waits a turn,
    and sees what is written after."""
    url = shard_servers[0].url
    async with Redis.from_url(url) as redis:
        placement = Placement(2, redis, Keys())
        await placement.load()
        refreshing = asyncio.create_task(placement.run(0.1))
        try:
            async with busy_for_2_s(url) as spinning:
                await spinning
            assert not refreshing.done()
            await placement.write_counts(2, None)
            await until(lambda: _active(placement, 2), 5, "the refresh read the count")
        finally:
            await cancel_all([refreshing])


@contextlib.asynccontextmanager
async def busy_for_2_s(url: str) -> AsyncIterator[asyncio.Task[None]]:
    """The Redis at `url`, emptied, runs a script for 2 s past its time limit (100 ms
    here): every other client gets BUSY meanwhile. Yields the task that runs it."""
    admin = redis_py.Redis.from_url(url)
    admin.flushall()
    admin.config_set("lua-time-limit", 100)
    busy = "local t = redis.call('TIME')[1] while redis.call('TIME')[1] - t < 2 do end"
    spinning = asyncio.create_task(asyncio.to_thread(_quietly, url, busy))
    try:
        yield spinning
    finally:
        await spinning
        admin.config_set("lua-time-limit", 5000)


def _quietly(url: str, script: str) -> None:
    with contextlib.suppress(redis_py.RedisError):
        redis_py.Redis.from_url(url).eval(script, 0)


async def _active(placement: Placement, count: int) -> bool:
    return placement.active == count


@pytest.mark.parametrize("count", [1, 2])
async def test_a_start_waits_out_a_busy_home_shard(
    shard_servers: list[EmbeddedRedis], count: int
) -> None:
    """A process that starts while shard 0 answers BUSY (a script past its time limit)
    waits it out, as an outage, and reads the placement once it can (with one URL, its
    count, in the background). The BUSY stopped the start (review)."""
    url = shard_servers[0].url
    async with Redis.from_url(url) as redis, busy_for_2_s(url):
        await until(lambda: _busy(redis), 5, "shard 0 answering BUSY")
        async with kept_fresh(Placement(count, redis, Keys()), 0.1) as placement:
            await until(lambda: _read(placement), 5, "the placement read")


async def _busy(redis: Redis) -> bool:
    try:
        await redis.ping()
    except redis_py.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


async def _read(placement: Placement) -> bool:
    return placement.version is not None


def test_status_asks_a_silent_shard_once(
    shard_servers: list[EmbeddedRedis], silent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` with shard 0 hung: its failing callbacks are read of the shards that
    answered its status, not asked of shard 0 again (a second Redis timeout; review)."""
    _fleet_of(monkeypatch, silent_url, shard_servers[1].url)
    asked: list[int] = []

    def reading(redis: Redis, keys: Keys, project_id: str | None, rows: int) -> object:
        asked.append(redis.connection_pool.connection_kwargs["port"])
        return read_failing(redis, keys, project_id, rows)

    monkeypatch.setattr(views, "read_failing", reading)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 3 and "shard(s) 0 did not answer" in result.output
    assert asked == [shard_servers[1].port]


def test_a_wrong_redis_password_stops_a_process_at_start_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that refuses the password its URL gives (or asks for one it does not give):
    the CLI and a worker stop at start with a configuration error naming the setting, the
    password masked. The CLI said the server did not answer, and a worker waited it out as
    an outage for ever, a warning a second (review of the carried items)."""
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        redis_py.Redis.from_url(server.url).config_set("requirepass", "right")
        monkeypatch.delenv("DISPATCHER_REDIS_SHARDS", raising=False)
        monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "1")
        for url in (server.url.replace("redis://", "redis://:wrong@"), server.url):
            monkeypatch.setenv("DISPATCHER_REDIS_URL", url)
            said = CliRunner().invoke(app, ["status"])
            text = " ".join(said.output.split())
            assert said.exit_code == 2, said.output
            assert "configuration error DISPATCHER_REDIS_URL" in text, text
            assert "refused its password" in text
            assert "wrong" not in text
        settings = make_settings(server.url.replace("redis://", "redis://:wrong@"))
        with pytest.raises(InvalidSetting, match="refused its password"):
            asyncio.run(check_shards(settings))
        ok = make_settings(server.url.replace("redis://", "redis://:right@"))
        assert asyncio.run(check_shards(ok)).silent == []
