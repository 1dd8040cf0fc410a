"""Settings fail early and clearly; the models speak the seeds' JSON names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.cli.common import misspelt
from dispatcher.models import (
    CreateCallBackResult,
    Event,
    HistoryPage,
    HistoryRecord,
    Region,
    Result,
)
from dispatcher.settings import Settings


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis://127.0.0.1:1/2")
    monkeypatch.setenv("DISPATCHER_RETRY_SCHEDULE", "[1, 2, 3]")
    monkeypatch.setenv("DISPATCHER_ALLOW_INTERNAL_REGIONS", '["IDC"]')
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:1/2"
    assert settings.retry_schedule == (1, 2, 3) and settings.max_attempts == 4
    assert settings.allow_internal_regions == frozenset({Region.IDC})


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"redis_url": "http://nope"}, "redis://"),
        ({"retry_schedule": (1, -1)}, ">= 0"),
        ({"connect_timeout": 30, "total_timeout": 10}, "connect_timeout"),
        ({"api_port": 70000}, "65535"),
        ({"no_such_setting": 1}, "Extra inputs"),
        # a batch of this many events costs the pace more than its burst: refused for ever
        ({"emit_batch_max_events": 100_000}, "MAX_EVENTS: 102400000 bytes"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Settings(**values)  # type: ignore[arg-type]  # the bad values under test


def test_cli_reports_a_bad_setting_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_TIMEZONE", "Nowhere/Land")
    result = CliRunner().invoke(app, ["callbacks", "list", "--project", "p"])
    assert result.exit_code == 2
    assert "DISPATCHER_TIMEZONE" in result.output and "unknown time zone" in result.output
    monkeypatch.delenv("DISPATCHER_TIMEZONE")
    monkeypatch.setenv("DISPATCHER_EMIT_BATCH_MAX_EVENTS", "100000")  # a check of several
    result = CliRunner().invoke(app, ["callbacks", "list", "--project", "p"])
    assert result.exit_code == 2 and "DISPATCHER_:" not in result.output  # it said that
    assert "DISPATCHER_EMIT_PROJECT_BURST" in " ".join(result.output.split()), result.output


def test_a_misspelt_setting_is_said_not_silently_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings ignores a `DISPATCHER_*` variable that names no setting:
    `DISPATCHER_SHUTDOWN_GRACEE=3` left the grace at 20 s without a word (review). One spelt
    like a setting is said at start; others (the embedded PostgreSQL's) pass."""
    assert misspelt({"DISPATCHER_SHUTDOWN_GRACEE": "3", "DISPATCHER_PG_BIN": "/x"}) == [
        ("DISPATCHER_SHUTDOWN_GRACEE", "DISPATCHER_SHUTDOWN_GRACE")
    ]
    links = {  # what Kubernetes sets for a Service named `dispatcher-redis` (review)
        "DISPATCHER_REDIS_PORT": "tcp://10.0.0.7:6379",
        "DISPATCHER_REDIS_SERVICE_PORT": "6379",
        "DISPATCHER_REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
    }
    assert misspelt({**links, "DISPATCHER_REDIS_URLL": "redis://r:6379/0"}) == [
        ("DISPATCHER_REDIS_URLL", "DISPATCHER_REDIS_URL")
    ]
    monkeypatch.setenv("DISPATCHER_SHUTDOWN_GRACEE", "3")
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "0.2")
    said = " ".join(CliRunner().invoke(app, ["callbacks", "list", "--project", "p"]).output.split())
    assert (
        "DISPATCHER_SHUTDOWN_GRACEE is no setting, ignored (not DISPATCHER_SHUTDOWN_GRACE?)" in said
    )


@pytest.mark.parametrize(
    ("proxy", "fragment"),
    [
        ("ops:s3cret@squid.corp:3128", "http:// or https://"),  # the scheme forgotten
        ("127.0.0.1:3128", "http:// or https://"),
        ("socks5://squid.corp:1080", "http:// or https://"),
        ("http://:3128", "names no host"),
        ("http://proxy.internal:31x8", "not a number"),
        ("http://proxy.internal:3128/path", "no path"),
        ("http://127.1:3128", "four numbers"),  # aiohttp refuses it at every request
        ("http://2130706433:3128", "four numbers"),
    ],
)
def test_a_mistyped_proxy_fails_at_start_naming_its_region_not_its_url(
    proxy: str, fragment: str
) -> None:
    """Else every delivery of the region would fail, each alone and late."""
    with pytest.raises(ValidationError, match=fragment) as raised:
        Settings(region_proxies={"IDC": proxy})
    assert "the proxy of IDC" in str(raised.value)
    assert "s3cret" not in str(raised.value) and "squid.corp" not in str(raised.value)


def test_proxy_urls_with_a_scheme_are_taken() -> None:
    proxies = {"IDC": "http://ops:s3cret@proxy.internal:3128", "OSS": "https://[::1]:3129/"}
    assert Settings(region_proxies=proxies).region_proxies[Region.OSS] == proxies["OSS"]


@pytest.mark.parametrize(
    ("overrides", "at_least"),
    [
        ({}, 86_400),
        ({"retry_schedule": (40_000.0, 40_000.0)}, 160_000),
        ({"retry_after_cap": 172_800}, 345_600),  # a receiver may ask for two days
    ],
)
def test_a_deliverys_progress_outlives_its_longest_wait(
    overrides: dict[str, object], at_least: int
) -> None:
    """The progress mark (a delivery's attempt count) lasts past the longest wait between
    two attempts, a Retry-After at the cap included: with a cap past a day, a receiver
    answering `503 Retry-After: <cap>` outlived the mark, and the count started again
    each time, never reaching its last attempt (review)."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    assert settings.progress_ttl == at_least
    longest = max([*settings.retry_schedule, settings.retry_after_cap])
    assert settings.progress_ttl > longest


def test_the_eighteen_events_and_three_regions() -> None:
    assert len(Event) == 18 and Event("BUILD_TASK_PAUSE") is Event.BUILD_TASK_PAUSE
    assert [r.value for r in Region] == ["DEVNET", "OSS", "IDC"]


def test_json_names_are_the_seeds() -> None:
    batch = Result[CreateCallBackResult](
        data=CreateCallBackResult(success_events=["BUILD_END"], failure_events={"X": "bad"})
    )
    assert batch.model_dump(mode="json") == {
        "data": {"failureEvents": {"X": "bad"}, "successEvents": ["BUILD_END"]},
        "message": None,
        "status": 0,
    }
    record = HistoryRecord.model_validate(
        {"id": 1, "projectId": "p", "callBackUrl": "u", "events": "BUILD_END",
         "status": "SUCCESS", "startTime": 1, "endTime": 2, "createdTime": 3,
         "requestHeaders": [{"name": "a", "value": "b"}]}
    )  # fmt: skip
    page = HistoryPage(records=[record], count=1, total_pages=1, page_size=20, page=1)
    dumped = page.model_dump(mode="json")
    assert set(dumped) == {"records", "count", "totalPages", "pageSize", "page"}
    assert {"callBackUrl", "responseBody", "responseCode", "errorMsg", "requestHeaders",
            "requestBody", "createdTime", "startTime", "id", "endTime", "projectId", "events",
            "status"} <= set(dumped["records"][0])  # fmt: skip
    assert dumped["records"][0]["requestHeaders"] == [{"name": "a", "value": "b"}]
