"""A fleet's shards as the operator grows them: a grow never places a project on a shard
without the platform-wide callbacks and `*` roles (and one stopped is finished by the
next), a process given fewer shards than are in use refuses to act, and the fleet views
show the shards that answer when one does not."""

from __future__ import annotations

from dispatcher.auth import ALL_PROJECTS, Role
from dispatcher.embedded import EmbeddedRedis
from dispatcher.models import PLATFORM_PROJECT, Region
from dispatcher.placement import Placement
from dispatcher.registry import Registration
from dispatcher.registry.copies import callback_ids
from dispatcher.settings import Settings
from dispatcher.shards.move import Mover
from dispatcher.shards.router import Router
from tests.helpers import make_settings
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
