"""The operator's CLI against a real Redis (sync tests: the CLI runs its own event loop)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys, project_scoped
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.tokens import TokenCipher

keys = Keys()  # today's key names (one shard)


@pytest.fixture
def cli(redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    client = redis_py.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    yield CliRunner()


def test_callbacks_add_list_disable_enable_rm(cli: CliRunner) -> None:
    added = cli.invoke(
        app,
        ["callbacks", "add", "--project", "p", "--url", "https://example.com/h",
         "--event", "BUILD_START,BUILD_END", "--token", "tok"],
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "registered BUILD_START" in added.output and "registered BUILD_END" in added.output
    listed = cli.invoke(app, ["callbacks", "list", "--project", "p"])
    assert listed.exit_code == 0 and "2 callbacks" in listed.output
    assert "tok" not in listed.output.replace("token", "")
    assert cli.invoke(app, ["callbacks", "disable", "1", "--reason", "maint"]).exit_code == 0
    assert "maint" in cli.invoke(app, ["callbacks", "list", "--project", "p"]).output
    assert cli.invoke(app, ["callbacks", "enable", "1"]).exit_code == 0
    assert cli.invoke(app, ["callbacks", "rm", "1", "--project", "p"]).exit_code == 0
    assert "1 callbacks" in cli.invoke(app, ["callbacks", "list", "--project", "p"]).output
    missing = cli.invoke(app, ["callbacks", "rm", "1", "--project", "p"])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_callbacks_at_every_level_with_an_auth_header(cli: CliRunner) -> None:
    header = ["--auth-header", "X-Api-Key: CLI-SECRET-VALUE"]
    for where in (["--all-projects"], ["--project", "p", "--pipeline", "p1"], ["--project", "p"]):
        added = cli.invoke(app, ["callbacks", "add", *where, "--url", "https://example.com/h",
                                 "--event", "BUILD_END", *header])  # fmt: skip
        assert added.exit_code == 0, added.output
    platform = cli.invoke(app, ["callbacks", "list", "--all-projects"])
    assert platform.exit_code == 0 and "platform" in platform.output
    project = cli.invoke(app, ["callbacks", "list", "--project", "p"])
    assert (
        "pipeline" in project.output and "p1" in project.output and "2 callbacks" in project.output
    )
    one = cli.invoke(app, ["callbacks", "list", "--project", "p", "--pipeline", "p1"])
    assert "1 callbacks" in one.output
    for output in (platform.output, project.output, one.output):
        assert "CLI-SECRET-VALUE" not in output and "set" in output
    both = cli.invoke(app, ["callbacks", "list", "--project", "p", "--all-projects"])
    assert both.exit_code == 2 and "one of them" in both.output
    bad = cli.invoke(app, ["callbacks", "add", "--project", "p", "--url", "https://e.com/h",
                           "--event", "BUILD_END", "--auth-header", "Host: evil"])  # fmt: skip
    assert bad.exit_code == 1 and "reserved" in bad.output
    assert cli.invoke(app, ["callbacks", "rm", "1", "--all-projects"]).exit_code == 0
    assert "0 callbacks" in cli.invoke(app, ["callbacks", "list", "--all-projects"]).output


def test_callbacks_add_refuses_unknown_events(cli: CliRunner) -> None:
    result = cli.invoke(
        app, ["callbacks", "add", "--project", "p", "--url", "https://e.com/h", "--event", "NOPE"]
    )
    assert result.exit_code == 1 and "unknown event 'NOPE'" in result.output


def test_emit_queues_an_event(cli: CliRunner, redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"buildId": "b-1"}))
    result = cli.invoke(
        app, ["emit", "--project", "p", "--event", "BUILD_END", "--data", f"@{data}"]
    )
    assert result.exit_code == 0, result.output
    event_id = result.output.strip()
    client = redis_py.Redis.from_url(redis_server.url)
    assert client.exists(keys.arq_job(project_scoped("p", event_id)))
    client.close()


def test_emit_unanswered_names_the_id_it_made_and_how_to_emit_it_again(
    cli: CliRunner, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`emit` without --event-id, Redis refusing it until the wait ends (here: full): it
    exited 1 saying emitting again with the same event ids is safe, but never printed the
    id it made (review). It names it, with the command to repeat; that command, once Redis
    takes writes again, queues the event under that id."""
    monkeypatch.setenv("DISPATCHER_EMIT_WAIT", "0.2")
    data = '{\n  "buildId": "b 1",\n  "note": "a text past the width of a terminal",\n  "n": 1\n}'
    client = redis_py.Redis.from_url(redis_server.url)
    limit = str(client.config_get("maxmemory")["maxmemory"])  # type: ignore[index]
    client.config_set("maxmemory", 1)  # full: every write refused (noeviction)
    try:
        failed = cli.invoke(app, ["emit", "--project", "p", "--event", "BUILD_END", "--data", data])
    finally:
        client.config_set("maxmemory", limit)
    output = failed.output
    assert failed.exit_code == 1 and "same event ids is safe" in " ".join(output.split()), output
    # the command on a line of its own, whole: pasted, it is what runs (a multi-line
    # --data as one line; a wrapped command ran its first line alone, a new id)
    found = re.search(
        r"event id (evt_\w+); to emit it again:\n(dispatcher emit .*--event-id \1)\n", output
    )
    assert found, output
    again = cli.invoke(app, shlex.split(found[2])[1:])
    assert again.exit_code == 0 and again.output.strip() == found[1], again.output
    assert client.exists(keys.arq_job(project_scoped("p", found[1])))
    client.close()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--data", "{broken"], "not valid JSON"),
        (["--data", "[1]"], "JSON object"),
        (["--event", "NOPE"], "unknown event"),
        (["--event-id", "nl-batch\n"], "eventId"),
    ],
)
def test_emit_refuses_bad_input(cli: CliRunner, args: list[str], fragment: str) -> None:
    base = {"--project": "p", "--event": "BUILD_END", "--data": "{}"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = cli.invoke(app, ["emit", *[x for kv in base.items() for x in kv]])
    assert result.exit_code in (1, 2) and fragment in result.output


def test_tokens_rotate_names_the_secrets_no_key_decrypts_and_fails(
    cli: CliRunner, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored secret no key decrypts (here: one that only looks encrypted, stored as
    given before keys were set) is left as it is; `tokens rotate` only logged it, printed
    "re-encrypted N tokens" and exited 0, so the operator dropped the old key believing
    all was done (review). It names the callback and exits 1."""
    two = "--project p --url https://e.com/a --event BUILD_START,BUILD_END --token plain"
    added = cli.invoke(app, ["callbacks", "add", *two.split()])
    assert added.exit_code == 0, added.output
    client = redis_py.Redis.from_url(redis_server.url)
    client.hset(keys.callback(1), "secretToken", "fernet:poison")
    client.close()
    monkeypatch.setenv("DISPATCHER_TOKEN_KEYS", TokenCipher.new_key())
    rotated = cli.invoke(app, ["tokens", "rotate"])
    output = " ".join(rotated.output.split())  # as the console wrapped it
    assert rotated.exit_code == 1, output
    assert "re-encrypted 1 tokens" in output and "1 callback(s) hold a secret" in output
    assert "callback 1;" in output


def test_roles_grant_list_revoke(cli: CliRunner) -> None:
    assert cli.invoke(app, ["roles", "grant", "--project", "p", "--user", "u",
                            "--role", "admin"]).exit_code == 0  # fmt: skip
    assert "admin" in cli.invoke(app, ["roles", "list", "--project", "p"]).output
    assert cli.invoke(app, ["roles", "revoke", "--project", "p", "--user", "u"]).exit_code == 0
    assert " u " not in cli.invoke(app, ["roles", "list", "--project", "p"]).output


def test_history_prints_a_table(cli: CliRunner, redis_server: EmbeddedRedis) -> None:
    result = cli.invoke(
        app, ["history", "--project", "p", "--url", "https://e.com/h", "--event", "BUILD_END"]
    )
    assert result.exit_code == 0 and "0 records" in result.output
    bad = cli.invoke(
        app,
        ["history", "--project", "p", "--url", "u", "--event", "BUILD_END", "--since", "today"],
    )
    assert bad.exit_code == 1 and "startTime" in bad.output


def test_without_redis_the_cli_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DISPATCHER_REDIS_URL", raising=False)
    monkeypatch.setenv("DISPATCHER_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["callbacks", "list", "--project", "p"])
    assert result.exit_code == 2 and "DISPATCHER_REDIS_URL" in result.output


def test_worker_check_reads_this_hosts_marks_not_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`worker --check` passes on a fresh mark of a worker of this host and fails on none
    or a stale one, without a Redis setting at all (`worker.liveness`)."""
    monkeypatch.delenv("DISPATCHER_REDIS_URL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cli = CliRunner()
    assert cli.invoke(app, ["worker", "--check"]).exit_code == 1
    marks = tmp_path / "dispatcher-workers"
    marks.mkdir()
    (marks / "4242.alive").touch()
    (marks / "notapid.alive").touch()
    result = cli.invoke(app, ["worker", "--check"])
    assert result.exit_code == 0 and "1 live worker(s)" in result.output and "4242" in result.output
    stale = time.time() - 31
    os.utime(marks / "4242.alive", (stale, stale))
    assert cli.invoke(app, ["worker", "--check"]).exit_code == 1
    assert cli.invoke(app, ["worker", "--check", "--fresh", "60"]).exit_code == 0


def _seed_status(url: str) -> None:
    """Known content: 3 queued events, 2 disabled and 1 failing callback, attempt stats."""
    import asyncio
    import time

    from dispatcher.models import Event, Region
    from dispatcher.producer import Producer
    from dispatcher.registry import Registry
    from dispatcher.services import Services
    from tests.helpers import make_settings

    async def go() -> None:
        settings = make_settings(url)
        redis = connect(settings)
        registry = Registry(redis)
        for i in range(3):
            cid, _ = await registry.create("p", f"https://e.com/{i}", Event.BUILD_END, Region.OSS)
            if i < 2:
                await registry.set_enabled(cid, False, "test")
        health = Services(settings, redis).health
        for _ in range(4):
            await health.failed(3, "x")
        await Producer(settings, redis).emit_many([("p", "BUILD_END", {})] * 3)
        minute = keys.stats(int(time.time()) // 60)
        counts = {"success": 7, "retry": 2, "failed": 1, "ms:50": 10}
        await redis.hset(minute, mapping=counts)  # type: ignore[misc]  # sync|async
        await redis.aclose()

    asyncio.run(go())


def status_rows(cli: CliRunner) -> dict[str, str]:
    """`dispatcher status`'s table, figure by name (it must succeed)."""
    result = cli.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    return {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in result.output.splitlines()
        if line.count("│") >= 3
    }


def test_status_prints_the_figures(cli: CliRunner, redis_server: EmbeddedRedis) -> None:
    _seed_status(redis_server.url)
    rows = status_rows(cli)
    assert rows["queue: jobs due"] == "3"
    assert rows["workers alive"] == "0"
    assert rows["callbacks failing"] == "1"
    assert rows["callbacks disabled"] == "2"
    assert (rows["last hour: success"], rows["last hour: retry"]) == ("7", "2")
    assert (rows["last hour: failed"], rows["last hour: gone"]) == ("1", "0")
    assert rows["last hour: attempt duration p50 / p99"] == "40 ms / 50 ms"
    assert rows["last day: attempt duration p50 / p99"] == "- / -"  # workers write both
    failing = cli.invoke(app, ["callbacks", "failing"])
    assert "1 failing callbacks" in failing.output and "│ 3 " in failing.output


def test_bulk_redeliver_and_sweep(cli: CliRunner, redis_server: EmbeddedRedis) -> None:
    import asyncio

    from dispatcher.history.redis import RedisHistory
    from tests.helpers import make_settings

    settings = make_settings(redis_server.url)
    now = now_ms()

    async def seed() -> None:
        redis = connect(settings)
        history = RedisHistory(redis, settings, keys)
        callback_id, _ = await Registry(redis).create(  # a redelivery needs its callback
            "p", "https://e.com/h", Event.BUILD_END, Region.DEVNET
        )
        for i, (status, final) in enumerate(
            [("FAILED", True), ("FAILED", False), ("SUCCESS", True), ("FAILED", True)]
        ):
            await history.add({
                "projectId": "p", "callBackUrl": "https://e.com/h", "events": "BUILD_END",
                "status": status, "final": final, "startTime": now, "endTime": now,
                "createdTime": now - i, "callbackId": callback_id,
                "deliveryId": f"evt_{i}.1",
                "eventId": f"evt_{i}", "requestBody": "{}",
            }, dead=status == "FAILED" and final)  # fmt: skip
        await history.add({
            "projectId": "p", "callBackUrl": "https://e.com/h", "events": "BUILD_END",
            "status": "FAILED", "final": True, "startTime": now, "endTime": now,
            "createdTime": now - 9, "callbackId": callback_id, "deliveryId": "evt_cut.1",
            "eventId": "evt_cut", "requestBody": "{", "requestBodyTruncated": True,
        }, dead=True)  # fmt: skip
        await history.add({
            "projectId": "p", "callBackUrl": "https://e.com/h", "events": "BUILD_END",
            "status": "SUCCESS", "startTime": 0, "endTime": 0, "createdTime": 1000,
        })  # fmt: skip
        await redis.aclose()

    asyncio.run(seed())
    result = cli.invoke(
        app,
        ["redeliver", "--project", "p", "--url", "https://e.com/h", "--event", "BUILD_END"],
    )
    assert result.exit_code == 0, result.output
    assert "queued 2 redeliveries" in result.output
    assert "1 left out: request body not kept whole (cut, or lost)" in result.output
    client = redis_py.Redis.from_url(redis_server.url)
    queued = [k for k in client.scan_iter(keys.ARQ_JOB_PREFIX + "*") if b"redeliver" in k]
    client.close()
    assert len(queued) == 2
    swept = cli.invoke(app, ["sweep"])
    assert swept.exit_code == 0 and "removed 1 records" in swept.output


def test_callbacks_add_applies_the_region_address_policy(cli: CliRunner) -> None:
    """The CLI registers through the same rule as the route: no metadata or loopback
    target in a public region (before the service layer, it stored them)."""
    for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:8080/hook"):
        result = cli.invoke(
            app,
            ["callbacks", "add", "--project", "p", "--url", url, "--event", "BUILD_END",
             "--region", "OSS"],
        )  # fmt: skip
        assert result.exit_code == 1, result.output
        assert "metadata" in result.output or "internal" in result.output
    assert "0 callbacks" in cli.invoke(app, ["callbacks", "list", "--project", "p"]).output


def test_history_refuses_an_unknown_event(cli: CliRunner) -> None:
    """A typo is an error that names the event, as on the route (it was an empty page)."""
    result = cli.invoke(
        app, ["history", "--project", "p", "--url", "https://e.com/h", "--event", "BUILD_ENDED"]
    )
    assert result.exit_code == 1 and "unknown event 'BUILD_ENDED'" in result.output


def test_dead_lists_the_deliveries_that_gave_up(
    cli: CliRunner, redis_server: EmbeddedRedis
) -> None:
    import asyncio

    from dispatcher.history.redis import RedisHistory
    from tests.helpers import make_settings

    settings = make_settings(redis_server.url)
    now = now_ms()

    async def seed() -> None:
        redis = connect(settings)
        history = RedisHistory(redis, settings, keys)
        for project, final in (("p", True), ("p", False), ("q", True)):
            await history.add({
                "projectId": project, "callBackUrl": "https://e.com/h", "events": "BUILD_END",
                "status": "FAILED", "final": final, "startTime": now, "endTime": now,
                "createdTime": now, "deliveryId": f"evt_{project}{final}.1",
            }, dead=final)  # fmt: skip
        await redis.aclose()

    asyncio.run(seed())
    everywhere = cli.invoke(app, ["dead"])
    assert everywhere.exit_code == 0 and "2 dead letters" in everywhere.output
    one = cli.invoke(app, ["dead", "--project", "q"])
    assert "1 dead letters" in one.output and "evt_qTrue.1" in one.output


def test_db_upgrade_without_postgres_has_nothing_to_do(cli: CliRunner) -> None:
    """Deploy files run it unconditionally (an init container, ExecStartPre)."""
    result = cli.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0 and "nothing to upgrade" in result.output


def test_control_characters_no_one_registered_are_printed_escaped(cli: CliRunner) -> None:
    """A filter's error quotes the event's value that failed it (`abs(data.x)` of an event
    whose x is "\\x1b[2J…"): registration refuses control characters, but this is written
    by the worker, and `callbacks list` sent the ESC to the operator's terminal, clearing
    the screen and retitling it (review). Every cell the CLI prints shows them escaped."""
    added = cli.invoke(app, ["callbacks", "add", "--project", "p", "--url",
                             "https://example.com/h", "--event", "BUILD_END",
                             "--filter", "abs(data.x)"])  # fmt: skip
    assert added.exit_code == 0, added.output
    error = "invalid type for value: \x1b[2J\x1b]0;pwned\x07"
    client = redis_py.Redis.from_url(os.environ["DISPATCHER_REDIS_URL"])
    client.hset(keys.filter_errors(1), mapping={"n": 1, "lastError": error})
    client.close()
    listed = cli.invoke(app, ["callbacks", "list", "--project", "p"], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert "\x1b" not in listed.output and "\\x1b[2J\\x1b]0;pwned\\x07" in listed.output


def test_what_projects_wrote_is_printed_as_it_is(cli: CliRunner) -> None:
    """A reason or a filter a project wrote is printed as it is, never read as the
    terminal's markup: "[/]" stopped `callbacks list` with a MarkupError (review), and a
    `[link=…]` would have shown the operator a disguised link."""
    added = cli.invoke(app, ["callbacks", "add", "--project", "p", "--url",
                             "https://example.com/h", "--event", "BUILD_END",
                             "--filter", "data.x == '[/ops]'"])  # fmt: skip
    assert added.exit_code == 0, added.output
    reason = "[/] [link=https://evil.example]ops[/link] :warning:"
    assert cli.invoke(app, ["callbacks", "disable", "1", "--reason", reason]).exit_code == 0
    listed = cli.invoke(app, ["callbacks", "list", "--project", "p"], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert reason in listed.output and "data.x == '[/ops]'" in listed.output


def test_status_names_the_project_of_the_oldest_due_job(
    cli: CliRunner, redis_server: EmbeddedRedis
) -> None:
    """DispatcherProjectBacklogOld sends the on-call here: whose is the old backlog."""
    queue = redis_py.Redis.from_url(redis_server.url)
    queue.flushdb()
    now = now_ms()
    queue.zadd(keys.QUEUE, {"quiet:evt_new": now, "flood:evt_old": now - 700_000})
    queue.zadd(keys.QUEUE, {"later:evt_due_later": now + 60_000})
    rows = status_rows(cli)
    assert rows["queue: jobs due"] == "2" and float(rows["queue: oldest due (s)"]) >= 700
    assert rows["queue: oldest due job"] == "flood:evt_old"
    assert rows["queue: oldest due project"] == "flood"


def test_the_probe_script_checks_the_same_marks_and_loads_nothing_else(tmp_path: Path) -> None:
    """`dispatcher-alive`, what deploy/'s liveness probes run, answers as `worker --check`
    without loading the service: a probe every 30 s that loaded the CLI cost ~1.7 CPU-s."""
    probe = Path(sys.executable).parent / "dispatcher-alive"
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([probe, *args], env=env, capture_output=True, text=True, timeout=30)

    assert run().returncode == 1
    (tmp_path / "dispatcher-workers").mkdir()
    (tmp_path / "dispatcher-workers" / "4242.alive").touch()
    alive = run("--fresh", "10")
    assert alive.returncode == 0 and "1 live worker(s)" in alive.stdout and "4242" in alive.stdout
    assert run("--fresh", "5").returncode == 2  # under a mark's period: refused
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, dispatcher.worker.liveness; print(*sys.modules)"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    heavy = ("pydantic", "redis", "fastapi", "structlog", "httpx", "dispatcher.settings")
    assert not [name for name in loaded if name.startswith(heavy)]
