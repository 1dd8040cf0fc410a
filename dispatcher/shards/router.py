"""The router: the services of every shard, and which one serves a project.

Front ends (API, console, CLI) hold a `Router` instead of one `Services`: `of(project)`
is the project's shard for reading, `writing(project)` for changing its callbacks or roles
(refused while a move freezes them), and `callbacks(project)` the object that manages a
scope's callbacks: the shard's services, or, for the platform-wide callbacks
(`DEVOPS_ALL_PROJECT`), `PlatformCallbacks`, which writes them to every shard. The
operator's views over all shards are in `views.py`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, TypeVar

from dispatcher.auth import ALL_PROJECTS
from dispatcher.errors import NotFound
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.placement import Placement, kept_fresh
from dispatcher.registry.rules import moving
from dispatcher.services import Services
from dispatcher.shard import Shard
from dispatcher.shards.platform import PlatformCallbacks
from dispatcher.topology import close_all, connect_shards, shards_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from redis.asyncio import Redis

    from dispatcher.auth import Role
    from dispatcher.settings import Settings

__all__ = ["Router"]

T = TypeVar("T")


class Router:
    """Every shard's `Services` (`shards`, by position; `home` is shard 0) and the
    `placement` that says which holds a project."""

    def __init__(self, settings: Settings, shards: list[Services], placement: Placement) -> None:
        self.settings = settings
        self.shards = shards
        self.home = shards[0]
        self.placement = placement
        self.platform = PlatformCallbacks(shards)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        redis: Redis | None = None,
        *,
        home_wait_s: float | None = None,
        unread_ok: bool = False,
    ) -> AsyncIterator[Router]:
        """A router on every shard of `settings` (its clients closed at the end), or on the
        one Redis client `redis` (left open). `home_wait_s` bounds the wait for shard 0's
        placement, and `unread_ok` goes on without it (`placement.kept_fresh`)."""
        async with contextlib.AsyncExitStack() as stack:
            if redis is not None:
                shards, clients = [Shard.single(settings.queue_name)], [redis]
            else:
                shards = shards_of(settings)
                clients = connect_shards(settings, shards)
                stack.push_async_callback(close_all, clients)
            services = [
                Services(settings, client, shard)
                for shard, client in zip(shards, clients, strict=True)
            ]
            for one in services:
                stack.push_async_callback(one.close)
            placement = Placement(len(shards), clients[0], shards[0].keys)
            every = settings.placement_refresh
            fresh = kept_fresh(placement, every, home_wait_s, unread_ok=unread_ok)
            await stack.enter_async_context(fresh)
            yield cls(settings, services, placement)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def of(self, project_id: str) -> Services:
        """The services of `project_id`'s shard (the home shard's for the platform's)."""
        if project_id in (PLATFORM_PROJECT, ALL_PROJECTS):
            self.placement.usable()
            return self.home
        return self.shards[self.placement.shard_of(project_id)]  # 0 of one, or refused

    def writing(self, project_id: str) -> Services:
        """`of(project_id)` to change its callbacks or roles: Unavailable (503) while a move
        to another shard has frozen them."""
        if self.sharded and self.placement.moving(project_id):
            raise moving(project_id)
        return self.of(project_id)

    def callbacks(self, project_id: str, *, changing: bool = True) -> Services | PlatformCallbacks:
        """Who manages the callbacks of `project_id` (to change them, or only to read them):
        its shard's services, or for `DEVOPS_ALL_PROJECT` the platform's callbacks on every
        shard."""
        if project_id == PLATFORM_PROJECT and self.sharded:
            return self.platform
        return self.writing(project_id) if changing else self.of(project_id)

    async def grant(self, project_id: str, user: str, role: Role) -> None:
        """Give `user` a role in a project (in `*`, every project: on every shard)."""
        for services in self._role_shards(project_id):
            await services.roles.grant(project_id, user, role)

    async def revoke(self, project_id: str, user: str) -> bool:
        """Take `user`'s role in a project away; False when there was none."""
        revoked = [await s.roles.revoke(project_id, user) for s in self._role_shards(project_id)]
        return any(revoked)

    def _role_shards(self, project_id: str) -> list[Services]:
        return self.shards if project_id == ALL_PROJECTS else [self.writing(project_id)]

    async def switch_anywhere(
        self, callback_id: int, enabled: bool, *, by: str, reason: str | None = None
    ) -> None:
        """Enable or disable a callback known by its id alone (an operator's tool): on
        every shard that holds it (each holds a platform-wide one); NotFound on none."""
        found = False
        for services in self.shards:
            try:
                if enabled:
                    await services.enable(callback_id)
                else:
                    await services.disable(callback_id, by=by, reason=reason)
            except NotFound:
                continue
            found = True
        if not found:
            raise NotFound(f"callback {callback_id} not found")

    async def each(self, step: Callable[[Services], Awaitable[T]]) -> list[T]:
        """`step` on every shard's services, one after the other."""
        return [await step(services) for services in self.shards]

    async def upgrade(self) -> bool:
        """`Services.upgrade` on every shard; False when one could not be reached."""
        return all([await services.upgrade() for services in self.shards])
