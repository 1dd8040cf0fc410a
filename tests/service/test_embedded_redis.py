"""The embedded redis-server: starts on a free port, keeps data across restarts, stops,
and keeps its keys when full; a Redis that would evict them stops every process at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis as redis_py
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.connections import preflight
from dispatcher.embedded import EmbeddedRedis, find_redis_server
from dispatcher.errors import InvalidSetting
from tests.cluster import LocalCluster
from tests.helpers import make_settings


def test_binary_is_found() -> None:
    assert Path(find_redis_server()).name == "redis-server"


def test_data_survives_a_restart_and_a_running_server_is_reused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    try:
        client = redis_py.Redis.from_url(url)
        client.set("k", "v")
        client.close()
        again = EmbeddedRedis(tmp_path)
        assert again.start() == url  # reused, not a second server on the same folder
        assert again.running_url() == url
        again.stop()  # it did not start it: leaves it running
        assert first.running_url() == url
    finally:
        first.stop()
    assert first.running_url() is None and first.port is None

    second = EmbeddedRedis(tmp_path)
    url2 = second.start()
    try:
        client = redis_py.Redis.from_url(url2)
        assert client.get("k") == b"v"
        client.close()
    finally:
        second.stop()


def test_the_embedded_and_the_tests_servers_keep_their_keys_when_full(
    redis_server: EmbeddedRedis,
    shard_servers: list[EmbeddedRedis],
    redis_cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    """`maxmemory-policy noeviction`, what the start-up check asks for: the embedded server
    of `dispatcher run`, the tests' servers (their shards' and cluster's too)."""
    with EmbeddedRedis(tmp_path) as embedded:
        for server in (embedded, redis_server, *shard_servers):
            client = redis_py.Redis.from_url(server.url)
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            client.close()
            assert asyncio.run(preflight(make_settings(server.url))) == []
    cluster = make_settings(redis_cluster.url)
    assert asyncio.run(preflight(cluster)) == []
    last = redis_py.Redis(port=redis_cluster.ports[-1])  # each node is asked, not just one
    try:
        last.config_set("maxmemory", 100 * 2**20)
        last.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(InvalidSetting, match="maxmemory-policy allkeys-lru"):
            asyncio.run(preflight(cluster))
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.config_set("maxmemory", 0)
        last.close()


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lfu"])
def test_a_redis_that_evicts_keys_stops_every_process_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Under `volatile-lru` a full Redis evicted the queue's jobs (they carry a time to
    live): accepted events were dropped as "job data expired" (review). The start-up check
    (API, worker, every command) reads `maxmemory_policy` (INFO, readable on managed Redis)
    and refuses anything but `noeviction` once Redis has a `maxmemory`, naming the
    setting."""
    with EmbeddedRedis(tmp_path, persist=False) as server:
        url = server.url
        _evicting(redis_py.Redis.from_url(url), policy)
        with pytest.raises(InvalidSetting, match=f"maxmemory-policy {policy}") as refused:
            asyncio.run(preflight(make_settings(url)))
        assert refused.value.param == "maxmemory-policy"
        assert "noeviction" in refused.value.message
        monkeypatch.setenv("DISPATCHER_REDIS_URL", url)
        result = CliRunner().invoke(app, ["worker"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"configuration error maxmemory-policy: the Redis at {url}" in output


def test_a_cluster_of_one_node_is_checked_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis Cluster of one master holding every slot: asked for `INFO memory` on all
    its nodes, redis-py's cluster client answers the one node's reply itself, not one per
    node. The check read that reply as one entry per node and raised AttributeError: the
    API, the worker and every command stopped with a traceback (review). Each node is
    asked in turn: passed under `noeviction`, refused naming `maxmemory-policy` under
    `volatile-lru`."""
    cluster = LocalCluster(tmp_path, masters=1)
    try:
        url = cluster.start()
        assert asyncio.run(preflight(make_settings(url))) == []
        _evicting(redis_py.Redis(port=cluster.ports[0]), "volatile-lru")
        with pytest.raises(InvalidSetting, match="maxmemory-policy volatile-lru") as refused:
            asyncio.run(preflight(make_settings(url)))
        assert refused.value.param == "maxmemory-policy"
        monkeypatch.setenv("DISPATCHER_REDIS_URL", url)
        result = CliRunner().invoke(app, ["worker"])
    finally:
        cluster.stop()
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert "configuration error maxmemory-policy: the Redis at" in output


def test_a_redis_without_a_memory_limit_that_would_evict_is_a_warning(tmp_path: Path) -> None:
    """`maxmemory 0` (no limit: Redis never evicts) under `volatile-lru`: a warning that
    it would evict once a limit is set, saying to set `noeviction`, not a refusal (review:
    it stopped every process, though nothing could be evicted). Set a limit, it stops them."""
    with EmbeddedRedis(tmp_path, persist=False) as server:
        client = redis_py.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "volatile-lru")
        (warning,) = asyncio.run(preflight(make_settings(server.url)))
        assert warning.startswith(f"the Redis at {server.url} has no maxmemory limit: ")
        assert "maxmemory-policy volatile-lru" in warning and "noeviction" in warning
        client.config_set("maxmemory", 100 * 2**20)
        client.close()
        with pytest.raises(InvalidSetting, match="maxmemory-policy volatile-lru"):
            asyncio.run(preflight(make_settings(server.url)))


def _evicting(client: redis_py.Redis, policy: str) -> None:
    """The Redis of `client` evicts keys under `policy` once it holds 100 MiB."""
    client.config_set("maxmemory", 100 * 2**20)
    client.config_set("maxmemory-policy", policy)
    client.close()
