"""The callback registry: who wants which event of which project, at which URL.

Registration is an upsert on (project, url, event): registering again updates the region
and token and re-enables the callback. `match()` is the fan-out's one round trip.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dispatcher import keys
from dispatcher.errors import InvalidEvent, InvalidInput, InvalidUrl, NotFound
from dispatcher.lua import Lua, run_pipeline
from dispatcher.models import (
    Callback,
    CallbackPage,
    CreateCallBackResult,
    Event,
    Region,
    parse_event,
    parse_events,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.tokens import TokenCipher

__all__ = ["MAX_URL_LENGTH", "CallbackTarget", "Registry", "validate_url"]

MAX_URL_LENGTH = 2048
MAX_TOKEN_LENGTH = 1024

# KEYS: upsert hash, id counter, project ids, match set, disabled zset, failing zset.
# ARGV: upsert field, project, url, event, region, token, now, creator, callback prefix,
# health prefix. Returns {id, 1 when created}.
_UPSERT = Lua("""
local id = redis.call('HGET', KEYS[1], ARGV[1])
local created = 0
if not id then
  id = tostring(redis.call('INCR', KEYS[2]))
  created = 1
  redis.call('HSET', KEYS[1], ARGV[1], id)
  redis.call('ZADD', KEYS[3], id, id)
end
local key = ARGV[9] .. id
if created == 1 then
  redis.call('HSET', key, 'id', id, 'projectId', ARGV[2], 'url', ARGV[3], 'event', ARGV[4],
             'createdTime', ARGV[7], 'creator', ARGV[8])
end
redis.call('HSET', key, 'region', ARGV[5], 'secretToken', ARGV[6], 'enabled', '1',
           'disabledReason', '', 'updatedTime', ARGV[7])
redis.call('SADD', KEYS[4], id)
redis.call('ZREM', KEYS[5], id)
redis.call('DEL', ARGV[10] .. id)
redis.call('ZREM', KEYS[6], id)
return {tonumber(id), created}
""")

# KEYS: match set. ARGV: callback key prefix, health key prefix. Each row ends with 1 when
# the callback has failures on record (so a success only then has to reset them).
_MATCH = Lua("""
local ids = redis.call('SMEMBERS', KEYS[1])
local out = {}
for i, id in ipairs(ids) do
  local row = redis.call('HMGET', ARGV[1] .. id, 'id', 'url', 'region', 'secretToken', 'enabled')
  if row[1] and row[5] == '1' then
    row[5] = redis.call('EXISTS', ARGV[2] .. id)
    out[#out + 1] = row
  end
end
return out
""")

# KEYS: callback hash, disabled zset, failing zset. ARGV: enabled ('1'/'0'), reason, now,
# match prefix, key separator, expected project ('' = any), health prefix (enabling starts
# the failure count again). Returns 0 when missing or in another project.
_SET_ENABLED = Lua("""
local row = redis.call('HMGET', KEYS[1], 'projectId', 'event', 'id')
if not row[1] or (ARGV[6] ~= '' and row[1] ~= ARGV[6]) then return 0 end
local match = ARGV[4] .. row[1] .. ARGV[5] .. row[2]
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'enabled', '1', 'disabledReason', '', 'updatedTime', ARGV[3])
  redis.call('SADD', match, row[3])
  redis.call('ZREM', KEYS[2], row[3])
  redis.call('DEL', ARGV[7] .. row[3])
  redis.call('ZREM', KEYS[3], row[3])
else
  redis.call('HSET', KEYS[1], 'enabled', '0', 'disabledReason', ARGV[2], 'updatedTime', ARGV[3])
  redis.call('SREM', match, row[3])
  redis.call('ZADD', KEYS[2], ARGV[3], row[3])
