"""`dispatcher shards` and the operator's commands over two shards (sync tests: the CLI
runs its own event loop)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import redis as redis_py
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.placement import rendezvous
from dispatcher.shards.move import Mover
from dispatcher.tokens import TokenCipher

KEYS = Keys()


@pytest.fixture
def cli(shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    urls = [server.url for server in shard_servers]
    for url in urls:
        redis_py.Redis.from_url(url).flushall()
    monkeypatch.delenv("DISPATCHER_REDIS_URL", raising=False)
    monkeypatch.setenv("DISPATCHER_REDIS_SHARDS", json.dumps(urls))
    monkeypatch.setenv("DISPATCHER_PLACEMENT_REFRESH", "0.05")
    # a move's drain waits this fleet's late pushes (refresh + emit wait + Redis timeout)
    monkeypatch.setenv("DISPATCHER_EMIT_WAIT", "0.5")
    monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "1")
    yield CliRunner()


def test_grow_then_move_a_project_with_the_cli(
    cli: CliRunner, shard_servers: list[EmbeddedRedis]
) -> None:
    listed = cli.invoke(app, ["shards", "list"])
    assert listed.exit_code == 0 and "not yet (grow)" in listed.output
    project = next(f"cli-{n}" for n in range(100) if rendezvous(f"cli-{n}", 2) == 0)
    add = ["callbacks", "add", "--url", "https://example.com/h", "--event", "BUILD_END",
           "--region", "OSS"]  # fmt: skip
    assert cli.invoke(app, [*add, "--all-projects"]).exit_code == 0
    assert cli.invoke(app, [*add, "--project", project]).exit_code == 0
    grown = cli.invoke(app, ["shards", "grow"])
    assert grown.exit_code == 0, grown.output
    assert "0 project(s) pinned" in grown.output  # it hashes to shard 0, where it is
    on = [redis_py.Redis.from_url(server.url) for server in shard_servers]
    assert [bool(r.exists(KEYS.project_callbacks("DEVOPS_ALL_PROJECT"))) for r in on] == [True] * 2
    moved = cli.invoke(app, ["shards", "move", project, "--to", "1"])
    assert moved.exit_code == 0, moved.output
    assert [bool(r.exists(KEYS.project_callbacks(project))) for r in on] == [False, True]
    listed = cli.invoke(app, ["callbacks", "list", "--project", project])
    assert "https://example.com/h" in listed.output
    shards = cli.invoke(app, ["shards", "list"])
    assert shards.exit_code == 0 and "not yet" not in shards.output
    status = cli.invoke(app, ["status"])
    assert status.exit_code == 0 and "queue: jobs due" in status.output


def test_forget_removes_a_stale_copy_with_the_cli(
    cli: CliRunner, shard_servers: list[EmbeddedRedis]
) -> None:
    """`shards forget` removes a copy from a shard the project does not live on, and
    refuses the shard it lives on, in a message, not a stack trace."""
    project = next(f"cli-{n}" for n in range(100) if rendezvous(f"cli-{n}", 1) == 0)
    on = [redis_py.Redis.from_url(server.url) for server in shard_servers]
    for r in on:  # its roles on both: shard 1's is a stale copy (one shard in use)
        r.hset(KEYS.roles(project), "alice", "ADMIN")
    refused = cli.invoke(app, ["shards", "forget", project, "--shard", "0"])
    assert refused.exit_code != 0 and "lives on shard 0" in refused.output
    assert "Traceback" not in refused.output
    forgot = cli.invoke(app, ["shards", "forget", project, "--shard", "1"])
    assert forgot.exit_code == 0, forgot.output
    assert f"{project}: shard 1 holds nothing of it now" in forgot.output
    assert [bool(r.exists(KEYS.roles(project))) for r in on] == [True, False]


def test_tokens_rotate_says_what_it_skipped_of_a_moving_project(
    cli: CliRunner, shard_servers: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tokens rotate` while a project moves off a shard (its `callbacks_frozen` mark set
    there) leaves that project's callbacks under the old key, says how many and to run it
    again once the moves end, and exits non-zero: the operator must not retire the old
    key yet. Run again without the mark, it takes them."""
    old_key, new_key = TokenCipher.new_key(), TokenCipher.new_key()
    monkeypatch.setenv("DISPATCHER_TOKEN_KEYS", old_key)
    add = ["callbacks", "add", "--url", "https://example.com/h", "--event", "BUILD_END",
           "--region", "OSS", "--token", "s1", "--project"]  # fmt: skip
    assert cli.invoke(app, [*add, "mv"]).exit_code == 0
    assert cli.invoke(app, [*add, "kept"]).exit_code == 0
    home = redis_py.Redis.from_url(shard_servers[0].url)
    home.set(KEYS.callbacks_frozen("mv"), "mover/1")
    monkeypatch.setenv("DISPATCHER_TOKEN_KEYS", f"{new_key},{old_key}")
    rotated = cli.invoke(app, ["tokens", "rotate"])
    assert rotated.exit_code != 0 and "re-encrypted 1 tokens" in rotated.output
    assert (
        "1 callbacks of moving projects skipped: run rotate again once the moves end"
        in " ".join(rotated.output.split())
    )
    home.delete(KEYS.callbacks_frozen("mv"))
    again = cli.invoke(app, ["tokens", "rotate"])
    assert again.exit_code == 0 and "re-encrypted 2 tokens" in again.output, again.output
    assert "skipped" not in again.output


