"""An event's request body, kept once in Redis for all of its deliveries' retries.

A delivery waiting for its next attempt is a job on the queue. Its body is the event's,
the same bytes for every callback of the event, so a job that held its own copy parked
callbacks x event size in the Redis every project shares (10,000 x 1 MiB for one event at
the defaults). A first attempt's retry instead refers to its event's body (`bodyOf` in its
bytes, `DeliveryJob.body_of`), kept at `dispatcher:body:{project}:{event id}@{emittedAt}`:
a hash of the bytes (field `body`) and of the ids of the jobs that refer to them, one
field each.

- The push of a retry job (`dispatcher.queue.Push`) adds its reference in the same script,
  the bytes too when they are not there yet, so the job never exists without them.
- A run reads them with its job (`read`), which also keeps them as long as the job may
  live: the job's own time to live, plus its longest wait before the next run.
- After each run of a job, whatever it did, it gives its reference back (`release`) if
  the job has ended: the last one out deletes the bytes. A release checks that the job is
  gone, so it is safe from any path, at any time; finding the job still there (due again,
  put off), it keeps the bytes as long as the job may live now. A release missed (a
  worker killed between the job's end and it) leaves the bytes to their time to live.

Ordered deliveries (`dispatcher.worker.lanes`) refer to a copy of their own, kept apart
(`LANE`): a lane parks its jobs out of the queue with no time to live, so `Enter` and
`Head` keep the body of a parked one for ever too, and each reference is given back by
the lane's release, in the write that ends its job (a crash cannot lose it); the last one
out deletes the bytes, and the sweep gives back a reference whose job went another way
(`sweep_lanes`). A delivery reads its body once its lane's turn has come. Bodies under
`SHARED_MIN_BYTES` stay in their jobs (a reference costs about as much), and so do
redeliveries (each is a request of its own, from its record).
`DISPATCHER_SHARED_BODIES=false` keeps every body in its job (and in its Redis history
records: `dispatcher.history.kept`): a worker of a version before this one cannot read a
job without its body (it records it as poison), nor an API process a record without it,
so a fleet being rolled to this version keeps it off until no process of the version
before is left.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatcher.cluster import scan_shard
from dispatcher.jobs import DELIVER, BadJob, DeliveryJob, decode
from dispatcher.lua import KEEP_AT_LEAST, Key, KeyList, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys

__all__ = [
    "GIVE_BACK",
    "KEEP_BODY",
    "SHARED_MIN_BYTES",
    "Carried",
    "body_key",
    "read",
    "release",
    "sweep_lanes",
]

SHARED_MIN_BYTES = 1024
LANE = ":lane:"  # the kept bodies of ordered deliveries (no project id holds a `:`)
GONE = "the event's body kept for its deliveries is gone"

# A Lua function over the names a script declares for a kept body (key `body`; arguments
# `job_id`, `shared`: the bytes, `keep_ms`): the job's reference, the bytes when they are
# not there yet, and a time to live of at least `keep_ms` (none when it has none: parked
# ordered deliveries refer to it).
KEEP_BODY = (
    KEEP_AT_LEAST
    + """
local function keep_body()
  if redis.call('HSETNX', body, 'body', shared) == 1 then
    redis.call('PEXPIRE', body, tonumber(keep_ms))
  else
    keep_at_least(body, tonumber(keep_ms))
  end
  redis.call('HSET', body, job_id, 1)
end
"""
)

# A Lua function: `ref` gives back its reference to the kept body `body`; the last one out
# deletes the bytes (returns 1 then). The unordered retries' release (`Release`) and a
# lane's (`lane_scripts.Release`, in the write that ends the job) share it.
GIVE_BACK = """
local function give_back(body, ref)
  redis.call('HDEL', body, ref)
  if redis.call('HLEN', body) > 1 then return 0 end
  redis.call('DEL', body)
  return 1
end
"""


def body_key(keys: Keys, job: DeliveryJob) -> str:
    """Where the body `job` refers to is kept (on the shard of `keys`): an ordered
    delivery's (`lane:`) apart from the unordered retries' one, as each of its references
    ends in its lane's release, in the write that ends its job (it may be kept for ever)."""
    kind = "" if job.lane is None else LANE
    return f"{keys.BODY_PREFIX}{kind}{job.body_of}"


@dataclass
class Read(Script):
    """The bytes kept at `body` (false when gone), kept from now on at least as long as
    the `job` lives plus `wait_ms` (the longest a run may put the job off by, which also
    moves the job's time to live)."""

    LUA = (
        KEEP_AT_LEAST
        + """
    local bytes = redis.call('HGET', body, 'body')
    if bytes then keep_at_least(body, redis.call('PTTL', job) + tonumber(wait_ms)) end
    return bytes
    """
    )
    body: Key
    job: Key
    wait_ms: int


