"""The Redis store's dead-letter view (`RedisHistory.dead`): the latest deliveries that gave
up, one entry a delivery, its newest attempt, and none whose newest attempt is not a final
failure (redelivered since: it succeeded, or is being retried), by the rule a window's
redelivery sends by (`redelivery._Window._failed`: a delivery's newest attempt is the last
one its attempts key names, `redis.Latest`).

The dead-letter index keeps every attempt after which a delivery gave up, older ones of
the same delivery too (a window's redelivery reads them: `redis_failures`; the record's
write adds nothing for the view), so the view filters as it reads: the index newest first,
a page of ids and their records a round trip (no kept body read), then the newest attempt
of each of their deliveries in one more (`NewestAttempts`), until `limit` are found or
`DEAD_LETTERS_SCANNED` entries were looked at. The view listed a delivery once per final
failure (three failed redeliveries: four entries, pushing others past the limit), and one
redelivered with success since as FAILED, inviting a resend of what was delivered (review).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.history.window import DEAD_LETTERS_SCANNED
from dispatcher.lua import Key, KeyList, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.keys import Keys

__all__ = ["MIN_PAGE", "NewestAttempts", "dead_letters"]

MIN_PAGE = 25  # index entries read a round trip, at least (else the view's limit)


@dataclass
class DeadPage(Script):
    """`count` entries of a dead-letter index `dead` (record ids by time) from rank `offset`,
    newest first, within the retention (scored from `oldest_ms`): their records as stored
    (nil: gone). Record keys are made from the ids read (`record_prefix`)."""

    LUA = """
    local ids = redis.call('ZREVRANGEBYSCORE', dead, '+inf', oldest_ms, 'LIMIT', offset, count)
    if #ids == 0 then return {} end
    local ks = {}
    for i, id in ipairs(ids) do ks[i] = record_prefix .. id end
    return redis.call('MGET', unpack(ks))
    """
    dead: Key
    oldest_ms: int
    offset: int
    count: int
    record_prefix: str


@dataclass
class NewestAttempts(Script):
    """The id of the newest attempt each delivery's `attempts` key names ('' when none):
    the last one written (its end; the key a ZSET by time, written before that layout:
    its top)."""

    LUA = """
    local found = {}
    for i, key in ipairs(attempts) do
      local written = redis.pcall('GETRANGE', key, -21, -1)
      if type(written) == 'string' then
        found[i] = string.match(written, '(%d+)$') or ''
      else
        found[i] = redis.call('ZREVRANGE', key, 0, 0)[1] or ''
      end
    end
    return found
    """
    attempts: KeyList


async def dead_letters(
    redis: Redis, keys: Keys, index: str, oldest_ms: int, limit: int
) -> list[bytes]:
    """The stored records of the latest `limit` deliveries that gave up in `index` (one
    project's, or every project's) scored from `oldest_ms`, newest first: each delivery's
    newest attempt, when that is the one in the index."""
    shown: list[bytes] = []
    seen: set[str] = set()  # deliveries (or records of none) listed
    step = max(limit, MIN_PAGE)
    for offset in range(0, DEAD_LETTERS_SCANNED, step):
        count = min(step, DEAD_LETTERS_SCANNED - offset)
        page = DeadPage(index, oldest_ms, offset, count, keys.HISTORY_RECORD_PREFIX)
        raws: list[bytes | None] = await page.run(redis)
        docs = [(raw, orjson.loads(raw)) for raw in raws if raw is not None]
        newest = await _newest(redis, keys, [doc for _, doc in docs])
        shown += [raw for raw, doc in docs if _shown(doc, newest, seen)]
        if len(shown) >= limit or len(raws) < count:  # enough, or the index's end
            break
    return shown[:limit]


async def _newest(redis: Redis, keys: Keys, docs: list[dict[str, Any]]) -> dict[str, str]:
    """The newest attempt's id of each delivery `docs` (stored records) name, in one
    round trip ('' when its attempts key names none)."""
    deliveries = sorted({d for doc in docs if isinstance(d := doc.get("deliveryId"), str) and d})
    if not deliveries:
        return {}
    script = NewestAttempts([keys.history_attempts(d) for d in deliveries])
    found: list[bytes] = await script.run(redis)
    return {d: newest.decode() for d, newest in zip(deliveries, found, strict=True)}


def _shown(doc: dict[str, Any], newest: dict[str, str], seen: set[str]) -> bool:
    """Whether a record read from the index (newest first) is its delivery's entry: its
    newest attempt (or, when its attempts key names none, expired, or the record is of no
    delivery, the first one read), not listed already (a page read from a rank that a
    newer entry moved on reads an entry again)."""
    delivery = doc.get("deliveryId") or ""
    entry = delivery or f"#{doc.get('id')}"
    if entry in seen or newest.get(delivery, "") not in ("", str(doc.get("id"))):
        return False
    seen.add(entry)
    return True
