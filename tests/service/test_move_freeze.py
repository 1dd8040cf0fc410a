"""A moving project's callbacks frozen on its old shard itself (`callbacks_frozen`, set by
its mover: `dispatcher.shards.move`), on two real shards: a change that passed a
process's check of the placement before the freeze, and lands after the move copied
the callbacks, is refused rather than answered and then removed with the old shard's
copy."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

import pytest
import redis as sync_redis

from dispatcher.auth import Role
from dispatcher.errors import Unavailable
from dispatcher.lua import run_pipeline
from dispatcher.models import Region
from dispatcher.registry import Registration, Registry
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from dispatcher.tokens import TokenCipher
from tests.helpers import make_settings, until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dispatcher.embedded import EmbeddedRedis
    from dispatcher.services import Services
    from dispatcher.settings import Settings

SLOW_HOST = "slow.example"
DEVNET = Region.DEVNET


def _two_empty_shards(shard_servers: list[EmbeddedRedis]) -> Settings:
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    urls = [server.url for server in shard_servers]
    return make_settings(urls[0], redis_shards=urls, placement_refresh=0.05)


def _registration(url: str) -> Registration:
    return Registration("mv", url, Region.DEVNET, "t")


@pytest.fixture
async def resolved() -> AsyncIterator[asyncio.Event]:
    """`slow.example` resolves (to 127.0.0.1) once the event is set: a receiver whose
    name its DNS answers slowly; getaddrinfo has no time bound."""
    loop = asyncio.get_running_loop()
    real, answered = loop.getaddrinfo, asyncio.Event()

    async def slow(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == SLOW_HOST:
            await answered.wait()
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return await real(host, *args, **kwargs)

    loop.getaddrinfo = slow  # type: ignore[method-assign]
    yield answered
    loop.getaddrinfo = real  # type: ignore[method-assign]


async def _ids(services: Services) -> list[int]:
    listing = services.keys.project_callbacks("mv")
    return [int(member) for member in await services.redis.zrange(listing, 0, -1)]


async def test_a_registration_that_lands_after_the_copy_is_refused_not_lost(
    shard_servers: list[EmbeddedRedis], resolved: asyncio.Event
) -> None:
    """A registration passes the placement's check, then waits for its URL's host to
    resolve; meanwhile the project's move freezes it, waits for every process and copies
    its callbacks to the new shard; then the host resolves and the registration writes
    to the old shard. It is refused (503, `try again`), and the project's callbacks on
    the new shard are the ones it had. Before, it was answered with an id (2) and
    written to the old shard after the copy; the move then removed it with the old
    shard's copy: answered, and gone."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.register(_registration("http://127.0.0.1:9/a"), "BUILD_END")
        services = router.callbacks("mv")  # the placement's check passes: no move yet
        registering = asyncio.create_task(
            services.register(_registration(f"http://{SLOW_HOST}:8080/b"), "BUILD_END")
        )
        moving = asyncio.create_task(
            Mover(router, lambda _: None, settle_s=0.2, late_s=0).move("mv", 1)
        )

        async def copied() -> bool:
            return bool(await _ids(dst))

        await until(copied, 30, "the move to copy the callbacks")
        resolved.set()
        with pytest.raises(Unavailable, match=r"is moving to another shard.*try again") as exc:
            await registering
        assert exc.value.http_status == 503
        await moving
        assert await _ids(dst) == [1]
        assert await _ids(src) == []


