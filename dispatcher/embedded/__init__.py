"""The private servers of the zero-set-up default, each on a free loopback port with its
data in a folder of its own: Redis (`dispatcher run` without DISPATCHER_REDIS_URL, the
tests, the bench) and PostgreSQL (`dispatcher run` with DISPATCHER_HISTORY_URL=embedded,
the tests, the bench), and a Redis Sentinel group (the tests, the bench)."""

from __future__ import annotations

from dispatcher.embedded.postgres import FAST, EmbeddedPostgres
from dispatcher.embedded.redis import EmbeddedRedis, find_redis_server
from dispatcher.embedded.sentinel import SentinelGroup

__all__ = ["FAST", "EmbeddedPostgres", "EmbeddedRedis", "SentinelGroup", "find_redis_server"]
