"""Who may do what: a per-project role store (admin, member) in Redis.

Creating, deleting, enabling, redelivering and emitting need `admin`; listing and history
need `member` (admins are members). A grant on project `*` holds for every project, for
the platform's own service accounts. With `open_access` every caller is an admin.
Nobody has a role in `DEVOPS_ALL_PROJECT`, the platform-wide callbacks' project: only the
operator token manages them.

A grant or a revoke is a script that refuses (`Unavailable`, 503) while the project's
`callbacks_frozen` mark is set on the shard: its mover sets it on the old shard before it
copies the project's roles (`dispatcher.shards.move`), so that a change that passed the
front end's check of the placement before the freeze, and lands after the copy, is refused
rather than answered and then undone by the move (a revoked user keeping the role on the
new shard). The mover's own copy passes (`mover`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.batch import Batcher
from dispatcher.errors import Forbidden, InvalidInput
from dispatcher.lua import Key, Script
from dispatcher.models import PLATFORM_PROJECT
from dispatcher.registry.rules import moving
from dispatcher.registry.scripts import FROZEN

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = ["ALL_PROJECTS", "DropRole", "PutRole", "Role", "Roles"]

ALL_PROJECTS = "*"


class Role(enum.StrEnum):
    """Project roles, weakest first."""

    MEMBER = "member"
    ADMIN = "admin"

    def covers(self, needed: Role) -> bool:
        return self is Role.ADMIN or needed is Role.MEMBER


@dataclass
class PutRole(Script):
    """Gives `user` the `role` in the project whose roles are `roles`; returns 1, or
    `FROZEN` (nothing written) while the project is `frozen` on this shard, unless `mover`
    ('1': a move's copy of the project's roles)."""

    LUA = f"""
    if mover ~= '1' and redis.call('EXISTS', frozen) == 1 then return {FROZEN} end
    redis.call('HSET', roles, user, role)
    return 1
    """
    roles: Key
    frozen: Key
    user: str
    role: str
    mover: str = "0"


@dataclass
class DropRole(Script):
    """Takes `user`'s role in the project whose roles are `roles` away; returns 1, 0 when
    there was none, or `FROZEN` (nothing removed) while the project is `frozen` here."""

    LUA = f"""
    if redis.call('EXISTS', frozen) == 1 then return {FROZEN} end
    return redis.call('HDEL', roles, user)
    """
    roles: Key
    frozen: Key
    user: str


class Roles:
    """The role store. Lookups go through a group commit (`batcher`, the services' one when
    given): the checks of concurrent requests share a round trip."""

    def __init__(
        self, redis: Redis, settings: Settings, keys: Keys, batcher: Batcher | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.open_access = settings.open_access
        self.batcher = batcher or Batcher(redis, window=0)

    async def role(self, project_id: str, user: str) -> Role | None:
        """The strongest role `user` has in `project_id` (direct or through `*`)."""

        def lookup(pipe: Pipeline) -> None:
            pipe.hget(self.keys.roles(project_id), user)
            pipe.hget(self.keys.roles(ALL_PROJECTS), user)

        found = [Role(v.decode()) for v in await self.batcher.execute(lookup) if v]
        if Role.ADMIN in found:
            return Role.ADMIN
        return found[0] if found else None

    async def effective(self, project_id: str, user: str) -> Role | None:
        """The role that counts: `role`, or admin for everyone under `open_access`."""
        return Role.ADMIN if self.open_access else await self.role(project_id, user)

    async def require(self, project_id: str, user: str, needed: Role) -> Role:
        """The caller's effective role, once it covers `needed` (else Forbidden)."""
        if project_id == PLATFORM_PROJECT:
            raise Forbidden(
                f"{PLATFORM_PROJECT} holds the platform-wide callbacks: only the operator "
                "token manages them (/operator/callbacks)"
            )
        role = await self.effective(project_id, user)
        if role is None or not role.covers(needed):
            raise Forbidden(
                f"user {user!r} needs the {needed.value} role in project {project_id!r}"
                + (f" (has {role.value})" if role else " (has none)")
            )
        return role

    async def grant(self, project_id: str, user: str, role: Role, *, mover: bool = False) -> None:
        """Give `user` the role (`mover`: a move's copy, which its freeze does not stop)."""
        if not project_id or not user:
            raise InvalidInput("project and user are required")
        if project_id == PLATFORM_PROJECT:
            raise InvalidInput(
                f"no role can be granted in {PLATFORM_PROJECT}: the operator token manages "
                "platform-wide callbacks"
            )
        k = self.keys
        put = PutRole(k.roles(project_id), k.callbacks_frozen(project_id), user, role.value)
        put.mover = "1" if mover else "0"
        if await put.run(self.redis) == FROZEN:
            raise moving(project_id)

    async def revoke(self, project_id: str, user: str) -> bool:
        """Take `user`'s role away; False when there was none."""
        k = self.keys
        done = await DropRole(k.roles(project_id), k.callbacks_frozen(project_id), user).run(
            self.redis
        )
        if done == FROZEN:
            raise moving(project_id)
        return bool(done)

    async def list(self, project_id: str) -> dict[str, Role]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(  # type: ignore[misc]  # sync|async
            self.keys.roles(project_id)
        )
        return {k.decode(): Role(v.decode()) for k, v in sorted(raw.items())}