def test_status_names_the_oldest_due_job_of_every_shard(
    cli: CliRunner, shard_servers: list[EmbeddedRedis]
) -> None:
    """The oldest due job of the fleet is the second shard's: its project is named."""
    assert cli.invoke(app, ["shards", "grow"]).exit_code == 0  # both in use
    first, second = (redis_py.Redis.from_url(server.url) for server in shard_servers)
    now = now_ms()
    first.zadd(KEYS.QUEUE, {"quiet:evt_new": now - 5_000})
    second.zadd(KEYS.QUEUE, {"flood:evt_old": now - 700_000, "other:evt_new": now})
    status = cli.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert "flood:evt_old" in status.output and "quiet:evt_new" not in status.output
    rows = dict(
        (line.split("│")[1].strip(), line.split("│")[2].strip())
        for line in status.output.splitlines()
        if line.count("│") >= 3
    )
    assert rows["queue: jobs due"] == "3" and rows["queue: oldest due project"] == "flood"


def test_a_stopped_grow_is_named_by_the_list_and_by_what_ctrl_c_says(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grow stopped after its first step (the longer count published as growing) freezes
    the projects it would move; `shards list` says the shard is growing and to run grow
    again, where it said `not yet (grow)` and named nothing the 503 pointed at. `grow
    --rebalance` stopped by Ctrl+C in its rebalance names rebalance too: grow alone had
    nothing to grow and left the move stopped (review)."""
    home = redis_py.Redis.from_url(json.loads(os.environ["DISPATCHER_REDIS_SHARDS"])[0])
    home.hset(KEYS.PLACEMENT, mapping={":count": "1", ":growing": "2"})
    home.incr(KEYS.PLACEMENT_VERSION)
    listed = cli.invoke(app, ["shards", "list"])
    assert listed.exit_code == 0 and "growing (if stopped: grow again)" in listed.output

    async def rebalance(self: Mover) -> int:
        self.say("p1: shard 0 -> 1: freezing its callbacks")
        raise KeyboardInterrupt

    monkeypatch.setattr(Mover, "rebalance", rebalance)
    stopped = cli.invoke(app, ["shards", "grow", "--rebalance"])
    said = " ".join(stopped.output.split())
    assert stopped.exit_code == 130, stopped.output
    assert "stopped after: p1: shard 0 -> 1: freezing its callbacks" in said
    assert "run `dispatcher shards grow` again, then `dispatcher shards rebalance`" in said
