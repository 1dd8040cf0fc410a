"""Prometheus metrics (prometheus-client's default registry, one per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ATTEMPT_SECONDS",
    "CALLBACKS_DISABLED",
    "DEFERRED",
    "DELIVERIES",
    "DROPPED",
    "EVENTS_EMITTED",
    "HISTORY_BACKLOG",
    "HISTORY_BACKLOG_AGE",
    "HISTORY_RECORDS",
    "HISTORY_SHIPPED",
    "HISTORY_SHIP_FAILURES",
    "PENDING_WRITES",
    "POISON_JOBS",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST_SECONDS",
    "REDIS_FULL",
    "RETRIES",
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
HISTORY_RECORDS = Counter("dispatcher_history_records_total", "History records written.")
CALLBACKS_DISABLED = Counter(
    "dispatcher_callbacks_disabled_total",
    "Callbacks disabled by the service (endpoint health or 410 Gone).",
    ["reason"],
)
POISON_JOBS = Counter("dispatcher_poison_jobs_total", "Undecodable jobs recorded and dropped.")
EVENTS_EMITTED = Counter("dispatcher_events_emitted_total", "Events accepted for fan-out.")
QUEUE_DEPTH = Gauge("dispatcher_queue_depth", "Jobs due now in the queue (read at scrape).")
QUEUE_OLDEST_SECONDS = Gauge(
    "dispatcher_queue_oldest_job_age_seconds", "Age of the oldest job due (read at scrape)."
)
DROPPED = Counter(
    "dispatcher_deliveries_dropped_total",
    "Deliveries ended without an attempt, recorded in dispatcher:deliveries:dropped "
    "(callback deleted or disabled, job data expired, a job that kept failing).",
    ["reason"],
)
DEFERRED = Counter(
    "dispatcher_deliveries_deferred_total",
    "Deliveries sent back to the queue without an attempt: their host's circuit breaker was "
    "open (circuit), or their project or host had no free share of the worker (share).",
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
HISTORY_SHIPPED = Counter(
    "dispatcher_history_shipped_total", "History records this process shipped to PostgreSQL."
)
HISTORY_SHIP_FAILURES = Counter(
    "dispatcher_history_ship_failures_total",
    "Shipments to PostgreSQL that failed (and are tried again).",
)
