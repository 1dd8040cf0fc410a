"""`Registry`: callbacks in Redis, at every level, each operation one or two round trips."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import structlog

from dispatcher import keys
from dispatcher.clock import now_ms
from dispatcher.errors import InvalidEvent, InvalidInput, LimitReached, NotFound
from dispatcher.failing import failing_names
from dispatcher.headers import check_auth_header
from dispatcher.keys import Keys
from dispatcher.lua import run_pipeline
from dispatcher.models import (
    Callback,
    CallbackPage,
    CreateCallBackResult,
    Event,
    Level,
    Region,
    parse_event,
    parse_events,
)
from dispatcher.registry import scripts
from dispatcher.registry.match import TARGET_FIELDS, CallbackTarget, ChunkQuery
from dispatcher.registry.options import NO_OPTIONS, Options
from dispatcher.registry.registration import Registration
from dispatcher.registry.rotation import Rotated, rotate_all
from dispatcher.registry.rows import Upsert, to_callback
from dispatcher.registry.rules import check_event, check_scope, check_token, moving, validate_url
from dispatcher.registry.scripts import DeleteCallback, RotateToken, SetEnabled, UpgradeMatchSet
from dispatcher.tokens import readable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.headers import AuthHeader
    from dispatcher.tokens import TokenCipher

__all__ = ["LAYOUT", "Registry"]

log = structlog.get_logger("dispatcher.registry")

LAYOUT = b"2"  # ordered match sets (see self.keys.py)
MATCH_ALL_CHUNK = 1000


class Registry:
    """Callbacks in Redis: a project's (`pipeline_id` None), a pipeline's, and the
    platform's (project `DEVOPS_ALL_PROJECT`). Registration is an upsert on (project,
    pipeline, url, event): registering again updates the region, the token, the auth
    header and the options, and re-enables the callback."""

    def __init__(
        self,
        redis: Redis,
        cipher: TokenCipher | None = None,
        keys: Keys | None = None,
        *,
        id_floor: int = 0,
        limit: int = 0,
    ) -> None:
        self.redis = redis
        self.cipher = cipher
        self.keys = keys or Keys()
        self.id_floor = id_floor  # new callbacks' ids start above it (the shard's range)
        self.limit = limit  # callbacks a project may have (0: no limit)

    async def create(
        self,
        project_id: str,
        url: str,
        event: Event | str,
        region: Region,
        secret_token: str | None = None,
        *,
        creator: str | None = None,
        pipeline_id: str | None = None,
        auth_header: AuthHeader | None = None,
        options: Options | None = None,
    ) -> tuple[int, bool]:
        """`register` of a registration made of these; returns (id, created)."""
        registration = Registration(
            project_id, url, region, creator or "", secret_token, pipeline_id, auth_header, options
        )
        return await self.register(registration, event)

    async def register(self, registration: Registration, event: Event | str) -> tuple[int, bool]:
        """Register (or update and re-enable) one callback; returns (id, created)."""
        level = check_scope(registration.project_id, registration.pipeline_id)
        parsed = check_event(parse_event(event) if isinstance(event, str) else event, level)
        upsert = self._checked(level, registration)
        (callback_id, created), *_ = await self._upsert_many(upsert, [parsed])
        if callback_id == scripts.FROZEN:
            raise moving(registration.project_id)
        if not callback_id:
            raise LimitReached(self._full(registration.project_id))
        return callback_id, created

    async def register_batch(self, registration: Registration, events: str) -> CreateCallBackResult:
        """The batch route: every valid event of the comma-separated list is registered."""
        level = check_scope(registration.project_id, registration.pipeline_id)
        upsert = self._checked(level, registration)
        parsed, failed = parse_events(events)
        if not parsed and not failed:
            raise InvalidEvent("event is required (a comma-separated list)", param="event")
        valid = []
        for event in parsed:
            try:
                valid.append(check_event(event, level))
            except InvalidEvent as exc:
                failed[event.value] = exc.message
        done = []
        written = await self._upsert_many(upsert, valid)
        if any(callback_id == scripts.FROZEN for callback_id, _ in written):  # (the others: again)
            raise moving(registration.project_id)
        for event, (callback_id, _) in zip(valid, written, strict=True):
            if callback_id:
                done.append(event.value)
            else:
                failed[event.value] = self._full(registration.project_id)
        return CreateCallBackResult(success_events=done, failure_events=failed)

    def _full(self, project_id: str) -> str:
        return (
            f"project {project_id} is at its limit of {self.limit} callbacks "
            "(DISPATCHER_MAX_CALLBACKS_PER_PROJECT): delete one to register another"
        )

    def _checked(self, level: Level, r: Registration) -> Upsert:
        """A registration once every parameter is valid, its secrets encrypted."""
        name, value = check_auth_header(*r.auth_header) if r.auth_header else ("", "")
        return Upsert(
            project_id=r.project_id,
            pipeline_id=r.pipeline_id,
            level=level,
            url=validate_url(r.url),
            region=r.region,
            token=self._encrypt(check_token(r.secret_token)),
            auth_header=(name, self._encrypt(value)) if name else None,
            creator=r.creator,
            options=(r.options or NO_OPTIONS).checked(),
        )

    async def _upsert_many(self, upsert: Upsert, events: list[Event]) -> list[tuple[int, bool]]:
        """(id, created) of each event's callback; id 0 for a new one its project had no
        room for."""
        if not events:
            return []
        now = now_ms()

        def upsert_all(pipe: Pipeline) -> None:
            for event in events:
                upsert.script(self.keys, event, now, self.id_floor, self.limit).queue_on(pipe)

        results: list[list[int]] = await run_pipeline(self.redis, upsert_all)
        return [(int(cid), bool(created)) for cid, created in results[: len(events)]]

    # ---- secrets ---------------------------------------------------------------------

    def _encrypt(self, secret: str) -> str:
        return self.cipher.encrypt(secret) if self.cipher is not None and secret else secret

    def decrypt(self, stored: bytes | None) -> str:
        """A stored secret (token, auth header value) as sent (`tokens.readable`)."""
        return readable(self.cipher, (stored or b"").decode())

    async def rotate_tokens(self) -> Rotated:
        """Re-encrypt every stored secret (tokens and auth header values) with the cipher's
        first key; returns how many (one changed meanwhile is left as it was changed), and
        how many callbacks of projects moving off this shard were skipped."""
        if self.cipher is None:
            raise InvalidInput("no DISPATCHER_TOKEN_KEYS configured: nothing to rotate with")
        return await rotate_all(self.redis, self.keys, self.cipher)

    async def rotate_secret(
        self,
        callback_id: int,
        project_id: str,
        secret_token: str,
        overlap_s: float,
        *,
        pipeline_id: str | None = None,
    ) -> None:
        """Make `secret_token` the callback's token; the current one goes on signing beside
        it for `overlap_s` seconds (0: it stops at once)."""
        token = check_token(secret_token)
        if not token:
            raise InvalidInput("secretToken is required: the new token", param="secretToken")
        now = now_ms()
        until = now + int(overlap_s * 1000) if overlap_s > 0 else ""
        done = await RotateToken(
            self.keys.callback(callback_id),
            self.keys.registry_version(project_id),
            self.keys.callbacks_frozen(project_id),
            project_id,
            pipeline_id or "",
            self._encrypt(token),
            until,
            now,
        ).run(self.redis)
        if done == scripts.FROZEN:
            raise moving(project_id)
        if not done:
            raise NotFound(f"callback {callback_id} not found in {_where(project_id, pipeline_id)}")

    # ---- matching --------------------------------------------------------------------

    def chunk_query(
        self,
        project_id: str,
        event: str,
        *,
        pipeline_id: object = None,
        after: int = 0,
        size: int = MATCH_ALL_CHUNK,
    ) -> ChunkQuery:
        """The `size` callbacks after callback id `after` that an event of `project_id`
        (whose data names `pipeline_id`) goes to; see `registry.match`."""
        return ChunkQuery(self.keys, self.decrypt, project_id, event, pipeline_id, after, size)

    async def match(
        self, project_id: str, event: str, *, pipeline_id: object = None
    ) -> list[CallbackTarget]:
        """Every callback an event may go to, chunk by chunk, before the filters: those a
        broader callback with a filter shadows included (`Chunk.shadows`; for tools and
        tests)."""
        found: list[CallbackTarget] = []
        after: int | None = 0
        while after is not None:
            query = self.chunk_query(project_id, event, pipeline_id=pipeline_id, after=after)
            chunk = query.read((await run_pipeline(self.redis, query.queue_on))[0])
            found += chunk.targets
            after = chunk.after
        return found

    async def target(self, callback_id: int) -> CallbackTarget | None:
        """The current URL/region/secrets/options of one callback, or None when gone or
        disabled."""
        values = await self.redis.hmget(  # type: ignore[misc]  # redis-py's sync|async union
            self.keys.callback(callback_id), [*TARGET_FIELDS, "projectId"]
        )
        *fields, project = values
        if fields[0] is None or fields[1] != b"1":
            return None
        return CallbackTarget.from_fields(callback_id, fields, self.decrypt, owner=project.decode())

    # ---- reading, deleting, switching --------------------------------------------------

    async def get(
        self, callback_id: int, project_id: str | None = None, pipeline_id: str | None = None
    ) -> Callback:
        """One callback; NotFound unless it is `project_id`'s (and `pipeline_id`'s)."""
        (row,) = await self._rows([callback_id])
        if (
            not row
            or (project_id is not None and row.get("projectId") != project_id)
            or (pipeline_id is not None and row.get("pipelineId") != pipeline_id)
        ):
            raise NotFound(f"callback {callback_id} not found in {_where(project_id, pipeline_id)}")
        return to_callback(row)

    async def _rows(self, callback_ids: Sequence[int | str]) -> list[dict[str, str]]:
        """The hashes of callbacks (empty for one that is gone), with their filter errors
        as `filterErrors` and `filterLastError`, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in callback_ids:
                pipe.hgetall(self.keys.callback(cid))
                pipe.hmget(self.keys.filter_errors(cid), ["n", "lastError"])
            answers = await pipe.execute()
        rows = []
        for raw, (errors, last) in zip(answers[::2], answers[1::2], strict=True):
            row = {k.decode(): v.decode() for k, v in raw.items()}
            if row and errors:
                row |= {"filterErrors": errors.decode(), "filterLastError": last.decode()}
            rows.append(row)
        return rows

    async def list(
        self, project_id: str, page: int = 1, page_size: int = 20, *, pipeline_id: str | None = None
    ) -> CallbackPage:
        """A project's callbacks (its pipelines' included), or one pipeline's, oldest first,
        page by page."""
        if page < 1 or page_size < 1:
            raise InvalidInput("page and pageSize must be >= 1", param="page")
        listing = (
            self.keys.pipeline_callbacks(project_id, pipeline_id)
            if pipeline_id
            else self.keys.project_callbacks(project_id)
        )
        start = (page - 1) * page_size
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(listing)
            pipe.zrange(listing, start, start + page_size - 1)
            count, ids = await pipe.execute()
        rows = await self._rows([cid.decode() for cid in ids])
        records = [to_callback(row) for row in rows if row]
        return CallbackPage(
            records=records,
            count=count,
            total_pages=math.ceil(count / page_size),
            page_size=page_size,
            page=page,
        )

    async def delete(
        self,
        project_id: str,
        callback_id: int,
        *,
        pipeline_id: str | None = None,
        mover: bool = False,
    ) -> None:
        """Delete one of the project's callbacks (of that pipeline, when one is named);
        `mover`: a move's removal from the old shard, which its freeze does not stop."""
        k = self.keys
        found = await self.redis.hmget(  # type: ignore[misc]  # sync|async
            k.callback(callback_id), ["projectId", "event", "url", "pipelineId"]
        )
        owner, event, url, pipeline = (value.decode() if value else "" for value in found)
        done = owner == project_id and (not pipeline_id or pipeline == pipeline_id)
        if done:
            script = DeleteCallback.of(k, callback_id, project_id, pipeline, event, url)
            script.mover = "1" if mover else "0"
            done = await script.run(self.redis)
        if done == scripts.FROZEN:
            raise moving(project_id)
        if not done:
            raise NotFound(f"callback {callback_id} not found in {_where(project_id, pipeline_id)}")

    async def set_enabled(
        self,
        callback_id: int,
        enabled: bool,
        reason: str = "",
        *,
        project_id: str | None = None,
    ) -> None:
        """Enable, or disable with a reason. `project_id` restricts it to that project."""
        queue = self.queue_set_enabled
        (done,) = await run_pipeline(
            self.redis, lambda pipe: queue(pipe, callback_id, enabled, reason, project_id, True)
        )
        if done == scripts.FROZEN:
            raise moving(project_id or "of the callback")
        if not done:
            raise NotFound(f"callback {callback_id} not found in {_where(project_id, None)}")

    def queue_set_enabled(
        self,
        pipe: Pipeline,
        callback_id: int,
        enabled: bool,
        reason: str = "",
        project_id: str | None = None,
        fenced: bool = False,
    ) -> None:
        """`set_enabled` queued on a pipeline; its answer is 0 when the callback is missing
        (`fenced`: `FROZEN` while its project moves off this shard; the worker's is not)."""
        k = self.keys
        SetEnabled(
            callback=k.callback(callback_id),
            disabled=k.CALLBACKS_DISABLED,
            **failing_names(k),
            health=k.health(callback_id),
            enabled="1" if enabled else "0",
            reason=reason,
            now_ms=now_ms(),
            match_prefix=k.MATCH_PREFIX,
            sep=keys.SEP,
            project_id=project_id or "",
            version_prefix=k.REGISTRY_VERSION_PREFIX,
            frozen_prefix=k.CALLBACKS_FROZEN_PREFIX if fenced else "",
        ).queue_on(pipe)

    async def upgrade(self) -> int:
        """Convert a layout-1 registry (match sets as SETs) to this one; returns how many
        match sets it converted. Safe to run by many processes at once, and again."""
        if await self.redis.get(self.keys.CALLBACKS_LAYOUT) == LAYOUT:
            return 0
        converted = 0
        async for key in self.redis.scan_iter(match=f"{self.keys.MATCH_PREFIX}*", count=500):
            converted += int(await UpgradeMatchSet(key.decode()).run(self.redis))
        await self.redis.set(self.keys.CALLBACKS_LAYOUT, LAYOUT)
        if converted:
            log.info("registry.upgraded", match_sets=converted, layout=LAYOUT.decode())
        return converted


def _where(project_id: str | None, pipeline_id: str | None) -> str:
    if pipeline_id:
        return f"pipeline {pipeline_id} of project {project_id}"
    return f"project {project_id or '*'}"
