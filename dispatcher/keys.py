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
    dispatcher:cb:version:{project}           INCR bumped by every write that changes what the
                                              match reads of the project's callbacks, its
                                              pipelines' included (none: 0); a worker's cached
                                              match holds while it stands (registry/match.py)
Receiver controls (fleet-wide limits of one callback; each key expires when idle)
    dispatcher:limit:{id}:starts              ZSET one member per delivery started in the
                                              last second, scored by its start (ms)
    dispatcher:limit:{id}:running             ZSET slots of the requests in flight, scored by
                                              when the slot lapses (a dead worker's lapse)
    dispatcher:limit:{id}:line                ZSET job ids waiting for their turn, by their
                                              emitter's turn (arrival, for one emitter)
    dispatcher:limit:{id}:seen                ZSET the same ids, scored by when they leave the
                                              line unless they come back (a job gone for good)
    dispatcher:limit:{id}:turns               HASH each emitting project's last turn taken
                                              in the line; ':' (no project id holds one): the
                                              turn started last
Ordered delivery (callbacks with `orderBy`; see dispatcher/worker/lanes.py)
    dispatcher:lanes:ordered:{project}        SET ids of the project's (DEVOPS_ALL_PROJECT:
                                              every project's) ordered callbacks: while it has
                                              one, its events get a sequence number when queued
    dispatcher:lanes:seq:{project}            INCR the project's event sequence
    dispatcher:lanes:pending:{project}        ZSET event job ids by sequence: events whose
                                              fan-out may still add to a lane (dropped once
                                              their job has left the queue)
    dispatcher:lanes:ready:{project}          ZSET the same, of events whose last chunk is in
                                              its lanes (for a fan-out run again; trimmed
                                              once their job has left the queue)
    dispatcher:lanes:waiting:{project}        ZSET progress ids of lane heads waiting for an
                                              earlier event to enter its lanes, by sequence
                                              (queued at once when it has)
    dispatcher:lane:{receiver}:{project}:{key}
                                              ZSET progress ids of one lane by sequence: the
                                              head is the one being delivered, the others
                                              wait (their jobs parked, out of the queue);
                                              receiver: a hash of the callbacks' owner, URL
                                              and orderBy (one lane for all their events)
    dispatcher:lanes:blocked                  ZSET lane keys whose head was put back (a retry,
                                              a deferral), by when it first was
    dispatcher:lanes:hold:{project}           STRING set while the project moves here: its
                                              lanes wait for its old shard's; "from:{shard}"
                                              names that shard (shards/lanes.py)
Roles
    dispatcher:roles:{project}                HASH user -> admin | member ("*" = every project)
Health
    dispatcher:health:{id}                    HASH consecutive final failures of one callback
    dispatcher:health:failing                 ZSET ids of callbacks with failures, by first failure
    dispatcher:health:failing:{project}       ZSET the same of one project, by failures
    dispatcher:health:failing-projects        ZSET projects with some, by their worst's failures
    dispatcher:health:failing-indexed         STRING once the two above hold every id: from
                                              which first failure (ms) the sweep looks
    dispatcher:health:failing-pass            STRING when the sweep's pass over the set began
    dispatcher:health:failing-late            STRING (15 min) a version before's entry met
Deliveries
    dispatcher:delivery:{progress id}         STRING attempts made, or "done" (dedupe, progress);
                                              none when the delivery's job ended with its
                                              record (gone, it needs no dedupe)
    dispatcher:delivery:{progress id}:w       STRING its put-offs by an open circuit, beside it
    dispatcher:deliveries:dropped:{project}   LIST a project's deliveries ended without an
                                              attempt (last 1000, TTL 30 days): the record
    dispatcher:deliveries:dropped             LIST every project's, the last 1000: best-effort
    dispatcher:pushed:{token}                 STRING one worker write's push of a delivery's
                                              job was made (TTL: the job's): sent again, the
                                              write queues nothing (queue.Push); or, the
                                              token a redelivery's job id, the nonce of the
                                              call that queued it (queue.PushMany)
Workers and statistics
    dispatcher:workers:{host}:{pid}           STRING heartbeat of a live worker (TTL 30 s)
    dispatcher:workers                        ZSET heartbeat keys by their last beat (ms), so
                                              readers find live workers without a SCAN
    dispatcher:stats:{epoch minute}           HASH attempts in that minute: by outcome, and by
                                              duration bucket ("ms:<bound>", "ms:inf") (TTL 2 h)
    dispatcher:stats:{step s}:{slot}          HASH the same per `step` seconds (600: the last
                                              day's 10-minute slots, TTL 25 h)
    dispatcher:stats:projects:{kind}:{window} HLL projects with a fan-out claimed (seen), late
                                              60/600 s (late:60, late:600) in 5 min (TTL 10 min)
    dispatcher:jobs:poison                    LIST undecodable jobs, newest first (last 1000)
    dispatcher:cron:{name}:{slot}             STRING who runs a periodic task this slot (TTL)
    dispatcher:cron:{name}:cursor             STRING where the fleet's sweep's SCAN (lanes,
                                              lane-bodies, history) goes on, whichever
                                              worker runs it
History
    dispatcher:history:seq                    INCR counter of record ids
    dispatcher:history:seq:server             STRING run id of the Redis server that handed
                                              out the last block of ids (see history/ids.py)
    dispatcher:history:rec:{id}               STRING one record (JSON, id included)
    dispatcher:history:idx:{project}:{event}:{url hash}
                                              ZSET record ids (zero-padded) by createdTime ms
                                              (the records' TTL, set by the sweep)
    dispatcher:history:indexes                SET every index key (what the retention sweep walks)
    dispatcher:history:url:{project}:{url hash}:{ok|failed}
                                              ZSET record ids (zero-padded) of one URL's SUCCESS
                                              (ok) or FAILED attempts, every event, by
                                              createdTime; the sweep trims them with the
                                              (project, event, url) indexes of the same URL
    dispatcher:history:failed:{project}       ZSET the same of every FAILED attempt of the
                                              project, every URL and event (trimmed by time;
                                              TTL of its latest record)
    dispatcher:history:dead                   ZSET ids of records whose delivery gave up, by time
    dispatcher:history:dead:{project}         ZSET the same, one project's
    dispatcher:history:dead-keys              SET every per-project dead-letter key (for the sweep)
    dispatcher:history:attempts:{delivery id} STRING record ids of one delivery, space-
                                              separated, oldest first (TTL of its latest
                                              record); a ZSET by createdTime when written
                                              by a version before, read the same
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

Shards (see dispatcher/shards/): a shard is a key namespace on one Redis. With one Redis URL,
or on each server of `DISPATCHER_REDIS_SHARDS`, the namespace is empty: the names above,
exactly. On a Redis Cluster, shard n's namespace is a hash tag, `{d<n>.<k>}`, put in front
of every name above (arq's included), so that every key of a shard, and every key a script
builds from a prefix, hashes to that shard's one slot (`slots.cluster_tag` picks `k` so
that the shards' slots spread evenly over the slot range). Besides:
    dispatcher:shard                          STRING this shard's position in the list
                                              (set at start-up; guards against a reorder)
    dispatcher:placement                      HASH project -> shard index: the explicit
                                              placements (home shard only; see shards/)
    dispatcher:placement:version              INCR bumped on every placement change
    dispatcher:placement:mover:{project}      STRING the token of the mover moving the
                                              project, with a TTL (home shard only)
    dispatcher:left:{job id}                  STRING the token of the mover that removed a
                                              job it held here (TTL: its hold's), so that
                                              the removal sent again answers as it did
    dispatcher:cb:copied:{project}            HASH id -> updatedTime a move here copied (TTL 1 d)
"""

from __future__ import annotations

import functools
import hashlib

from arq.constants import health_check_key_suffix, in_progress_key_prefix, job_key_prefix
from arq.constants import retry_key_prefix as arq_retry_key_prefix

from dispatcher.scoped import (
    HISTORY_ID_WIDTH,
    SEP,
    UNIQUE_SEP,
    callback_unique_field,
    history_member,
    project_scoped,
    scope,
)
from dispatcher.slots import cluster_tag

__all__ = [
    "HISTORY_ID_WIDTH",
    "SEP",
    "UNIQUE_SEP",
    "Keys",
    "callback_unique_field",
    "history_member",
    "project_scoped",
    "scope",
]

PREFIX = "dispatcher"


@functools.lru_cache(maxsize=16_384)  # the worker's writes (`kept`): URLs repeat, two a record
def _url_hash(url: str) -> str:
    return hashlib.blake2b(url.encode(), digest_size=16).hexdigest()


class Keys:
    """Every key name of one shard: today's names, after the shard's namespace (`""` for
    a server of its own; a Redis Cluster hash tag `{...}` for a shard of a cluster)."""

    def __init__(self, queue_name: str = "dispatcher:queue", namespace: str = "") -> None:
        self.namespace = ns = namespace
        base = f"{ns}{PREFIX}"
        self.QUEUE, self.CALLBACK_SEQ = f"{ns}{queue_name}", f"{base}:cb:seq"
        # Prefixes for the Lua scripts, which build keys from ids they read inside Redis.
        cb = f"{base}:cb"
        self.CALLBACK_PREFIX, self.PIPELINE_CALLBACKS_PREFIX = f"{cb}:", f"{cb}:pipeline:"
        self.CALLBACK_UNIQUE_PREFIX, self.REGISTRY_VERSION_PREFIX = f"{cb}:uniq:", f"{cb}:version:"
        self.PROJECT_CALLBACKS_PREFIX, self.CALLBACKS_LAYOUT = f"{cb}:project:", f"{cb}:layout"
        self.FILTER_ERRORS_PREFIX, self.MATCH_PREFIX = f"{cb}:filter-errors:", f"{cb}:match:"
        self.CALLBACKS_FROZEN_PREFIX = f"{cb}:frozen:"  # `callbacks_frozen`
        self.HEALTH_PREFIX, self.HEALTH_FAILING = f"{base}:health:", f"{base}:health:failing"
        self.HEALTH_FAILING_PREFIX = f"{self.HEALTH_FAILING}{SEP}"  # `failing_of`
        self.HEALTH_FAILING_PROJECTS = f"{self.HEALTH_FAILING}-projects"
        self.HEALTH_FAILING_INDEXED = f"{self.HEALTH_FAILING}-indexed"
        self.HEALTH_FAILING_PASS = f"{self.HEALTH_FAILING}-pass"
        self.HEALTH_FAILING_LATE = f"{self.HEALTH_FAILING}-late"
        self.CALLBACKS_DISABLED, self.ROLES_PREFIX = f"{base}:cb:disabled", f"{base}:roles:"
        h = f"{base}:history"
        self.HISTORY_SEQ, self.HISTORY_BODY_PREFIX = f"{h}:seq", f"{h}:body:"
        self.HISTORY_SEQ_SERVER, self.HISTORY_RECORD_PREFIX = f"{h}:seq:server", f"{h}:rec:"
        self.HISTORY_INDEXES, self.HISTORY_INDEX_PREFIX = f"{h}:indexes", f"{h}:idx:"
        self.HISTORY_URL_PREFIX, self.HISTORY_FAILED_PREFIX = f"{h}:url:", f"{h}:failed:"
        self.HISTORY_DEAD, self.HISTORY_DEAD_KEYS = f"{h}:dead", f"{h}:dead-keys"
        self.HISTORY_ATTEMPTS_PREFIX, self.HISTORY_STREAM = f"{h}:attempts:", f"{h}:stream"
        self.DELIVERY_PREFIX, self.PUSHED_PREFIX = f"{base}:delivery:", f"{base}:pushed:"
        self.BODY_PREFIX, self.CONSOLE_CSRF_KEY = f"{base}:body:", f"{base}:console:csrf-key"
        self.REPLICATION_MARK, self._cron_prefix = f"{base}:replication:mark", f"{base}:cron:"
        self.WORKERS_PREFIX, self.WORKERS_LIVE = f"{base}:workers:", f"{base}:workers"
        self.POISON_JOBS, self.DROPPED = f"{base}:jobs:poison", f"{base}:deliveries:dropped"
        self.DROPPED_PREFIX = f"{self.DROPPED}{SEP}"  # a project's: `dropped`
        self.SHARD, self.PLACEMENT = f"{base}:shard", f"{base}:placement"
        self.PLACEMENT_VERSION, self.LEFT_PREFIX = f"{base}:placement:version", f"{base}:left:"
        lanes, self.LANE_PREFIX = f"{base}:lanes", f"{base}:lane:"
        self.LANES_ORDERED_PREFIX, self.LANES_SEQ_PREFIX = f"{lanes}:ordered:", f"{lanes}:seq:"
        self.LANES_PENDING_PREFIX, self.LANES_READY_PREFIX = f"{lanes}:pending:", f"{lanes}:ready:"
        self.LANES_WAITING_PREFIX, self.LANES_HOLD_PREFIX = f"{lanes}:waiting:", f"{lanes}:hold:"
        self.LANES_BLOCKED, self.LANES_PARKED = f"{lanes}:blocked", f"{lanes}:parked"
        self.ARQ_JOB_PREFIX: str = f"{ns}{job_key_prefix}"
        self.ARQ_IN_PROGRESS_PREFIX: str = f"{ns}{in_progress_key_prefix}"
        self.ARQ_RETRY_PREFIX: str = f"{ns}{arq_retry_key_prefix}"
        self._limit_prefix, self._stats_prefix = f"{base}:limit:", f"{base}:stats:"

    @classmethod
    def of_cluster_shard(cls, queue_name: str, index: int) -> Keys:
        """The keys of shard `index` of a Redis Cluster (its hash tag first)."""
        return cls(queue_name, "{" + cluster_tag(index) + "}")

    def __repr__(self) -> str:
        return f"Keys({self.namespace or 'no namespace'})"

    def callback(self, callback_id: int | str) -> str:
        return f"{self.CALLBACK_PREFIX}{callback_id}"

    def callback_unique(self, scope: str) -> str:
        return f"{self.CALLBACK_UNIQUE_PREFIX}{scope}"

    def project_callbacks(self, project_id: str) -> str:
        return f"{self.PROJECT_CALLBACKS_PREFIX}{project_id}"

    def pipeline_callbacks(self, project_id: str, pipeline_id: str) -> str:
        return f"{self.PIPELINE_CALLBACKS_PREFIX}{project_id}{SEP}{pipeline_id}"

    def match(self, scope: str, event: str) -> str:
        return f"{self.MATCH_PREFIX}{scope}{SEP}{event}"

    def registry_version(self, project_id: str) -> str:
        return f"{self.REGISTRY_VERSION_PREFIX}{project_id}"

    def filter_errors(self, callback_id: int | str) -> str:
        return f"{self.FILTER_ERRORS_PREFIX}{callback_id}"

    def limits(self, callback_id: int | str) -> list[str]:
        """The keys of a callback's limits: starts, running, line, seen, turns (see above)."""
        base = f"{self._limit_prefix}{callback_id}{SEP}"
        return [f"{base}starts", f"{base}running", f"{base}line", f"{base}seen", f"{base}turns"]

    def lanes_ordered(self, project_id: str) -> str:
        return f"{self.LANES_ORDERED_PREFIX}{project_id}"

    def lanes_seq(self, project_id: str) -> str:
        return f"{self.LANES_SEQ_PREFIX}{project_id}"

    def lanes_pending(self, project_id: str) -> str:
        return f"{self.LANES_PENDING_PREFIX}{project_id}"

    def lanes_ready(self, project_id: str) -> str:
        return f"{self.LANES_READY_PREFIX}{project_id}"

    def lanes_waiting(self, project_id: str) -> str:
        return f"{self.LANES_WAITING_PREFIX}{project_id}"

    def move_lease(self, project_id: str) -> str:
        """On the home shard, while a mover moves the project: its token (one at a time)."""
        return f"{self.PLACEMENT}:mover:{project_id}"

    def callbacks_frozen(self, project_id: str) -> str:
        """Set while the project moves off this shard: its callbacks' writes are refused."""
        return f"{self.CALLBACKS_FROZEN_PREFIX}{project_id}"

    def callbacks_copied(self, project_id: str) -> str:
        return f"{self.CALLBACK_PREFIX}copied{SEP}{project_id}"

    def left(self, job_id: str) -> str:
        """The mover's word that it removed a job it held here (`shards.queued.DropHeld`)."""
        return f"{self.LEFT_PREFIX}{job_id}"

    def lanes_hold(self, project_id: str) -> str:
        """Set while the project moves here: its lanes wait for those of its old shard."""
        return f"{self.LANES_HOLD_PREFIX}{project_id}"

    def lane(self, lane_id: str) -> str:
        """One lane of ordered deliveries (`lane_id`: see `lane_id`)."""
        return f"{self.LANE_PREFIX}{lane_id}"

    def roles(self, project_id: str) -> str:
        return f"{self.ROLES_PREFIX}{project_id}"

    def health(self, callback_id: int | str) -> str:
        return f"{self.HEALTH_PREFIX}{callback_id}"

    def failing_of(self, project_id: str) -> str:
        return f"{self.HEALTH_FAILING_PREFIX}{project_id}"

    def dropped(self, project_id: str) -> str:
        return f"{self.DROPPED_PREFIX}{project_id}"

    def delivery(self, progress_id: str) -> str:
        return f"{self.DELIVERY_PREFIX}{progress_id}"

    def pushed(self, token: str) -> str:
        return f"{self.PUSHED_PREFIX}{token}"

    def history_record(self, record_id: int | str) -> str:
        return f"{self.HISTORY_RECORD_PREFIX}{record_id}"

    def history_index(self, project_id: str, event: str, url: str, kept: bool = False) -> str:
        hashed = (_url_hash if kept else _url_hash.__wrapped__)(url)  # see history_url_index
        return f"{self.HISTORY_INDEX_PREFIX}{project_id}{SEP}{event}{SEP}{hashed}"

    def history_url_index(self, project_id: str, url: str, failed: bool, kept: bool = False) -> str:
        """A URL's attempts of every event, failed or not. `kept`: its hash is kept (the
        worker's writes); a read's URL is its caller's choice (up to 8 KB): never kept."""
        hashed = (_url_hash if kept else _url_hash.__wrapped__)(url)
        return self._url_index(project_id, hashed, failed)

    def _url_index(self, project_id: str, url_hash: str, failed: bool) -> str:
        status = "failed" if failed else "ok"
        return f"{self.HISTORY_URL_PREFIX}{project_id}{SEP}{url_hash}{SEP}{status}"

    def history_failed(self, project_id: str) -> str:
        """A project's failed attempts of every event and URL."""
        return f"{self.HISTORY_FAILED_PREFIX}{project_id}"

    def history_indexes_of(self, index: str) -> tuple[str, str, str]:
        """The other indexes holding the records of a (project, event, url) index: the
        URL's (ok, failed) and the project's failures. The project may hold a separator,
        the event and the hash do not."""
        project_id, _event, url_hash = index.removeprefix(self.HISTORY_INDEX_PREFIX).rsplit(SEP, 2)
        return (
            self._url_index(project_id, url_hash, False),
            self._url_index(project_id, url_hash, True),
            self.history_failed(project_id),
        )

    def history_dead(self, project_id: str) -> str:
        return f"{self.HISTORY_DEAD}{SEP}{project_id}"

    def history_attempts(self, delivery_id: str) -> str:
        return f"{self.HISTORY_ATTEMPTS_PREFIX}{delivery_id}"

    def worker(self, host: str, pid: int) -> str:
        return f"{self.WORKERS_PREFIX}{host}{SEP}{pid}"

    def stats(self, minute: int) -> str:
        """`minute` is epoch seconds // 60."""
        return f"{self._stats_prefix}{minute}"

    def stats_slot(self, step_s: int, slot: int) -> str:
        """`slot` is epoch seconds // `step_s`."""
        return f"{self._stats_prefix}{step_s}{SEP}{slot}"

    def projects(self, kind: str, window: int) -> str:
        return f"{self._stats_prefix}projects{SEP}{kind}{SEP}{window}"

    def stats_flush(self, token: str) -> str:
        """A flush of attempt statistics that was added (`stats.AttemptStats.flush`)."""
        return f"{self._stats_prefix}flush{SEP}{token}"

    def cron(self, name: str, slot: int) -> str:
        return f"{self._cron_prefix}{name}{SEP}{slot}"

    def sweep_cursor(self, name: str) -> str:
        return f"{self._cron_prefix}{name}{SEP}cursor"

    def arq_job(self, job_id: str) -> str:
        return f"{self.ARQ_JOB_PREFIX}{job_id}"

    def arq_health_check(self) -> str:
        return f"{self.QUEUE}{health_check_key_suffix}"
