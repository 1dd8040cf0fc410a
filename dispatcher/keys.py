"""Every Redis key the service writes, built in one place.

Registry ({scope} is a project id, or "{project}:{pipeline}" for a pipeline's callbacks;
platform-wide callbacks are the project DEVOPS_ALL_PROJECT's)
    dispatcher:cb:seq                         INCR counter of callback ids
    dispatcher:cb:{id}                        HASH one callback (token and auth header included)
    dispatcher:cb:uniq:{scope}                HASH "{event} {url}" -> id (the upsert key)
    dispatcher:cb:project:{project}           ZSET ids of a project, its pipelines' included,
                                              scored by id (paging)
    dispatcher:cb:pipeline:{project}:{pipeline}
                                              ZSET ids of one pipeline's callbacks, by id
    dispatcher:cb:match:{scope}:{event}       ZSET ids of the *enabled* callbacks, scored by id
                                              (the fan-out reads them in chunks after a cursor)
    dispatcher:cb:disabled                    ZSET ids of disabled callbacks, scored by time
    dispatcher:cb:layout                      STRING version of this layout (2: ordered match
                                              sets; `Registry.upgrade` converts version 1)
    dispatcher:cb:filter-errors:{id}          HASH events a callback's filter failed on: n,
                                              lastError, lastAt (reset by registering again)
Receiver controls (fleet-wide limits of one callback; each key expires when idle)
    dispatcher:limit:{id}:starts              ZSET one member per delivery started in the
                                              last second, scored by its start (ms)
    dispatcher:limit:{id}:running             ZSET slots of the requests in flight, scored by
                                              when the slot lapses (a dead worker's lapse)
    dispatcher:limit:{id}:line                ZSET job ids waiting for their turn, by arrival
    dispatcher:limit:{id}:seen                ZSET the same ids, scored by when they leave the
                                              line unless they come back (a job gone for good)
Roles
    dispatcher:roles:{project}                HASH user -> admin | member ("*" = every project)
Health
    dispatcher:health:{id}                    HASH consecutive final failures of one callback
    dispatcher:health:failing                 ZSET ids of callbacks with failures, by first failure
Deliveries
    dispatcher:delivery:{progress id}         STRING attempts made, or "done" (dedupe, progress)
    dispatcher:deliveries:dropped             LIST deliveries ended without an attempt (last 1000)
Workers and statistics
    dispatcher:workers:{host}:{pid}           STRING heartbeat of a live worker (TTL 30 s)
    dispatcher:workers                        ZSET heartbeat keys by their last beat (ms), so
                                              readers find live workers without a SCAN
    dispatcher:stats:{epoch minute}           HASH attempts in that minute: by outcome, and by
                                              duration bucket ("ms:<bound>", "ms:inf") (TTL 2 h)
    dispatcher:stats:{step s}:{slot}          HASH the same per `step` seconds (600: the last
                                              day's 10-minute slots, TTL 25 h)
    dispatcher:jobs:poison                    LIST undecodable jobs, newest first (last 1000)
    dispatcher:cron:{name}:{slot}             STRING who runs a periodic task this slot (TTL)
History
    dispatcher:history:seq                    INCR counter of record ids
    dispatcher:history:seq:server             STRING run id of the Redis server that handed
                                              out the last block of ids (see history/ids.py)
    dispatcher:history:rec:{id}               STRING one record (JSON, id included)
    dispatcher:history:idx:{project}:{event}:{url hash}
                                              ZSET record ids (zero-padded) by createdTime ms
    dispatcher:history:indexes                SET every index key (what the retention sweep walks)
    dispatcher:history:url:{project}:{url hash}:{ok|failed}
                                              ZSET record ids (zero-padded) of one URL's SUCCESS
                                              (ok) or FAILED attempts, every event, by
                                              createdTime; the sweep trims them with the
                                              (project, event, url) indexes of the same URL
    dispatcher:history:dead                   ZSET ids of records whose delivery gave up, by time
    dispatcher:history:dead:{project}         ZSET the same, one project's
    dispatcher:history:dead-keys              SET every per-project dead-letter key (for the sweep)
    dispatcher:history:attempts:{delivery id} ZSET record ids of one delivery by createdTime
                                              (TTL of its latest record)
    dispatcher:history:stream                 STREAM records on their way to PostgreSQL (the
                                              PostgreSQL backend): field r = the record's JSON,
                                              d = "1" when its delivery gave up, t = its
                                              createdTime; trimmed once shipped
Replication
    dispatcher:replication:mark               INCR written before each WAIT, so that WAIT
                                              covers whatever the master holds (replication.py)
Console
    dispatcher:console:csrf-key               STRING the key signing the console's CSRF tokens,
                                              made by the first API process that needs it
arq (its own names, re-exported so nothing else spells them)
    {queue_name}, arq:job:{id}, arq:in-progress:{id}, arq:retry:{id}, {queue_name}:health-check

Lua scripts never spell a key or a separator: they get every key in KEYS, and every prefix
and separator they need to build one from a value read inside Redis in ARGV, from here
(`tests/service/test_keys.py` checks that both build the same names).
"""

