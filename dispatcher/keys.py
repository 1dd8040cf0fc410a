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
    dispatcher:stats:{epoch minute}           HASH attempts by outcome in that minute (TTL 2 h)
    dispatcher:jobs:poison                    LIST undecodable jobs, newest first (last 1000)
    dispatcher:cron:{name}:{slot}             STRING who runs a periodic task this slot (TTL)
History
    dispatcher:history:seq                    INCR counter of record ids
    dispatcher:history:rec:{id}               STRING one record (JSON, id included)
    dispatcher:history:idx:{project}:{event}:{url hash}
                                              ZSET record ids (zero-padded) by createdTime ms
    dispatcher:history:indexes                SET every index key (what the retention sweep walks)
    dispatcher:history:dead                   ZSET ids of records whose delivery gave up, by time
    dispatcher:history:dead:{project}         ZSET the same, one project's
    dispatcher:history:dead-keys              SET every per-project dead-letter key (for the sweep)
    dispatcher:history:attempts:{delivery id} ZSET record ids of one delivery by createdTime
                                              (TTL of its latest record)
    dispatcher:history:stream                 STREAM records on their way to PostgreSQL (the
                                              PostgreSQL backend): field r = the record's JSON,
                                              d = "1" when its delivery gave up, t = its
                                              createdTime; trimmed once shipped
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
HEALTH_PREFIX = f"{PREFIX}:health:"
HEALTH_FAILING = f"{PREFIX}:health:failing"
CALLBACKS_DISABLED = f"{PREFIX}:cb:disabled"
HISTORY_SEQ = f"{PREFIX}:history:seq"
HISTORY_RECORD_PREFIX = f"{PREFIX}:history:rec:"
HISTORY_INDEXES = f"{PREFIX}:history:indexes"
HISTORY_DEAD = f"{PREFIX}:history:dead"
HISTORY_DEAD_KEYS = f"{PREFIX}:history:dead-keys"
HISTORY_ATTEMPTS_PREFIX = f"{PREFIX}:history:attempts:"
HISTORY_STREAM = f"{PREFIX}:history:stream"
DELIVERY_PREFIX = f"{PREFIX}:delivery:"
CONSOLE_CSRF_KEY = f"{PREFIX}:console:csrf-key"

WORKERS_PREFIX = f"{PREFIX}:workers:"
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


def history_index(project_id: str, event: str, url: str) -> str:
    url_hash = hashlib.blake2b(url.encode(), digest_size=16).hexdigest()
    return f"{PREFIX}:history:idx:{project_id}{SEP}{event}{SEP}{url_hash}"


def history_dead(project_id: str) -> str:
    return f"{HISTORY_DEAD}{SEP}{project_id}"


def history_attempts(delivery_id: str) -> str:
    return f"{HISTORY_ATTEMPTS_PREFIX}{delivery_id}"


def worker(host: str, pid: int) -> str:
    return f"{WORKERS_PREFIX}{host}{SEP}{pid}"


def stats(minute: int) -> str:
    """`minute` is epoch seconds // 60."""
    return f"{PREFIX}:stats:{minute}"


def cron(name: str, slot: int) -> str:
    return f"{PREFIX}:cron:{name}{SEP}{slot}"


def arq_job(job_id: str) -> str:
    return f"{ARQ_JOB_PREFIX}{job_id}"


def arq_health_check(queue_name: str) -> str:
    return f"{queue_name}{health_check_key_suffix}"
