"""Request bodies the Redis store keeps once for an emission's records.

An attempt's record keeps its request body (up to `DISPATCHER_MAX_REQUEST_BODY`). The body
is the event's, the same for every callback and attempt, so an event of 1 MiB whose
10,000 callbacks failed 7 times each kept 70,000 copies of 64 KiB in the Redis history for
the retention. A record of a delivery whose retries share its event's body
(`dispatcher.bodies`; `requestBodyOf`: `{scope}#{length}`) stores no body of its own:
its script keeps the body once at `dispatcher:history:body:{scope}#{length}` (the body as
the record keeps it, cut to `DISPATCHER_MAX_REQUEST_BODY`: a prefix of the emission's, so
its length tells it) and gives it the record's time to live, which every later record
naming it raises, so the body outlives each of them. Reading records puts the bodies
back (`with_bodies`): the records served are as they always were. A body found gone is
served empty and marked not kept whole (`requestBodyTruncated`), so that no redelivery
sends it. (PostgreSQL history keeps each record whole: the stream ships it out of Redis.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.lua import KEEP_AT_LEAST

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = ["BODY_OF", "KEEP_RECORD_BODY", "stored", "with_bodies"]

BODY_OF = "requestBodyOf"
_MARK = b'"requestBodyOf":'

# Lua over the names the record's script declares (key `body`, arguments `request_body`,
# `ttl`; `record`: the record's own key, standing for "no body kept"): the body stored
# once, and lasting at least the record's `ttl`.
KEEP_RECORD_BODY = (
    KEEP_AT_LEAST
    + """
if body ~= record and not redis.call('SET', body, request_body, 'EX', ttl, 'NX') then
  keep_at_least(body, tonumber(ttl) * 1000)  -- never cut (another process's retention)
end
"""
)


def stored(record: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The record as the Redis store writes it (the same object when it keeps no body),
    and the body it keeps apart ('' when none): a record that names its emission's body
    (`BODY_OF`) holds no body of its own."""
    if BODY_OF not in record:
        return record, ""
    stored_record = {name: value for name, value in record.items() if name != "requestBody"}
    return stored_record, str(record.get("requestBody") or "")


async def with_bodies(
    redis: Redis, keys: Keys, raws: Sequence[bytes | None], *, keep_name: bool = True
) -> Sequence[bytes | None]:
    """`raws` (stored records) with the bodies they name put back (`requestBody`; the
    name stays, which readers ignore and a copy to another shard keeps the body apart
    by; `keep_name` False drops it: a copy to PostgreSQL), in one round trip for them all; as
    they are when none names one (no round trip)."""
    named = [i for i, raw in enumerate(raws) if raw is not None and _MARK in raw]
    if not named:
        return raws
    docs = {i: orjson.loads(raws[i] or b"{}") for i in named}
    scopes = sorted({doc[BODY_OF] for doc in docs.values() if isinstance(doc.get(BODY_OF), str)})
    if not scopes:
        return raws
    found = await redis.mget([keys.HISTORY_BODY_PREFIX + scope for scope in scopes])
    bodies = dict(zip(scopes, found, strict=True))
    out = list(raws)
    for i, doc in docs.items():
        scope = doc.get(BODY_OF)
        if isinstance(scope, str):
            body = bodies.get(scope)
            if body is None:  # gone (a Redis that lost it): shown as not kept whole, so
                doc["requestBody"], doc["requestBodyTruncated"] = "", True  # never resent
            else:
                doc["requestBody"] = body.decode(errors="replace")
            if not keep_name:
                del doc[BODY_OF]
            out[i] = orjson.dumps(doc)
    return out