async def test_every_change_of_a_frozen_projects_callbacks_is_refused(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """While the mark is set: a registration (one or a batch), a deletion, a rotation, an
    enabling or a disabling answer 503 and change nothing; the worker's disabling of a
    callback answered 410 (not an answered change: it reads no mark) and the move's own
    removal of the project from the old shard are not stopped. Without the mark, the
    same changes go through."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src = router.shards[0]
        callback_id = await src.register(_registration("http://127.0.0.1:9/a"), "BUILD_END")
        await src.redis.set(src.keys.callbacks_frozen("mv"), "mover/1")
        changes = [
            src.register(_registration("http://127.0.0.1:9/b"), "BUILD_END"),
            src.register_batch(_registration("http://127.0.0.1:9/c"), "BUILD_END,BUILD_START"),
            src.delete(callback_id, "mv"),
            src.rotate_secret(callback_id, "mv", "new-secret"),
            src.disable(callback_id, by="admin", project_id="mv"),
            src.enable(callback_id),
        ]
        for change in changes:
            with pytest.raises(Unavailable, match="is moving to another shard"):
                await change
        [callback] = (await src.callbacks("mv")).records
        assert (callback.id, callback.enabled, callback.rotation_end_time) == (
            callback_id,
            True,
            None,
        )
        await run_pipeline(
            src.redis, lambda pipe: src.registry.queue_set_enabled(pipe, callback_id, False)
        )
        assert (await src.callback(callback_id, "mv")).enabled is False
        await src.registry.delete("mv", callback_id, mover=True)
        assert await _ids(src) == []
        await src.redis.delete(src.keys.callbacks_frozen("mv"))
        assert await src.register(_registration("http://127.0.0.1:9/b"), "BUILD_END")


async def test_the_freeze_stays_on_the_old_shard_after_a_move_and_a_move_back_lifts_it(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """Once the move is done, the mark stays on the old shard for a while (`FROZEN_AFTER_S`:
    a change slower than the whole move is refused there too) and none is on the new
    one; moving the project back removes it first, so its callbacks change there again."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.register(_registration("http://127.0.0.1:9/a"), "BUILD_END")
        mover = Mover(router, lambda _: None, settle_s=0.05, late_s=0)
        await mover.move("mv", 1)
        left_ms = await src.redis.pttl(src.keys.callbacks_frozen("mv"))
        assert 590_000 < left_ms <= 600_000
        with pytest.raises(Unavailable, match="is moving to another shard"):
            await src.register(_registration("http://127.0.0.1:9/late"), "BUILD_END")
        assert await router.callbacks("mv").register(
            _registration("http://127.0.0.1:9/b"), "BUILD_END"
        )
        await mover.move("mv", 0)
        assert not await src.redis.exists(src.keys.callbacks_frozen("mv"))
        assert await dst.redis.pttl(dst.keys.callbacks_frozen("mv")) > 590_000
        assert await router.callbacks("mv").register(
            _registration("http://127.0.0.1:9/c"), "BUILD_END"
        )
        assert len(await _ids(src)) == 3


async def test_a_role_change_that_lands_after_the_copy_is_refused_not_lost(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """A revoke passes the placement's check before a move freezes the project, and lands
    on the old shard after the move copied its roles. It is refused (503, `try again`)
    and alice keeps her role where the project now lives, as she had it: the answer says
    what happened. Before, the revoke was answered as done, and alice kept her role on the
    new shard (the copy took it before the revoke landed): she kept her access."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src, dst = router.shards
        await src.register(_registration("http://127.0.0.1:9/a"), "BUILD_END")
        await router.grant("mv", "alice", Role.MEMBER)
        services = router.writing("mv")  # the placement's check passes: no move yet
        moving = asyncio.create_task(
            Mover(router, lambda _: None, settle_s=0.2, late_s=0).move("mv", 1)
        )

        async def copied() -> bool:
            return bool(await dst.roles.list("mv"))

        await until(copied, 30, "the move to copy the roles")
        with pytest.raises(Unavailable, match=r"is moving to another shard.*try again") as exc:
            await services.roles.revoke("mv", "alice")
        assert exc.value.http_status == 503
        await moving
        assert await dst.roles.list("mv") == {"alice": Role.MEMBER}
        assert await src.roles.list("mv") == {}


async def test_every_change_of_a_frozen_projects_roles_is_refused_but_the_movers(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """While the mark is set, a grant and a revoke answer 503 and change nothing; the
    mover's own copy (a grant it makes) and its removal of the project's roles are not
    stopped. Without the mark, the same changes go through."""
    async with Router.open(_two_empty_shards(shard_servers)) as router:
        src = router.shards[0]
        await src.roles.grant("mv", "alice", Role.MEMBER)
        await src.redis.set(src.keys.callbacks_frozen("mv"), "mover/1")
        with pytest.raises(Unavailable, match="is moving to another shard"):
            await src.roles.grant("mv", "bob", Role.ADMIN)
        with pytest.raises(Unavailable, match="is moving to another shard"):
            await src.roles.grant("mv", "alice", Role.ADMIN)
        with pytest.raises(Unavailable, match="is moving to another shard"):
            await src.roles.revoke("mv", "alice")
        assert await src.roles.list("mv") == {"alice": Role.MEMBER}
        await src.roles.grant("mv", "carol", Role.ADMIN, mover=True)
        assert await src.roles.list("mv") == {"alice": Role.MEMBER, "carol": Role.ADMIN}
        await src.redis.delete(src.keys.callbacks_frozen("mv"))
        await src.roles.grant("mv", "bob", Role.ADMIN)
        assert await src.roles.revoke("mv", "alice")
        assert await src.roles.list("mv") == {"bob": Role.ADMIN, "carol": Role.ADMIN}


async def test_a_key_rotation_skips_a_frozen_projects_callbacks_and_says_so(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """`dispatcher tokens rotate` leaves the callbacks of a project frozen on the shard (a
    move may be copying them: what it read there goes to the new shard as it was read)
    as they are, and counts them; the others are re-encrypted. Once the mark is gone, a
    rotation takes them too. A mark left where the project's callbacks are gone (it moved
    off the shard less than 10 minutes ago) is counted too. Before, it re-encrypted them
    on the old shard while the move's copy, read before, landed on the new shard under
    the key about to be retired, and nothing said so (review)."""
    old_key, new_key = TokenCipher.new_key(), TokenCipher.new_key()
    settings = _two_empty_shards(shard_servers)
    async with Router.open(settings) as router:
        src = router.shards[0]
        old = make_settings(shard_servers[0].url, token_keys=old_key).token_cipher()
        registry = Registry(src.redis, old, src.keys)
        frozen = await registry.create("mv", "http://127.0.0.1:9/a", "BUILD_END", DEVNET, "s1")
        other = await registry.create("kept", "http://127.0.0.1:9/b", "BUILD_END", DEVNET, "s2")
        stored = await _tokens(src, frozen[0], other[0])
        await src.redis.set(src.keys.callbacks_frozen("mv"), "mover/1")
        both = make_settings(shard_servers[0].url, token_keys=f"{new_key},{old_key}")
        rotating = Registry(src.redis, both.token_cipher(), src.keys)
        assert await rotating.rotate_tokens() == (1, 1, 1, ())  # (re-encrypted, skipped, marks)
        now = await _tokens(src, frozen[0], other[0])
        assert (now[0] == stored[0], now[1] == stored[1]) == (True, False)
        await src.redis.delete(src.keys.callbacks_frozen("mv"))
        assert await rotating.rotate_tokens() == (2, 0, 0, ())
        assert (await _tokens(src, frozen[0]))[0] != stored[0]
        # a project moved off the shard (its callbacks gone) a minute ago: its mark stays,
        # and its copy may have landed on the new shard after the rotation passed there
        await src.redis.set(src.keys.callbacks_frozen("gone"), "mover/2", ex=540)
        assert await rotating.rotate_tokens() == (2, 0, 1, ())


async def _tokens(services: Services, *callback_ids: int) -> list[bytes | None]:
    """The stored (encrypted) secret tokens of those callbacks."""
    return [
        await services.redis.hget(services.keys.callback(cid), "secretToken")  # type: ignore[misc]  # sync|async
        for cid in callback_ids
    ]
