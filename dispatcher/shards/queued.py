"""A moving project's jobs queued on its old shard: where each one goes (`where_to`), and
the scripts that take one from the old shard under the mover's lease (`TakeJob`), queue a
copy of it on the new one held by the mover (`PlaceJob`), then, on either shard, remove it
while the mover still holds it there (`DropHeld`) or let it run (`FreeHeld`). See
`dispatcher.shards.drain`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.bodies import KEEP_BODY
from dispatcher.jobs import DIGEST_LEAD, FAN_OUT, BadJob, decode
from dispatcher.lua import REDIS_NOW_MS, ArgList, Key, KeyList, Script
from dispatcher.models import PLATFORM_PROJECT

if TYPE_CHECKING:
    from dispatcher.keys import Keys

# What a mover's token starts with (`PlaceJob`); a worker's is its host's name and more,
# and no host name holds a '/'.
MOVER = "mover/"
# `PlaceJob`'s answer when the job queued under that id on the new shard is another event
OTHER_EVENT = 3

__all__ = [
    "MOVE",
    "MOVER",
    "OTHER_EVENT",
    "STAY",
    "UNLESS_BEGUN",
    "DropHeld",
    "FreeHeld",
    "PlaceJob",
    "TakeJob",
    "job_keys",
    "where_to",
]


def job_keys(keys: Keys, job_id: str) -> dict[str, str]:
    """A moved job's keys on the shard of `keys`, as `TakeJob` and `DropHeld` name them:
    its queue, lease, data, claim count, and the mark of its removal (`left`)."""
    return {
        "queue": keys.QUEUE,
        "lease": keys.ARQ_IN_PROGRESS_PREFIX + job_id,
        "job": keys.arq_job(job_id),
        "claims": keys.ARQ_RETRY_PREFIX + job_id,
        "left": keys.left(job_id),
    }


@dataclass
class TakeJob(Script):
    """Takes a queued job nobody else holds, as the mover read it (`read`: the SHA-1 of its
    bytes then): sets the mover's lease on it and returns {data, due ms, data ttl ms}; nil
    when a worker (or another mover) holds it, it is gone or it changed (a worker ran it
    meanwhile: looked at again); 'stays' when `unless_begun` ('1': an event to fan out) and
    its `claims` are counted: a run of it began here. A job under `token`'s own lease
    (this take sent again, its first answer lost) is taken again. Taken, the word of a
    mover that removed it before (`left`: `DropHeld`) goes."""

    LUA = """
    local holder = redis.call('GET', lease)
    if holder and holder ~= token then return false end
    local data = redis.call('GET', job)
    local due = redis.call('ZSCORE', queue, job_id)
    if not data or not due or redis.sha1hex(data) ~= read then return false end
    if unless_begun == '1' and redis.call('EXISTS', claims) == 1 then return 'stays' end
    redis.call('SET', lease, token, 'PX', lease_ms)
    redis.call('DEL', left)
    return {data, due, redis.call('PTTL', job)}
    """
    queue: Key
    lease: Key
    job: Key
    claims: Key
    left: Key
    token: str
    job_id: str
    lease_ms: int
    read: str
    unless_begun: str

    @classmethod
    def of(
        cls, keys: Keys, job_id: str, token: str, lease_s: float, read: bytes, unless_begun: bool
    ) -> TakeJob:
        """The take of `job_id` on the shard of `keys`, as it was `read`."""
        return cls(
            **job_keys(keys, job_id),
            token=token,
            job_id=job_id,
            lease_ms=int(lease_s * 1000),
            read=hashlib.sha1(read).hexdigest(),
            unless_begun="1" if unless_begun else "0",
        )


@dataclass
class PlaceJob(Script):
    """Queues a moved job *held* by the mover: its `lease` set to `token` for `hold_ms`
    and its score the later of its due time and the hold's end (Redis's clock), so that no
    worker claims it until `FreeHeld` lets it run (or the hold lapses: its mover died);
    with its reference to the body it refers to at `body` (`shared`: the bytes; the `job`
    key again for one that holds its own: `dispatcher.bodies`). Returns 1. That id queued
    already and not held by a mover, it writes nothing (that job is kept as it is: a
    worker runs it, or may) and returns 0, or `OTHER_EVENT` when that job is another
    event: both jobs' bytes lead with a digest (`jobs.DIGEST_LEAD`: events emitted with
    ids of their own) and the two differ (a job without one: 0). Queued already held by a
    mover, it is written over (its hold now this one's): 1 when the hold was `token`'s own
    (this write sent again, its first answer lost), 2 when another mover's (`movers`: what
    every mover's token starts with), paused past its lease on the old shard while this
    one took the job there: that mover finds it taken, and removes it no more; but a held
    copy of another event (its digest, as above) is never written over: `OTHER_EVENT` (a
    job this mover moved but could not settle, then another event queued under its id on
    the old shard by a stale producer: it was written over, the first one lost)."""

    LUA = (
        f"local lead = '{DIGEST_LEAD}'\n"
        + "local keep_ms = ttl_ms"
        + KEEP_BODY
        + REDIS_NOW_MS
        + """
    local function kept()  -- the job there kept: 0, or OTHER_EVENT when it is another event
      local ends = string.sub(data, 1, #lead) == lead and string.find(data, '"', #lead + 1, true)
      if not ends then return 0 end
      local there = redis.call('GETRANGE', job, 0, ends - 1)
      if string.sub(there, 1, #lead) ~= lead or there == string.sub(data, 1, ends) then
        return 0
      end
      return """
        + str(OTHER_EVENT)
        + """
    end
    local answer, holder = 1, redis.call('GET', lease)
    if redis.call('ZSCORE', queue, job_id) then
      local other = kept()
      if holder ~= token then
        if not holder or string.sub(holder, 1, #movers) ~= movers then return other end
        answer = 2
      end
      if other ~= 0 then return other end  -- a held copy of another event: never over it
    end
    redis.call('SET', job, data, 'PX', ttl_ms)
    redis.call('SET', lease, token, 'PX', hold_ms)
    local held_until = redis_now_ms() + tonumber(hold_ms)
    redis.call('ZADD', queue, math.max(tonumber(due_ms), held_until), job_id)
    if body ~= job then keep_body() end
    return answer
    """
    )
    queue: Key
    job: Key
    lease: Key
    body: Key
    job_id: str
    data: bytes
    due_ms: bytes
    ttl_ms: int
    token: str
    hold_ms: int
    shared: bytes = b""
    movers: str = MOVER


@dataclass
class DropHeld(Script):
    """While the job's `lease` holds `token` (the mover's: no worker has taken it since),
    removes the job: its queue entry, data, lease and claim count, and each of `marks`
    whose value is still the one in `values` (what the mover wrote with it), and says so
    at `left` (`token`, kept `left_ms`). Returns 1, else 0 (the job is left as it is); 1
    again when `left` says this mover removed it (this write sent again, its first answer
    lost: redis-py sends a pipeline again when its connection fails)."""

    LUA = """
    if redis.call('GET', lease) ~= token then
      if redis.call('GET', left) == token then return 1 end
      return 0
    end
    redis.call('DEL', lease, job, claims)
    redis.call('ZREM', queue, job_id)
    for i, mark in ipairs(marks) do
      if redis.call('GET', mark) == values[i] then redis.call('DEL', mark) end
    end
    redis.call('SET', left, token, 'PX', left_ms)
    return 1
    """
    queue: Key
    lease: Key
    job: Key
    claims: Key
    left: Key
    marks: KeyList
    token: str
    job_id: str
    left_ms: int
    values: ArgList


@dataclass
class FreeHeld(Script):
    """While the job's `lease` holds `token`, gives it up: the job is due at `due_ms`
    (a worker claims it then). Returns 1, else 0."""

    LUA = """
    if redis.call('GET', lease) ~= token then return 0 end
    redis.call('DEL', lease)
    redis.call('ZADD', queue, 'XX', due_ms, job_id)
    return 1
    """
    queue: Key
    lease: Key
    token: str
    job_id: str
    due_ms: bytes


MOVE, STAY, UNLESS_BEGUN = "move", "stay", "move unless begun"


def where_to(data: bytes, project: str, ordered: bool) -> str:
    """What a move of `project` does with a queued job: MOVE it, let it STAY to finish on
    the old shard (a delivery in a lane of its events, a platform-wide callback's too; an
    event to fan out when `ordered`, as its events are numbered there, or when it is a
    re-run's next chunk), move it UNLESS_BEGUN (any other event to fan out: it stays when
    its claims are counted, checked as it is taken), or nothing (another project's; a
    platform-wide callback's unordered delivery, which every shard can run). An event
    whose fan-out began stays because the progress marks of what a run of it sent are
    here, under the ids of deliveries that only its re-run's match would name."""
    try:
        wire = decode(data)
    except BadJob:
        return ""
    payload = wire.payload if isinstance(wire.payload, dict) else {}
    owner = payload.get("projectId")
    if owner == PLATFORM_PROJECT and payload.get("emitter") == project:
        return STAY if payload.get("lane") is not None else ""
    if owner != project:
        return ""
    if wire.function == FAN_OUT:
        return STAY if ordered or payload.get("rerun") is True else UNLESS_BEGUN
    return STAY if payload.get("lane") is not None else MOVE