from __future__ import annotations

import hashlib

from arq.constants import health_check_key_suffix, in_progress_key_prefix, job_key_prefix
from arq.constants import retry_key_prefix as arq_retry_key_prefix

PREFIX = "dispatcher"
SEP = ":"
# between event and url in the upsert hash's field (a URL never holds white space)
UNIQUE_SEP = " "
# history ids are zero-padded in the index so that equal times order by id
HISTORY_ID_WIDTH = 15

CALLBACK_SEQ = f"{PREFIX}:cb:seq"
# Prefixes for the Lua scripts, which build keys from ids they read inside Redis.
CALLBACK_PREFIX = f"{PREFIX}:cb:"
CALLBACK_UNIQUE_PREFIX = f"{PREFIX}:cb:uniq:"
PROJECT_CALLBACKS_PREFIX = f"{PREFIX}:cb:project:"
PIPELINE_CALLBACKS_PREFIX = f"{PREFIX}:cb:pipeline:"
MATCH_PREFIX = f"{PREFIX}:cb:match:"
CALLBACKS_LAYOUT = f"{PREFIX}:cb:layout"
FILTER_ERRORS_PREFIX = f"{PREFIX}:cb:filter-errors:"
HEALTH_PREFIX = f"{PREFIX}:health:"
HEALTH_FAILING = f"{PREFIX}:health:failing"
CALLBACKS_DISABLED = f"{PREFIX}:cb:disabled"
HISTORY_SEQ = f"{PREFIX}:history:seq"
HISTORY_SEQ_SERVER = f"{PREFIX}:history:seq:server"
HISTORY_RECORD_PREFIX = f"{PREFIX}:history:rec:"
HISTORY_INDEXES = f"{PREFIX}:history:indexes"
HISTORY_INDEX_PREFIX = f"{PREFIX}:history:idx:"
HISTORY_DEAD = f"{PREFIX}:history:dead"
HISTORY_DEAD_KEYS = f"{PREFIX}:history:dead-keys"
HISTORY_ATTEMPTS_PREFIX = f"{PREFIX}:history:attempts:"
HISTORY_STREAM = f"{PREFIX}:history:stream"
DELIVERY_PREFIX = f"{PREFIX}:delivery:"
CONSOLE_CSRF_KEY = f"{PREFIX}:console:csrf-key"
REPLICATION_MARK = f"{PREFIX}:replication:mark"

WORKERS_PREFIX = f"{PREFIX}:workers:"
WORKERS_LIVE = f"{PREFIX}:workers"
POISON_JOBS = f"{PREFIX}:jobs:poison"
DROPPED = f"{PREFIX}:deliveries:dropped"

ARQ_JOB_PREFIX: str = job_key_prefix
ARQ_IN_PROGRESS_PREFIX: str = in_progress_key_prefix
ARQ_RETRY_PREFIX: str = arq_retry_key_prefix


def project_scoped(project_id: str, local_id: str) -> str:
    """An id made unique across projects: `{project}:{id}`. A project id holds no `:`, so
    the first `:` ends it whatever the local id holds (event ids may hold `:`)."""
    return f"{project_id}{SEP}{local_id}"


