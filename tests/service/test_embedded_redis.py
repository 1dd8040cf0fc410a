"""The embedded redis-server: starts on a free port, keeps data across restarts, stops."""

from __future__ import annotations

from pathlib import Path

import redis as redis_py

from dispatcher.embedded import EmbeddedRedis, find_redis_server


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
