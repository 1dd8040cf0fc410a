"""Configuration, read once per entry point from `DISPATCHER_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher import setting_urls
from dispatcher.models import Region
from dispatcher.tokens import TokenCipher

__all__ = ["EMBEDDED", "Settings"]

# DISPATCHER_HISTORY_URL's value for the private PostgreSQL `dispatcher run` starts.
EMBEDDED = "embedded"


class Settings(BaseSettings):
    """Every knob of the service. Build one per process and pass it down.

    >>> Settings(redis_url="redis://127.0.0.1:6379/0").redis_url
    'redis://127.0.0.1:6379/0'
    """

    # a rejected value is not echoed: it may hold a password
    model_config = SettingsConfigDict(
        env_prefix="DISPATCHER_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    # Redis
    redis_url: str | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL of one Redis, or "
        "redis+sentinel://[user:password@]host:port[,host:port...]/<master>/<db> (rediss+sentinel:"
        "// for TLS) of the master Redis Sentinel names, or redis+cluster://host:port[,host:port"
        "...]/ (rediss+cluster:// for TLS) of a Redis Cluster; unset starts an embedded "
        "redis-server (or takes the first of DISPATCHER_REDIS_SHARDS).",
    )
    redis_shards: list[str] | None = Field(
        default=None,
        description="Shards on independent Redis servers: a JSON list of redis://, rediss:// or "
        "redis+sentinel:// URLs, one per shard, in a fixed order (new shards go at the end; "
        "`dispatcher shards` moves projects to them). Shard 0, the first, also holds the "
        "fleet's heartbeats, statistics and explicit placements.",
    )
    redis_cluster_shards: int = Field(
        default=8,
        ge=1,
        le=999,
        description="Shards on a Redis Cluster (redis+cluster:// URL), each in one hash slot: at "
        "least the number of masters you will run, so that every master gets work.",
    )
    worker_shards: list[int] | None = Field(
        default=None,
        description="The shards (positions, JSON list) a worker serves; unset: every shard.",
    )
    placement_refresh: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="Seconds between a process's checks of the explicit placements of "
        "projects (written by `dispatcher shards move`) and of the shards in use.",
    )
    move_lease: float = Field(
        default=30.0, gt=0, le=600, description="Seconds a mover's lease on a project lasts."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None,
        description="Password of the sentinels themselves (their requirepass), when they have "
        "one; Redis' own goes in the URL.",
    )
    redis_min_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must confirm (WAIT) an emit or a redelivery before it is "
        "acknowledged; 0: acknowledged once the master has it.",
    )
    data_dir: Path = Field(
        default=Path(".dispatcher"),
        description="Where the embedded Redis (and the embedded PostgreSQL) keep their data.",
    )
    queue_name: str = Field(default="dispatcher:queue", min_length=1)
    redis_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to connect to Redis and to wait for an answer (every connection).",
    )

    emit_wait: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a producer (Python, CLI, the emit routes) waits out a Redis that "
        "does not answer (restarting, failing over) before it reports it unreachable.",
    )

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    timezone: str = Field(
        default="UTC", description="Time zone of the history API's startTime / endTime."
    )
    dev_mode: bool = Field(
        default=False,
        description="Local development: loopback/private receivers allowed. Never in production.",
    )
    open_access: bool = Field(
        default=False,
        description="Skip role checks (any X-DEVOPS-UID may do anything). Development only.",
    )
    operator_token: SecretStr | None = Field(
        default=None, description="Token of the role-management route (X-DEVOPS-OPERATOR-TOKEN)."
    )
    token_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated Fernet keys encrypting secret tokens at rest (first one "
        "encrypts). Unset: tokens are stored as given.",
    )
    gateway_token: SecretStr | None = Field(
        default=None, description="When set, every API request must carry X-DEVOPS-GATEWAY-TOKEN."
    )
    allowed_hosts: frozenset[str] = Field(
        default=frozenset(),
        description="Host names (a JSON list; `*`: any) the API answers on a loopback address "
        "besides localhost and the loopback addresses, which alone it answers there otherwise "
        "(DNS rebinding): a TLS proxy on the same host that forwards its public Host.",
    )
    api_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body (the batch route's aside) and event data (bytes).",
    )
    emit_batch_max_events: int = Field(
        default=1000, ge=1, le=100_000, description="Most events in one batch emit request."
    )
    emit_batch_max_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest body of the batch emit route."
    )
    # what one project's HTTP emits may queue per API process: bytes a second (0: no limit),
    # and at once (`api.pacing`)
    emit_project_rate: int = Field(default=8 * 1024 * 1024, ge=0)
    emit_project_burst: int = Field(default=64 * 1024 * 1024, ge=1024)

    max_callbacks_per_project: int = Field(
        default=10_000,
        ge=0,
        description="Callbacks a project may have, its pipelines' included (enabled or not); "
        "registering a new one past it is refused (409); 0: no limit.",
    )

    # Worker
    worker_max_jobs: int = Field(default=200, ge=1, description="Jobs run at once per worker.")
    poll_delay: float = Field(default=0.02, gt=0, le=5, description="Queue poll interval (s).")
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    job_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds one job may run (default: total_timeout + 15); a job that runs "
        "longer is stopped and put back in the queue with backoff, its deliveries tried again "
        "under the same delivery ids. A job claimed 25 times without ending (timed out, failed "
        "or its lease lapsed each time; a scheduled retry counts anew) gives up: its run sends "
        "nothing and ends each delivery it holds with a final FAILED record saying why. One "
        "whose giving up fails too, 3 claims more, is dropped on record in its project's "
        "dispatcher:deliveries:dropped:{project}.",
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A running job's lease, renewed while it runs: a dead worker's jobs are "
        "claimed again within this.",
    )
    shutdown_grace: float = Field(
        default=20.0, ge=0, description="Seconds a worker lets jobs finish after SIGTERM."
    )
    fan_out_chunk: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Callbacks one fan-out job attempts at once; an event with more is "
        "handed on to a job per chunk (what a crash can make a worker send again).",
    )

    # Delivery
    connect_timeout: float = Field(default=5.0, gt=0)
    total_timeout: float = Field(default=15.0, gt=0)
    verify_tls: bool = True
    retry_schedule: tuple[float, ...] = Field(
        default=(5, 30, 120, 600, 1800, 3600),
        description="Delay (s) before each retry; its length is the number of retries.",
    )
    retry_jitter: float = Field(default=0.2, ge=0, lt=1, description="±fraction of each delay.")
    retry_after_cap: float = Field(default=3600, ge=0, description="Largest Retry-After honoured.")
    shared_bodies: bool = Field(
        default=True,
        description="An event's retries and Redis history records share one copy of its body "
        "(bodies of 1 KiB and more). Off while processes that predate it still run.",
    )
    region_proxies: dict[Region, str] = Field(
        default_factory=dict, description='Egress proxy per region, e.g. {"IDC": "http://p:3128"}.'
    )
    proxy_enforced_regions: frozenset[Region] = Field(
        default=frozenset(),
        description="Proxy regions whose proxy enforces the address policy itself: names the "
        "worker cannot resolve are sent to it (otherwise refused).",
    )
    allow_internal_regions: frozenset[Region] = Field(
        default=frozenset(),
        description='Regions whose callbacks may target loopback/private addresses, e.g. ["IDC"].',
    )
    max_connections: int = Field(default=200, ge=1, description="Connections per region client.")
    max_per_host: int = Field(
        default=64,
        ge=1,
        description="Attempts a worker has in flight to one host (host:port) at most; more "
        "wait in the queue without being attempts.",
    )
    fair_share: bool = Field(
        default=True,
        description="With n projects (or hosts) busy in a worker, each holds at most "
        "1/(n+1) of its slots, so a share is always free for the next; work over its share "
        "waits in the queue without being an attempt.",
    )
    user_agent: str = "callback-dispatcher/0.2"

    # History
    max_request_body: int = Field(default=64 * 1024, ge=0, description="Bytes stored per request.")
    max_response_body: int = Field(
        default=20_000,
        ge=0,
        description="Bytes kept of a response, and the bytes it may take in its record's JSON.",
    )
    history_retention_days: float = Field(default=7, gt=0)
    history_max_page_size: int = Field(default=100, ge=1)
    sweep_batch: int = Field(default=500, ge=1, description="Records removed per retention step.")
    history_url: str | None = Field(
        default=None,
        description="postgresql:// URL of the history database, or `embedded` (`dispatcher "
        "run` starts a private PostgreSQL); unset: history lives in Redis.",
    )
    history_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to connect to PostgreSQL and to wait for a statement.",
    )
    history_ship: bool = Field(
        default=True,
        description="Workers ship history to PostgreSQL (one at a time, elected); false when "
        "`dispatcher history ship` runs as its own process.",
    )
    history_ship_batch: int = Field(
        default=2000, ge=1, le=50_000, description="Records per shipment (one COPY)."
    )
    history_backlog_limit: int = Field(
        default=1_000_000,
        ge=1,
        description="Records waiting in Redis for PostgreSQL past which workers stop claiming "
        "jobs (deliveries wait in the queue) until the shipper catches up.",
    )

    # Endpoint health
    circuit_threshold: int = Field(
        default=10, ge=1, description="Retryable failures in a row that open a breaker."
    )
    circuit_cooldown: float = Field(
        default=30.0, ge=0, description="Seconds a breaker stays open (a project's, per host)."
    )
    disable_after_failures: int = Field(default=50, ge=1)
    disable_after_seconds: float = Field(default=12 * 3600, ge=0)

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as UTC)") from exc
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value:
            setting_urls.check_redis_url(value)
        return value or None

    @field_validator("redis_shards")
    @classmethod
    def _shard_urls(cls, value: list[str] | None) -> list[str] | None:
        if value:
            setting_urls.check_shard_urls(value)
        return value or None

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: frozenset[str]) -> frozenset[str]:
        return setting_urls.allowed_hosts(value)

    @field_validator("history_url")
    @classmethod
    def _postgres_scheme(cls, value: str | None) -> str | None:
        if value and value != EMBEDDED and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"must start with postgresql:// or postgres://, or be {EMBEDDED}")
        return value or None

    @field_validator("region_proxies")
    @classmethod
    def _proxy_urls(cls, value: dict[Region, str]) -> dict[Region, str]:
        for region, url in value.items():  # the URL is not echoed: it may hold a password
            if (why := setting_urls.proxy_problem(url)) is not None:
                raise ValueError(f"the proxy of {region}: {why}")
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in value):
            raise ValueError("delays must be >= 0")
        return value

    @model_validator(mode="before")
    @classmethod
    def _home_shard(cls, values: Any) -> Any:
        """With DISPATCHER_REDIS_SHARDS, DISPATCHER_REDIS_URL is its first (the home shard),
        so that whatever reads the one URL finds the home shard."""
        if not isinstance(values, dict):
            return values
        shards = values.get("redis_shards")
        if isinstance(shards, list) and shards and isinstance(shards[0], str):
            url = values.get("redis_url")
            if url and url != shards[0]:
                raise ValueError(
                    "DISPATCHER_REDIS_URL and DISPATCHER_REDIS_SHARDS are both set and disagree: "
                    "set the shards alone (the first is the home shard)"
                )
            values = {**values, "redis_url": shards[0]}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.connect_timeout > self.total_timeout:
            raise ValueError("connect_timeout must not exceed total_timeout")
        if unproxied := sorted(self.proxy_enforced_regions - self.region_proxies.keys()):
            raise ValueError(
                f"proxy_enforced_regions names {', '.join(unproxied)}, which region_proxies "
                "gives no proxy"
            )
        largest = max(self.api_max_body_bytes, self.emit_batch_max_bytes)
        largest = max(largest, 1024 * self.emit_batch_max_events)  # pacing.SMALLEST_COST each
        if self.emit_project_rate and self.emit_project_burst < largest:
            raise ValueError(f"DISPATCHER_EMIT_PROJECT_BURST ({self.emit_project_burst}) must hold"
                             " the largest emit (its body, or 1 KiB for each of DISPATCHER_EMIT"
                             f"_BATCH_MAX_EVENTS: {largest} bytes)")  # fmt: skip
        if self.redis_min_replicas and self.redis_url is None:
            raise ValueError(
                "DISPATCHER_REDIS_MIN_REPLICAS > 0 needs DISPATCHER_REDIS_URL: the embedded "
                "Redis has no replica"
            )
        self.token_cipher()  # a malformed key fails at start, not at the first delivery
        return self

    def token_cipher(self) -> TokenCipher | None:
        """The cipher of DISPATCHER_TOKEN_KEYS, or None when tokens are stored as given."""
        keys = None if self.token_keys is None else self.token_keys.get_secret_value()
        return TokenCipher.from_keys(keys)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def retention_ms(self) -> int:
        return int(self.history_retention_days * 86_400_000)

    @property
    def effective_job_timeout(self) -> float:
        return self.job_timeout or self.total_timeout + 15

    @property
    def max_attempts(self) -> int:
        return len(self.retry_schedule) + 1

    @property
    def progress_ttl(self) -> int:
        """Seconds a delivery's progress mark lasts: a day, or twice its retries' delays, or
        twice the longest Retry-After honoured (the longest wait between two attempts:
        the mark, its attempt count, must outlive it, or a receiver answering `503` with
        that wait would start the count again, retried for ever)."""
        return int(max(86_400, 2 * sum(self.retry_schedule), 2 * self.retry_after_cap))