def callback(callback_id: int | str) -> str:
    return f"{CALLBACK_PREFIX}{callback_id}"


def scope(project_id: str, pipeline_id: str | None = None) -> str:
    """Whose callbacks: a project's own (the platform's too), or one pipeline's."""
    return f"{project_id}{SEP}{pipeline_id}" if pipeline_id else project_id


def callback_unique(scope: str) -> str:
    return f"{CALLBACK_UNIQUE_PREFIX}{scope}"


def callback_unique_field(event: str, url: str) -> str:
    return f"{event}{UNIQUE_SEP}{url}"


def project_callbacks(project_id: str) -> str:
    return f"{PROJECT_CALLBACKS_PREFIX}{project_id}"


def pipeline_callbacks(project_id: str, pipeline_id: str) -> str:
    return f"{PIPELINE_CALLBACKS_PREFIX}{project_id}{SEP}{pipeline_id}"


def match(scope: str, event: str) -> str:
    return f"{MATCH_PREFIX}{scope}{SEP}{event}"


def filter_errors(callback_id: int | str) -> str:
    return f"{FILTER_ERRORS_PREFIX}{callback_id}"


def limits(callback_id: int | str) -> list[str]:
    """The keys of a callback's limits: starts, running, line, seen (see above)."""
    base = f"{PREFIX}:limit:{callback_id}{SEP}"
    return [f"{base}starts", f"{base}running", f"{base}line", f"{base}seen"]


def roles(project_id: str) -> str:
    return f"{PREFIX}:roles:{project_id}"


def health(callback_id: int | str) -> str:
    return f"{HEALTH_PREFIX}{callback_id}"


def delivery(progress_id: str) -> str:
    return f"{DELIVERY_PREFIX}{progress_id}"


def history_record(record_id: int | str) -> str:
    return f"{HISTORY_RECORD_PREFIX}{record_id}"


def history_member(record_id: int) -> str:
    """A record id as its index stores it."""
    return f"{record_id:0{HISTORY_ID_WIDTH}d}"


def _url_hash(url: str) -> str:
    return hashlib.blake2b(url.encode(), digest_size=16).hexdigest()


def history_index(project_id: str, event: str, url: str) -> str:
    return f"{HISTORY_INDEX_PREFIX}{project_id}{SEP}{event}{SEP}{_url_hash(url)}"


def history_url_index(project_id: str, url: str, failed: bool) -> str:
    """A URL's attempts of every event, its failed or its successful ones."""
    return _url_index(project_id, _url_hash(url), failed)


def _url_index(project_id: str, url_hash: str, failed: bool) -> str:
    status = "failed" if failed else "ok"
    return f"{PREFIX}:history:url:{project_id}{SEP}{url_hash}{SEP}{status}"


def history_url_indexes_of(index: str) -> tuple[str, str]:
    """The URL indexes (ok, failed) holding the records of a (project, event, url) index:
    the project may hold a separator, the event and the hash do not."""
    project_id, _event, url_hash = index.removeprefix(HISTORY_INDEX_PREFIX).rsplit(SEP, 2)
    return _url_index(project_id, url_hash, False), _url_index(project_id, url_hash, True)


def history_dead(project_id: str) -> str:
    return f"{HISTORY_DEAD}{SEP}{project_id}"


def history_attempts(delivery_id: str) -> str:
    return f"{HISTORY_ATTEMPTS_PREFIX}{delivery_id}"


def worker(host: str, pid: int) -> str:
    return f"{WORKERS_PREFIX}{host}{SEP}{pid}"


def stats(minute: int) -> str:
    """`minute` is epoch seconds // 60."""
    return f"{PREFIX}:stats:{minute}"


def stats_slot(step_s: int, slot: int) -> str:
    """`slot` is epoch seconds // `step_s`."""
    return f"{PREFIX}:stats:{step_s}{SEP}{slot}"


def cron(name: str, slot: int) -> str:
    return f"{PREFIX}:cron:{name}{SEP}{slot}"


def arq_job(job_id: str) -> str:
    return f"{ARQ_JOB_PREFIX}{job_id}"


def arq_health_check(queue_name: str) -> str:
    return f"{queue_name}{health_check_key_suffix}"
