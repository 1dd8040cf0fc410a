"""Prometheus metrics (prometheus-client's default registry, one per process).

The API serves them at `/metrics` and sets the fleet-wide gauges (queue, history backlog,
live workers, Redis) when scraped; each worker serves its own on
`DISPATCHER_WORKER_METRICS_PORT` (its own counts, `dispatcher_worker_*`, summed over the
workers by the rules). deploy/grafana/ and deploy/prometheus/ chart them and
alert on them (tests/repo/test_monitoring.py checks that every name they use is here).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ATTEMPT_SECONDS",
    "CALLBACKS_DISABLED",
    "DEAD_LETTERS",
    "DEFERRED",
    "DELIVERIES",
    "DROPPED",
    "EVENTS_EMITTED",
    "FILTERED",
    "HISTORY_BACKLOG",
    "HISTORY_BACKLOG_AGE",
    "HISTORY_BACKLOG_BYTES",
    "HISTORY_PAST_RETENTION",
    "HISTORY_RECORDS",
    "HISTORY_SET_ASIDE",
    "HISTORY_SHIPPED",
    "HISTORY_SHIP_FAILURES",
    "HISTORY_SWEEP_UNFINISHED",
    "LANES_BLOCKED",
    "LANES_BLOCKED_OLDEST_SECONDS",
    "LANES_PARKED",
    "MATCHES",
    "PENDING_WRITES",
    "POISON_JOBS",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST_SECONDS",
    "QUEUE_PROJECTS_LATE",
    "QUEUE_PROJECTS_SEEN",
    "REDIS_FULL",
    "REDIS_FULLEST",
    "REDIS_MAX_MEMORY",
    "REDIS_UP",
    "REDIS_USED_MEMORY",
    "RETRIES",
    "WORKERS_LIVE",
    "WORKER_HEARTBEAT",
    "WORKER_JOBS_RUNNING",
    "WRITE_RETRIES",
]

DELIVERIES = Counter(
    "dispatcher_deliveries_total",
    "Delivery attempts by outcome (success, retry, failed, gone) and event.",
    ["outcome", "event"],
)
ATTEMPT_SECONDS = Histogram(
    "dispatcher_delivery_attempt_seconds",
    "Duration of one HTTP delivery attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("dispatcher_retries_total", "Attempts scheduled again after a failure.")
DEAD_LETTERS = Counter(
    "dispatcher_dead_letters_total",
    "Deliveries that gave up: a final failure, or their retries ran out (worker).",
)
HISTORY_RECORDS = Counter("dispatcher_history_records_total", "History records written.")
CALLBACKS_DISABLED = Counter(
    "dispatcher_callbacks_disabled_total",
    "Callbacks disabled by the service (endpoint health or 410 Gone).",
    ["reason"],
)
DEFERRED = Counter(
    "dispatcher_deliveries_deferred_total",
    "Deliveries put back in the queue, no attempt spent: their callback was at its "
    "maxPerSecond (rate) or maxInFlight (in_flight) limit, their project's circuit breaker "
    "for their host was open (circuit), or their project or host had no free share of the "
    "worker (share).",
    ["reason"],
)
FILTERED = Counter(
    "dispatcher_filtered_total",
    "Events not delivered to a callback because of its filter: false on the event (skipped) "
    "or failed on it (error).",
    ["result"],
)
MATCHES = Counter(
    "dispatcher_matches_total",
    "Chunks of callbacks the fan-outs needed: kept by the worker while the registry stood "
    "(kept), read from Redis (read), or taken from a read another run had under way "
    "(shared).",
    ["source"],
)
POISON_JOBS = Counter("dispatcher_poison_jobs_total", "Undecodable jobs recorded and dropped.")
EVENTS_EMITTED = Counter("dispatcher_events_emitted_total", "Events accepted for fan-out.")
QUEUE_DEPTH = Gauge("dispatcher_queue_depth", "Jobs due now in the queue (read at scrape).")
QUEUE_OLDEST_SECONDS = Gauge(
    "dispatcher_queue_oldest_job_age_seconds", "Age of the oldest job due (read at scrape)."
)
QUEUE_PROJECTS_SEEN = Gauge(
    "dispatcher_queue_projects_seen",
    "Distinct emitting projects a worker of the fleet claimed a fan-out of in the last 5 to "
    "10 minutes, each counted once across the fleet (HyperLogLogs on the home shard, read "
    "at scrape by the API; 0 in a worker).",
)
QUEUE_PROJECTS_LATE = Gauge(
    "dispatcher_queue_projects_late",
    "Of dispatcher_queue_projects_seen, those with a fan-out claimed after waiting over "
    "`over` seconds (60, 600) since it was queued (read at scrape by the API).",
    ["over"],
)
for _over in ("60", "600"):  # exported from the start, 0 in every process but the API's
    QUEUE_PROJECTS_LATE.labels(over=_over)
DROPPED = Counter(
    "dispatcher_deliveries_dropped_total",
    "Deliveries ended without an attempt, recorded in their project's "
    "dispatcher:deliveries:dropped:{project} (callback deleted or disabled, job data expired "
    "or gone at its lane's turn, a job that kept failing, a retry's kept body gone).",
    ["reason"],
)
PENDING_WRITES = Gauge(
    "dispatcher_pending_writes",
    "Worker writes (history records, progress, job steps) waiting for Redis to take them.",
)
WRITE_RETRIES = Counter(
    "dispatcher_write_retries_total", "Batches of worker writes sent again because Redis failed."
)
REDIS_FULL = Counter(
    "dispatcher_redis_full_total",
    "Answers of a Redis at maxmemory refusing a write (waited out, nothing dropped), by what "
    "was refused: a worker's writes, its claims, an emit.",
    ["refused"],
)
HISTORY_BACKLOG = Gauge(
    "dispatcher_history_backlog",
    "History records waiting in Redis for PostgreSQL (the PostgreSQL backend's stream).",
)
HISTORY_BACKLOG_AGE = Gauge(
    "dispatcher_history_backlog_age_seconds",
    "Age of the oldest history record not yet in PostgreSQL (0 when none waits).",
)
HISTORY_BACKLOG_BYTES = Gauge(
    "dispatcher_history_backlog_bytes",
    "Bytes of Redis the history records waiting for PostgreSQL take (worker, every second, "
    "up to every 8 s while idle; past a share of maxmemory the worker claims nothing).",
)
HISTORY_SHIPPED = Counter(
    "dispatcher_history_shipped_total", "History records this process shipped to PostgreSQL."
)
HISTORY_SET_ASIDE = Counter(
    "dispatcher_history_set_aside_total",
    "History records the shipper could not store in PostgreSQL (refused alone, or no record), "
    "kept in history_set_aside with why.",
)
HISTORY_PAST_RETENTION = Counter(
    "dispatcher_history_past_retention_total",
    "History records the shipper dropped, not stored: past the retention by Redis's clock "
    "(they waited in the stream longer than it).",
)
HISTORY_SHIP_FAILURES = Counter(
    "dispatcher_history_ship_failures_total",
    "Shipments to PostgreSQL that failed (and are tried again).",
)
HISTORY_SWEEP_UNFINISHED = Counter(
    "dispatcher_history_sweep_unfinished_total",
    "Retention sweeps of the Redis history stopped by their time bound before the end of "
    "their pass over the indexes (the next goes on from there; rising at every run: a pass "
    "takes several).",
)
WORKERS_LIVE = Gauge(
    "dispatcher_workers_live",
    "Workers whose heartbeat is younger than 30 s (the API: at scrape; a worker: with its own).",
)
WORKER_HEARTBEAT = Gauge(
    "dispatcher_worker_heartbeat_timestamp_seconds",
    "When this worker last wrote its heartbeat to Redis (epoch seconds; stale: it cannot).",
)
WORKER_JOBS_RUNNING = Gauge("dispatcher_worker_jobs_running", "Jobs this worker runs now.")
REDIS_UP = Gauge(
    "dispatcher_redis_up",
    "1 when Redis answered this process (the API: at scrape; a worker: its last heartbeat).",
)
REDIS_USED_MEMORY = Gauge(
    "dispatcher_redis_used_memory_bytes", "Redis' used_memory (INFO memory; read at scrape)."
)
REDIS_MAX_MEMORY = Gauge(
    "dispatcher_redis_maxmemory_bytes",
    "Redis' maxmemory, 0 when it has no limit (INFO memory; read at scrape).",
)
REDIS_FULLEST = Gauge(
    "dispatcher_redis_memory_fullest_ratio",
    "used_memory / maxmemory of the fullest Redis (shard server or cluster node) that has a "
    "limit, 0 when none has one (read at scrape): one shard full among empty ones shows.",
)
LANES_BLOCKED = Gauge(
    "dispatcher_lanes_blocked",
    "Ordered lanes (callbacks with orderBy) whose head delivery was put back (a retry or a "
    "deferral): the deliveries behind it wait (read at scrape).",
)
LANES_PARKED = Gauge(
    "dispatcher_lanes_parked",
    "Ordered deliveries parked in their lanes behind their lane's head, waiting for it to "
    "end, every shard's (read at scrape): a lane grows while its receiver answers slower "
    "than its events come.",
)
LANES_BLOCKED_OLDEST_SECONDS = Gauge(
    "dispatcher_lanes_blocked_oldest_seconds",
    "How long the longest-blocked ordered lane has waited for its head delivery to end, 0 "
    "when none is blocked (read at scrape).",
)

# Every series an alert's `increase()` reads exists from the start, at 0: a series born at
# 1 (its first event) shows no increase, so the alert on a first dropped body or disabled
# callback never fired (review). The values are those the code counts under.
for _metric, _label, _values in (
    (DROPPED, "reason", ("callback", "body", "job")),
    (CALLBACKS_DISABLED, "reason", ("failing", "gone")),
    (REDIS_FULL, "refused", ("claim", "write", "emit")),
    (DEFERRED, "reason", ("rate", "in_flight", "circuit", "share", "disabled")),
    (FILTERED, "result", ("skipped", "error")),
):
    for _value in _values:
        _metric.labels(**{_label: _value})