end
return 1
""")

# KEYS: callback hash, disabled zset, failing zset. ARGV: project, upsert prefix, project
# prefix, match prefix, health prefix, key separator, upsert field separator.
_DELETE = Lua("""
local row = redis.call('HMGET', KEYS[1], 'projectId', 'event', 'url', 'id')
if not row[1] or row[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], ARGV[5] .. row[4])
redis.call('HDEL', ARGV[2] .. row[1], row[2] .. ARGV[7] .. row[3])
redis.call('ZREM', ARGV[3] .. row[1], row[4])
redis.call('SREM', ARGV[4] .. row[1] .. ARGV[6] .. row[2], row[4])
redis.call('ZREM', KEYS[2], row[4])
redis.call('ZREM', KEYS[3], row[4])
return 1
""")


@dataclass(frozen=True, slots=True)
class CallbackTarget:
    """What a delivery needs of a callback (the token included)."""

    id: int
    url: str
    region: Region
    secret_token: str
    failing: bool = True  # failures on record (True when unknown: the reset is then written)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def validate_url(url: str) -> str:
    """Check that `url` is an absolute http(s) URL with a host; returns it trimmed."""
    url = url.strip()
    if not url:
        raise InvalidUrl("url is required", param="url")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidUrl(f"url is longer than {MAX_URL_LENGTH} characters", param="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUrl(f"url {url!r} is malformed: {exc}", param="url") from exc
    if parts.scheme not in {"http", "https"}:
        raise InvalidUrl(f"url must start with http:// or https://, got {url!r}", param="url")
    if not parts.hostname:
        raise InvalidUrl(f"url {url!r} has no host", param="url")
    if port == 0:
        raise InvalidUrl(f"url {url!r} has port 0", param="url")
    if any(ch.isspace() for ch in url):
        raise InvalidUrl("url must not contain white space", param="url")
    return url


def _to_callback(row: dict[str, str]) -> Callback:
    return Callback(
        id=int(row["id"]),
        project_id=row["projectId"],
        url=row["url"],
        event=Event(row["event"]),
        region=Region(row["region"]),
        enabled=row.get("enabled") == "1",
        disabled_reason=row.get("disabledReason") or None,
        has_secret_token=bool(row.get("secretToken")),
        created_time=int(row["createdTime"]),
        updated_time=int(row["updatedTime"]),
        creator=row.get("creator") or None,
    )


class Registry:
    """Callbacks in Redis. All methods are one or two round trips."""

    def __init__(self, redis: Redis, cipher: TokenCipher | None = None) -> None:
        self.redis = redis
        self.cipher = cipher

    async def create(
        self,
        project_id: str,
        url: str,
        event: Event | str,
        region: Region,
        secret_token: str | None = None,
        *,
        creator: str | None = None,
    ) -> tuple[int, bool]:
        """Register (or update and re-enable) one callback; returns (id, created)."""
        (callback_id, created), *_ = await self._upsert_many(
            project_id, url, [parse_event(event) if isinstance(event, str) else event],
            region, secret_token, creator,
        )  # fmt: skip
        return callback_id, created

    async def create_batch(
        self,
        project_id: str,
        url: str,
        events: str,
        region: Region,
        secret_token: str | None = None,
        *,
        creator: str | None = None,
    ) -> CreateCallBackResult:
        """The batch route: every valid event of the comma-separated list is registered."""
        valid, failed = parse_events(events)
        if not valid and not failed:
            raise InvalidEvent("event is required (a comma-separated list)", param="event")
        if valid:
            await self._upsert_many(project_id, url, valid, region, secret_token, creator)
        return CreateCallBackResult(success_events=[e.value for e in valid], failure_events=failed)

    async def _upsert_many(
        self,
        project_id: str,
        url: str,
        events: list[Event],
        region: Region,
        secret_token: str | None,
        creator: str | None,
    ) -> list[tuple[int, bool]]:
        _check_project(project_id)
        url = validate_url(url)
        token = secret_token or ""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidInput(
                f"secretToken is longer than {MAX_TOKEN_LENGTH} characters", param="secretToken"
            )
        if self.cipher is not None:
            token = self.cipher.encrypt(token)
        now = str(_now_ms())

        def upsert_all(pipe: Pipeline) -> None:
            for event in events:
                _UPSERT.queue(
                    pipe,
                    [
                        keys.callback_unique(project_id),
                        keys.CALLBACK_SEQ,
                        keys.project_callbacks(project_id),
                        keys.match(project_id, event.value),
                        keys.CALLBACKS_DISABLED,
                        keys.HEALTH_FAILING,
                    ],
                    [
                        keys.callback_unique_field(event.value, url), project_id, url,
                        event.value, region.value, token, now, creator or "",
                        keys.CALLBACK_PREFIX, keys.HEALTH_PREFIX,
                    ],
                )  # fmt: skip

        results: list[list[int]] = await run_pipeline(self.redis, upsert_all)
        return [(int(cid), bool(created)) for cid, created in results]

    async def match(self, project_id: str, event: str) -> list[CallbackTarget]:
        """The enabled callbacks of (project, event), in one round trip."""
        return self.targets(await _MATCH(self.redis, *_match_call(project_id, event)))

    @staticmethod
    def queue_match(pipe: Pipeline, project_id: str, event: str) -> None:
        """`match` queued on a pipeline (a Batcher's); read its result with `targets`."""
        _MATCH.queue(pipe, *_match_call(project_id, event))

    def targets(self, rows: list[list[Any]]) -> list[CallbackTarget]:
        return [
            CallbackTarget(
                int(cid), url.decode(), Region(region.decode()), self._token(token), bool(failing)
            )
            for cid, url, region, token, failing in rows
        ]

    def _token(self, stored: bytes) -> str:
        text = stored.decode()
        return self.cipher.decrypt(text) if self.cipher is not None and text else text

    async def target(self, callback_id: int) -> CallbackTarget | None:
        """The current URL/region/token of one callback, or None when gone or disabled."""
        row = await self.redis.hmget(  # type: ignore[misc]  # redis-py's sync|async union
            keys.callback(callback_id), ["url", "region", "secretToken", "enabled"]
        )
        url, region, token, enabled = row
        if url is None or enabled != b"1":
            return None
        return CallbackTarget(
            callback_id, url.decode(), Region(region.decode()), self._token(token)
        )

    async def get(self, callback_id: int, project_id: str | None = None) -> Callback:
        raw: dict[bytes, bytes] = await self.redis.hgetall(  # type: ignore[misc]  # sync|async
            keys.callback(callback_id)
        )
        row = {k.decode(): v.decode() for k, v in raw.items()}
        if not row or (project_id is not None and row.get("projectId") != project_id):
            raise NotFound(f"callback {callback_id} not found in project {project_id or '*'}")
        return _to_callback(row)

    async def list(self, project_id: str, page: int = 1, page_size: int = 20) -> CallbackPage:
        """One project's callbacks, oldest first, page by page."""
        if page < 1 or page_size < 1:
            raise InvalidInput("page and pageSize must be >= 1", param="page")
        start = (page - 1) * page_size
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.project_callbacks(project_id))
            pipe.zrange(keys.project_callbacks(project_id), start, start + page_size - 1)
            count, ids = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hgetall(keys.callback(cid.decode()))
            rows: list[dict[bytes, bytes]] = await pipe.execute()
        records = [
            _to_callback({k.decode(): v.decode() for k, v in raw.items()}) for raw in rows if raw
        ]
        return CallbackPage(
            records=records,
            count=count,
            total_pages=math.ceil(count / page_size),
            page_size=page_size,
            page=page,
        )

    async def delete(self, project_id: str, callback_id: int) -> None:
        done = await _DELETE(
            self.redis,
            [keys.callback(callback_id), keys.CALLBACKS_DISABLED, keys.HEALTH_FAILING],
            [
                project_id, keys.CALLBACK_UNIQUE_PREFIX, keys.PROJECT_CALLBACKS_PREFIX,
                keys.MATCH_PREFIX, keys.HEALTH_PREFIX, keys.SEP, keys.UNIQUE_SEP,
            ],
        )  # fmt: skip
        if not done:
            raise NotFound(f"callback {callback_id} not found in project {project_id}")

    async def set_enabled(
        self,
        callback_id: int,
        enabled: bool,
        reason: str = "",
        *,
        project_id: str | None = None,
    ) -> None:
        """Enable, or disable with a reason. `project_id` restricts it to that project."""
        (done,) = await run_pipeline(
            self.redis,
            lambda pipe: self.queue_set_enabled(pipe, callback_id, enabled, reason, project_id),
        )
        if not done:
            raise NotFound(f"callback {callback_id} not found in project {project_id or '*'}")

    @staticmethod
    def queue_set_enabled(
        pipe: Pipeline, callback_id: int, enabled: bool, reason: str = "",
        project_id: str | None = None,
    ) -> None:  # fmt: skip
        """`set_enabled` queued on a pipeline; its answer is 0 when the callback is missing."""
        _SET_ENABLED.queue(
            pipe,
            [keys.callback(callback_id), keys.CALLBACKS_DISABLED, keys.HEALTH_FAILING],
            [
                "1" if enabled else "0", reason, _now_ms(), keys.MATCH_PREFIX, keys.SEP,
                project_id or "", keys.HEALTH_PREFIX,
            ],
        )  # fmt: skip

    async def rotate_tokens(self) -> int:
        """Re-encrypt every stored token with the cipher's first key; returns how many."""
        if self.cipher is None:
            raise InvalidInput("no DISPATCHER_TOKEN_KEYS configured: nothing to rotate with")
        rotated = 0
        async for key in self.redis.scan_iter(match=f"{keys.CALLBACK_PREFIX}*", count=500):
            if not key.rsplit(b":", 1)[-1].isdigit():
                continue
            stored = await self.redis.hget(key, "secretToken")  # type: ignore[misc]  # sync|async
            if stored:
                await self.redis.hset(  # type: ignore[misc]
                    key, "secretToken", self.cipher.rotate(stored.decode())
                )
                rotated += 1
        return rotated


def _match_call(project_id: str, event: str) -> tuple[list[str], list[str]]:
    return [keys.match(project_id, event)], [keys.CALLBACK_PREFIX, keys.HEALTH_PREFIX]


def _check_project(project_id: str) -> None:
    if not project_id or len(project_id) > 128 or any(c.isspace() or c == ":" for c in project_id):
        raise InvalidInput(
            "projectId must be 1-128 characters without spaces or ':'", param="projectId"
        )
