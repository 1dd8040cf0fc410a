"""The Redis store's write of one attempt's record: `Record`, the script that writes it
with its indexes and what the attempt ends with (`dispatcher.ending`), one script per
attempt in the worker's pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from dispatcher import keys as key_names
from dispatcher.ending import END_JOB, END_JOBS, ENDS, NO_ENDING, NO_JOB, SET_MARK
from dispatcher.history.kept import KEEP_RECORD_BODY, stored
from dispatcher.history.window import MAX_ATTEMPTS_SHOWN
from dispatcher.lua import Key, Script
from dispatcher.models import DeliveryStatus

if TYPE_CHECKING:
    from dispatcher.ending import Ending
    from dispatcher.history.record import AttemptRecord
    from dispatcher.keys import Keys

__all__ = ["ATTEMPTS_KEPT", "Record", "record_script"]

# the record ids a delivery's attempts key keeps, the newest: as many as are shown
ATTEMPTS_KEPT = MAX_ATTEMPTS_SHOWN

# A delivery's attempts keep the newest `ATTEMPTS_KEPT` record ids (`Record`), in the
# order written: appended while fewer, else the oldest ones cut. (Ids do not increase in
# that order: each worker takes them in blocks. So a record sent again after that many
# newer ones, its id cut meanwhile, is listed again, as the newest.)
_ADD_ATTEMPT = f"""
local function add_attempt(ids)
  local held = select(2, string.gsub(ids, ' ', ' ')) + 1
  if held < {ATTEMPTS_KEPT} then
    redis.call('APPEND', attempts, ' ' .. record_id)
  else
    local at = 0
    for _ = 1, held - {ATTEMPTS_KEPT} + 1 do at = string.find(ids, ' ', at + 1, true) end
    redis.call('SET', attempts, string.sub(ids, at + 1) .. ' ' .. record_id)
  end
end
"""

_RECORD_LUA = (
    KEEP_RECORD_BODY
    + _ADD_ATTEMPT
    + """
redis.call('SET', record, json, 'EX', ttl)
if redis.call('ZADD', index, created, member, '+inf', '~') == 2 then  -- a new index
  redis.call('SADD', indexes, index)
end
redis.call('ZADD', url_index, created, member)
if failed == '1' then
  redis.call('ZADD', failures, created, member)
  redis.call('EXPIRE', failures, ttl)  -- gone with its last record, whoever sweeps
end
if gave_up == '1' then
  redis.call('ZADD', dead_all, created, record_id)
  redis.call('ZADD', dead, created, record_id)
  redis.call('SADD', dead_keys, dead)
end
if named == '1' and not redis.call('SET', attempts, record_id, 'EX', ttl, 'NX') then
  local ids = redis.pcall('GET', attempts)
  if type(ids) == 'table' then
    redis.call('ZADD', attempts, created, record_id)
  elseif not string.find(' ' .. ids .. ' ', ' ' .. record_id .. ' ', 1, true) then
    add_attempt(ids)
  end
  redis.call('EXPIRE', attempts, ttl)
end
if job_id ~= '' and end_job() == 1 then return 1 end
if mark ~= '' then set_mark() end
return 1
"""
)


@dataclass
class Record(Script):
    """One attempt's record (`json`, its id included) and its indexes: by (project, event,
    url), by the URL's status (`index`, `url_index`, scored by `created` ms) and, when it
    `failed` ('1'), by the project's `failures` (every URL's and event's), the set of
    `indexes` the sweep walks (joined by a new index only: an index holds a mark, the
    member `~` scored +inf, so the `ZADD` that creates it says so, adding two members),
    the dead letters when its delivery gave up (`gave_up` '1'),
    and the delivery's attempts when the record `named` ('1') one; its emission's body at
    `body` (`request_body`) when it names one (`history.kept`). Then what the attempt
    ends with (`dispatcher.ending`): the job's end (`job_id` not empty), else, or when
    the job's lease is not the run's (another worker's, or lapsed), the progress `mark`
    (when not empty). Every write is
    idempotent, so a pipeline whose answer was lost can be sent again. Keys it is not
    given are the `record` key again (Redis Cluster refuses a script whose keys span hash
    slots, and every key of a shard shares its slot).

    A delivery's attempts: its newest `ATTEMPTS_KEPT` record ids in the order written,
    space-separated, in one string with the TTL of its latest record, so its first attempt
    (most deliveries' only one) is one SET NX EX, and each later one reads and writes at
    most that many ids (a delivery id is the same on every redelivery and on every
    emission of its event id again, so a project could grow it without end: each write
    copied it whole). A record sent again is not listed twice while its id is kept.
    Written before this layout, the key is a ZSET of the ids by createdTime (GET fails on
    it): that one goes on as it was."""

    LUA = END_JOB + SET_MARK + _RECORD_LUA
    TOGETHER = True  # a worker's batch of records is one call (`Writer`)
    BEFORE, AFTER = ENDS, END_JOBS  # its jobs end once every call ran
    record: Key
    index: Key
    indexes: Key
    dead_all: Key
    dead: Key
    dead_keys: Key
    attempts: Key
    url_index: Key
    failures: Key
    body: Key
    progress: Key
    queue: Key
    lease: Key
    job: Key
    claims: Key
    json: bytes
    created: int
    ttl: int
    member: str
    failed: str
    gave_up: str
    record_id: int
    named: str
    mark: str
    mark_ttl: int
    token: str
    job_id: str
    request_body: str


def record_script(
    keys: Keys, record: AttemptRecord, ttl: int, dead: bool, ending: Ending | None
) -> Record:
    """The `Record` call for `record` (id assigned), kept `ttl` seconds; `dead`: its
    delivery gave up."""
    project_id, url = record["projectId"], record["callBackUrl"]
    delivery_id = record.get("deliveryId") or ""
    ending = ending or NO_ENDING
    end = ending.job or NO_JOB
    here = keys.history_record(record["id"])
    doc, body = stored(record)
    failed = record["status"] != DeliveryStatus.SUCCESS
    return Record(
        here,
        keys.history_index(project_id, record["events"], url, kept=True),
        keys.HISTORY_INDEXES,
        keys.HISTORY_DEAD,
        keys.history_dead(project_id),
        keys.HISTORY_DEAD_KEYS,
        keys.history_attempts(delivery_id),
        keys.history_url_index(project_id, url, failed, kept=True),
        keys.history_failed(project_id) if failed else here,
        keys.HISTORY_BODY_PREFIX + record["requestBodyOf"] if body else here,
        ending.progress or here,
        end.queue or here,
        end.lease or here,
        end.job or here,
        end.claims or here,
        orjson.dumps(doc),
        record["createdTime"],
        ttl,
        key_names.history_member(record["id"]),
        "1" if failed else "0",
        "1" if dead else "0",
        record["id"],
        "1" if delivery_id else "0",
        ending.mark,
        ending.ttl,
        end.token,
        end.job_id,
        body,
    )
