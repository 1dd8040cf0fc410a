"""Sentinel URLs: what `DISPATCHER_REDIS_URL` accepts, and how a malformed one is refused
(a message naming the setting, never a password, never a stack trace)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.connections import redis_settings, shown
from dispatcher.failover import parse_sentinel_url
from dispatcher.settings import Settings


def test_a_sentinel_url_names_its_sentinels_master_database_and_credentials() -> None:
    parsed = parse_sentinel_url(
        "rediss+sentinel://app:s%40cret@s1:26380,[::1]:26381,s3/my-master/3?ssl_ca_certs=/ca.pem"
    )
    assert parsed.sentinels == (("s1", 26380), ("::1", 26381), ("s3", 26379))
    assert parsed.master == "my-master" and parsed.tls
    assert parsed.options == {
        "db": 3, "username": "app", "password": "s@cret", "ssl_ca_certs": "/ca.pem"
    }  # fmt: skip
    assert "s@cret" not in parsed.describe()


def test_the_database_may_be_left_out() -> None:
    parsed = parse_sentinel_url("redis+sentinel://127.0.0.1:26379/mymaster")
    assert (parsed.master, parsed.options.get("db"), parsed.tls) == ("mymaster", 0, False)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis+sentinel://127.0.0.1:26379", "names its master"),
        ("redis+sentinel://127.0.0.1:26379/", "names its master"),
        ("redis+sentinel://h:port/m/0", "the port must be a number"),
        ("redis+sentinel://h:70000/m/0", "the port must be a number"),
        ("redis+sentinel://h1,,h2/m/0", "one empty"),
        ("redis+sentinel://[::1/m/0", "IPv6"),
        ("redis+sentinel://h/m/zero", "must be a number"),
        ("redis+sentinel://h/m/0/extra", "nothing more"),
        ("redis+sentinel://h/m%20x/0", "spaces"),
        ("sentinel://h/m/0", "must start with"),
    ],
)
def test_a_malformed_url_is_refused_with_what_is_wrong(url: str, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment) as caught:
        Settings(redis_url=url)
    assert "redis_url" in str(caught.value)


def test_the_cli_names_the_setting_and_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis+sentinel://u:hunter2@h:1")
    result = CliRunner().invoke(app, ["worker"])
    output = " ".join(result.output.split())  # as the console wrapped it
    assert result.exit_code == 2
    assert "DISPATCHER_REDIS_URL" in output and "names its master" in output
    assert "hunter2" not in output and "Traceback" not in output


def test_min_replicas_needs_a_redis_of_its_own() -> None:
    with pytest.raises(ValidationError, match="the embedded Redis has no replica"):
        Settings(redis_min_replicas=1)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Settings(redis_url="redis://h/0", redis_min_replicas=-1)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss+sentinel://u:p@a:1,b:2/m/0", "rediss+sentinel://u:***@a:1,b:2/m/0"),
        ("redis+cluster://u:p@a:1,b:2", "redis+cluster://u:***@a:1,b:2"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("redis://h:6379/0?db=2&decode_responses=1", "redis://h:6379/0?db=2&decode_responses=1"),
        # what redis-py reads as a password too: every one masked whole
        ("redis://:s3cret@ss@h/0", "redis://:***@h/0"),  # up to the last '@', as it splits
        ("redis://u:s3cr/et@h/0", "redis://u:***@h/0"),  # a '/': no host redis-py can read
        ("redis://s3cret@h/0", "redis://***@h/0"),  # a user name alone: too much, not less
        ("redis://h/0?password=s3cret", "redis://h/0?password=***"),
        ("rediss://h/0?db=1&Pass%77ord=s3cret&x=y", "rediss://h/0?db=1&Pass%77ord=***&x=y"),
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
        ("unix://:s3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("redis+sentinel://a:1/m/0?sentinel_password=s3cret", "redis+sentinel://a:1/m/0?sentinel_password=***"),
        ("rediss://h/0?ssl_password=s3cret#x", "rediss://h/0?ssl_password=***"),
    ],
)  # fmt: skip
def test_passwords_are_masked_where_urls_are_shown(url: str, masked: str) -> None:
    assert shown(url) == masked


def test_arq_settings_of_a_sentinel_url_name_the_same_master() -> None:
    settings = Settings(redis_url="redis+sentinel://:pw@a:1,b:2/mymaster/4")
    arq = redis_settings(settings)
    assert arq.sentinel and arq.sentinel_master == "mymaster"
    assert arq.host == [("a", 1), ("b", 2)] and arq.database == 4 and arq.password == "pw"