@dataclass
class Release(Script):
    """`job_id` gives back its reference to the body at `body`, unless its `job` is still
    there: then the body is kept at least as long as the job lives plus `keep_ms`. The
    last reference out deletes the bytes. Returns 1 when the bytes went."""

    LUA = (
        KEEP_AT_LEAST
        + GIVE_BACK
        + """
    if redis.call('EXISTS', job) == 1 then
      keep_at_least(body, redis.call('PTTL', job) + tonumber(keep_ms))
      return 0
    end
    return give_back(body, job_id)
    """
    )
    body: Key
    job: Key
    job_id: str
    keep_ms: int


async def read(redis: Redis, keys: Keys, job: DeliveryJob, wait_ms: int) -> DeliveryJob | None:
    """`job` with the body it refers to (as it is when it holds its own); None when that
    body is gone. `wait_ms`: see `Read`."""
    if job.body_of is None:
        return job
    job_key = keys.arq_job(job.job_id)
    found = await Read(body_key(keys, job), job_key, wait_ms).run(redis)
    return None if found is None else dataclasses.replace(job, body=found)


def release(pipe: Pipeline, keys: Keys, job: DeliveryJob, keep_ms: int = 0) -> None:
    """Queue the release of `job`'s reference to its body (see `Release`), if it has one;
    `keep_ms`: how long past the job the body stays while the job is there."""
    if job.body_of is not None:
        job_key = keys.arq_job(job.job_id)
        Release(body_key(keys, job), job_key, job.job_id, keep_ms).queue_on(pipe)


@dataclass(frozen=True, slots=True)
class Carried:
    """The body a retry job refers to, as a shard move carries the job: read on the old
    shard (`shared`; None when gone there: the job is then dropped on record where it
    runs), kept for the job on the new one (by the script that places it), given back on
    the old one once it left."""

    job: DeliveryJob
    shared: bytes | None

    @classmethod
    async def read(cls, redis: Redis, keys: Keys, raw: bytes) -> Carried | None:
        """What the job stored as `raw` carries along; None for a job that refers to no
        kept body."""
        try:
            wire = decode(raw)
            job = DeliveryJob.from_wire(wire.payload) if wire.function == DELIVER else None
        except BadJob:
            return None
        if job is None or job.body_of is None:
            return None
        shared = await redis.hget(body_key(keys, job), "body")  # type: ignore[misc]  # sync|async
        return cls(job, shared)

    def placed(self, keys: Keys) -> tuple[str, bytes] | None:
        """Where the placing script keeps the body on the shard of `keys`, and its bytes."""
        return None if self.shared is None else (body_key(keys, self.job), self.shared)

    def release(self, pipe: Pipeline, keys: Keys) -> None:
        """Queue the release of the job's reference on the shard of `keys`."""
        release(pipe, keys, self.job)


@dataclass
class Dangling(Script):
    """The references in the ordered deliveries' kept `bodies` whose job is gone, given
    back (a job that ended without its lane's release: a poison job, or one that expired),
    and a body none refers to any more deleted. Safe: every reference is written in the
    script that writes its job. Answers how many references went."""

    LUA = """
local gone = 0
for _, body in ipairs(bodies) do
  for _, ref in ipairs(redis.call('HKEYS', body)) do
    if ref ~= 'body' and redis.call('EXISTS', job_prefix .. ref) == 0 then
      redis.call('HDEL', body, ref)
      gone = gone + 1
    end
  end
  if redis.call('HLEN', body) <= 1 then redis.call('DEL', body) end
end
return gone
"""
    bodies: KeyList
    job_prefix: str


async def sweep_lanes(redis: Redis, keys: Keys, cursor: int, count: int) -> tuple[int, int]:
    """One `SCAN` page (from `cursor`, about `count` keys; on a cluster, of the shard's
    node: `cluster.scan_shard`) of the ordered deliveries' kept bodies, their dangling
    references given back (`Dangling`); returns the next cursor (0: the pass is over) and
    how many references went."""
    match = f"{keys.BODY_PREFIX}{LANE}*"
    cursor, found = await scan_shard(redis, keys.QUEUE, cursor, match, count)
    names = [name.decode() for name in found]
    gone = await Dangling(names, keys.ARQ_JOB_PREFIX).run(redis) if names else 0
    return int(cursor), int(gone)
