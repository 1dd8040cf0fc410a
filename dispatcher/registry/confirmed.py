"""`ConfirmedRegistry`: the `Registry` of `Services`, whose changes a front end acknowledges
(the API, the console, the CLI: all go through `Services`), each confirmed by the replicas
`DISPATCHER_REDIS_MIN_REPLICAS` asks for before it returns, as an emit is.

Unconfirmed, a change acknowledged a moment before a failover was undone by it: a deleted
callback pointing at a compromised receiver came back, a rotation away from a leaked secret
was reverted, while the API had answered 200 (review). Short of the replicas within
`DISPATCHER_EMIT_WAIT`, the change (made on the master) is answered `NotReplicated` (503),
saying so and whether doing it again is safe: it is for each (a registration is an upsert;
a delete done already answers 404; a switch sets what it sets; a rotation to the token the
callback holds already changes nothing, here, so a repeat keeps the old token's overlap: it
made the current token the previous one, and the old one stopped signing at once).

A move's removal of a callback from the old shard (`mover`) is not confirmed here: the move
confirms its own steps (`shards.drain`). Nor is a worker's disable (a receiver's 410), which
it acknowledges to nobody.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dispatcher.errors import NotFound, NotReplicated
from dispatcher.registry.rules import check_token
from dispatcher.registry.store import Registry
from dispatcher.replication import Replication, confirm

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys
    from dispatcher.models import CreateCallBackResult, Event
    from dispatcher.registry.registration import Registration
    from dispatcher.registry.rotation import Rotated
    from dispatcher.settings import Settings

__all__ = ["ConfirmedRegistry"]

REGISTERED = (
    "the callback is registered",
    "register it again once they are back (safe: a registration is an upsert, made once)",
)
DELETED = (
    "the callback is deleted",
    "delete it again once they are back (safe: a 404 then says it is gone)",
)
ROTATED = (
    "the new token is set",
    "rotate to the same token again once they are back (safe: a rotation to the token the "
    "callback holds already changes nothing, the old token's overlap kept)",
)
REENCRYPTED = (
    "the secrets are re-encrypted",
    "keep the old key and run it again once they are back (safe)",
)


class ConfirmedRegistry(Registry):
    """A `Registry` whose acknowledged changes wait for `replication`'s replicas, trying
    for up to `wait_s` seconds; NotReplicated (503) short of them."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        replication: Replication | None,
        settings: Settings,
        *,
        id_floor: int = 0,
    ) -> None:
        super().__init__(
            redis,
            settings.token_cipher(),
            keys,
            id_floor=id_floor,
            limit=settings.max_callbacks_per_project,
        )
        self.replication = replication
        self.wait_s = settings.emit_wait

    @classmethod
    def of(cls, settings: Settings, redis: Redis, keys: Keys, id_floor: int) -> ConfirmedRegistry:
        """The registry of a shard's services (`keys`, ids from `id_floor`)."""
        return cls(redis, keys, Replication.of(settings, keys), settings, id_floor=id_floor)

    async def confirmed(self, done: str = "the change is made", again: str = "do it again") -> None:
        """Wait until the replicas hold every write the master holds so far; NotReplicated
        saying that `done` on the master, unconfirmed, and `again` what to do."""
        if self.replication is None:
            return
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                await confirm(self.redis, self.replication)
                return
            except NotReplicated as exc:  # (each try is a WAIT of up to its bound)
                if time.monotonic() >= deadline:
                    raise NotReplicated(
                        f"{done} on Redis' master, but {exc.message}, so a failover now "
                        f"would undo it: not confirmed; {again}",
                        confirmed=exc.confirmed,
                        wanted=exc.wanted,
                    ) from exc

    async def register(self, registration: Registration, event: Event | str) -> tuple[int, bool]:
        found = await super().register(registration, event)
        await self.confirmed(*REGISTERED)
        return found

    async def register_batch(self, registration: Registration, events: str) -> CreateCallBackResult:
        result = await super().register_batch(registration, events)
        await self.confirmed(*REGISTERED)
        return result

    async def delete(
        self,
        project_id: str,
        callback_id: int,
        *,
        pipeline_id: str | None = None,
        mover: bool = False,
    ) -> None:
        try:
            await super().delete(project_id, callback_id, pipeline_id=pipeline_id, mover=mover)
        except NotFound:  # gone already: a 404 says so once the replicas hold it too (a
            if not mover:  # repeat after a 503 answered 404 unconfirmed: review)
                await self.confirmed(*DELETED)
            raise
        if not mover:
            await self.confirmed(*DELETED)

    async def set_enabled(
        self, callback_id: int, enabled: bool, reason: str = "", *, project_id: str | None = None
    ) -> None:
        await super().set_enabled(callback_id, enabled, reason, project_id=project_id)
        switched = "enabled" if enabled else "disabled"
        again = f"{switched[:-1]} it again once they are back (safe)"
        await self.confirmed(f"the callback is {switched}", again)

    async def rotate_secret(
        self,
        callback_id: int,
        project_id: str,
        secret_token: str,
        overlap_s: float,
        *,
        pipeline_id: str | None = None,
    ) -> None:
        """`Registry.rotate_secret`, but a rotation to the token the callback holds already
        changes nothing (with an overlap: `overlap_s` 0 ends the old one's at once)."""
        held = overlap_s > 0 and await self._holds(
            callback_id, project_id, pipeline_id, secret_token
        )
        if not held:
            await super().rotate_secret(
                callback_id, project_id, secret_token, overlap_s, pipeline_id=pipeline_id
            )
        await self.confirmed(*ROTATED)

    async def _holds(
        self, callback_id: int, project_id: str, pipeline_id: str | None, secret_token: str
    ) -> bool:
        """Whether the callback is `project_id`'s (`pipeline_id`'s) and its token is
        `secret_token` already (one no key decrypts is not)."""
        token = check_token(secret_token)
        owner, pipeline, stored = await self.redis.hmget(  # type: ignore[misc]  # sync|async
            self.keys.callback(callback_id), ["projectId", "pipelineId", "secretToken"]
        )
        if not token or not stored or (owner or b"").decode() != project_id:
            return False
        if pipeline_id and (pipeline or b"").decode() != pipeline_id:
            return False
        try:
            return self.decrypt(stored) == token
        except ValueError:  # no key decrypts it (NoKeys too)
            return False

    async def rotate_tokens(self) -> Rotated:
        rotated = await super().rotate_tokens()
        await self.confirmed(*REENCRYPTED)
        return rotated
