"""Redis through Sentinel, on a real group (a master, a replica, three sentinels): every
front end finds the master by name; an acknowledged emit is on the replica already; a
setting that cannot work stops a process at start-up with a message naming it; a node that
answers as a replica is a lost connection, not an error reply."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import cast

import pytest
import redis as redis_py
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.clock import now_ms
from dispatcher.connections import connect, preflight
from dispatcher.embedded import EmbeddedRedis, SentinelGroup
from dispatcher.errors import InvalidSetting, Unavailable
from dispatcher.failover import NotMaster, NotWritable
from dispatcher.history.ids import ID_BLOCK, ID_GAP, RecordIds
from dispatcher.history.record import AttemptRecord
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys, project_scoped
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.replication import sentinel_replicas
from dispatcher.settings import Settings
from dispatcher.status import live_workers
from tests.helpers import UID, app_client, free_port, make_settings, start_process, stop, until

keys = Keys()  # today's key names (one shard)

EVENTS = "/apigw/v4/projects/demo/events"


@pytest.fixture
def group(sentinel_group: SentinelGroup) -> SentinelGroup:
    sentinel_group.heal()
    return sentinel_group


def on_replica(group: SentinelGroup) -> Redis:
    """A plain client of the (one) replica, to see what it holds."""
    (replica,) = [port for port in group.nodes if port != group.master_port()]
    return Redis(host="127.0.0.1", port=replica, socket_timeout=2)


async def test_an_acknowledged_emit_is_on_the_replica_already(group: SentinelGroup) -> None:
    settings = make_settings(group.url, redis_min_replicas=1, emit_wait=5)
    assert await preflight(settings) == []
    redis, replica = connect(settings), on_replica(group)
    try:
        await redis.flushdb()
        producer = Producer(settings, redis)
        one = await producer.emit("demo", "BUILD_END", {"n": 1})
        many = await producer.emit_many([("demo", "BUILD_END", {"n": n}) for n in range(50)])
        async with app_client(settings, redis) as api:
            answer = await api.post(EVENTS, json={"event": "BUILD_END", "data": {}}, headers=UID)
        routed = answer.json()["data"]["eventId"]
        # no wait: WAIT returned only once the replica had them
        job_ids = [project_scoped("demo", i) for i in [one, *many, routed]]
        held = await replica.mget([keys.arq_job(job_id) for job_id in job_ids])
        assert all(held), f"{held.count(None)} acknowledged jobs missing on the replica"
    finally:
        await redis.aclose()
        await replica.aclose()


async def test_a_callback_change_is_acknowledged_once_the_replica_has_it(
    group: SentinelGroup,
) -> None:
    """DISPATCHER_REDIS_MIN_REPLICAS=1: a deletion answered 200 is on the replica already;
    with the replica paused it is answered 503 (made on the master, not confirmed: it was
    answered 200, and a failover then brought the callback back: review), and done again
    once the replica is back, answered 404 (gone)."""
    settings = make_settings(group.url, redis_min_replicas=1, emit_wait=1)
    redis, replica = connect(settings), on_replica(group)
    (port,) = [p for p in group.nodes if p != group.master_port()]
    base = "/apigw-user/v4/projects/demo/callbacks"
    try:
        await redis.flushdb()
        registry = Registry(redis)
        first, second = [
            (await registry.create("demo", f"https://e.com/{n}", Event.BUILD_END, Region.DEVNET))[0]
            for n in (1, 2)
        ]
        async with app_client(settings, redis) as api:
            deleted = await api.delete(f"{base}/{first}", headers=UID)
            assert deleted.status_code == 200, deleted.text
            assert not await replica.exists(keys.callback(first))  # no wait: confirmed
            group.signal(port, signal.SIGSTOP)
            try:
                refused = await api.delete(f"{base}/{second}", headers=UID)
            finally:
                group.signal(port, signal.SIGCONT)
            assert refused.status_code == 503, refused.text
            assert refused.json()["message"].startswith(
                "the callback is deleted on Redis' master, but only 0 of 1 replicas"
            )
            again = await api.delete(f"{base}/{second}", headers=UID)
        assert again.status_code == 404, again.text
    finally:
        await redis.aclose()
        await replica.aclose()


def test_the_cli_emits_through_the_sentinels(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", group.url)
    monkeypatch.setenv("DISPATCHER_REDIS_MIN_REPLICAS", "1")
    command = ["emit", "--project", "demo", "--event", "BUILD_END", "--event-id", "evt_cli"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0 and "evt_cli" in result.output, result.output
    (replica,) = [port for port in group.nodes if port != group.master_port()]
    with redis_py.Redis(host="127.0.0.1", port=replica, socket_timeout=2) as client:
        assert client.exists(keys.arq_job(project_scoped("demo", "evt_cli")))


def run_cli(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["callbacks", "list", "--project", "p"])
    output = " ".join(result.output.split())  # as the console wrapped it
    assert result.exit_code == 2 and "Traceback" not in output, output
    return output


def test_a_setting_that_cannot_work_stops_a_command_with_its_name(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_master = run_cli(
        monkeypatch, DISPATCHER_REDIS_URL=group.url.replace("/dispatcher/", "/nope/")
    )
    assert "configuration error DISPATCHER_REDIS_URL" in wrong_master
    assert "no sentinel knows a master named 'nope' (they know: 'dispatcher')" in wrong_master

    nobody = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/dispatcher/0"
    unreachable = run_cli(monkeypatch, DISPATCHER_REDIS_URL=nobody)
    assert "DISPATCHER_REDIS_URL: no sentinel answered" in unreachable


def test_sentinels_listing_fewer_replicas_than_wanted_warn_and_the_command_runs(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One replica, two asked for: the command runs and warns (a configuration error, exit
    2, crash-looped every process after a replica's loss, workers too: review)."""
    monkeypatch.setenv("DISPATCHER_REDIS_URL", group.url)
    monkeypatch.setenv("DISPATCHER_REDIS_MIN_REPLICAS", "2")
    result = CliRunner().invoke(app, ["callbacks", "list", "--project", "p"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "DISPATCHER_REDIS_MIN_REPLICAS=2, but only 1 of the 1 replicas" in output, output


def test_replicas_down_are_not_counted_in_the_advice() -> None:
    """A replaced node the sentinels still list, down, is neither advised nor counted:
    with 2 up and a stale third, MIN_REPLICAS=2 gets no warning (it was told to set 3,
    which no group could meet: review)."""
    up = {"is_sdown": False, "is_odown": False, "is_disconnected": False}
    stale = {**up, "is_sdown": True, "is_disconnected": True}
    assert sentinel_replicas("master 'm'", [up, up, stale], 2) == []
    (more,) = sentinel_replicas("master 'm'", [up, up, stale], 1)
    assert "set it to 2 to lose nothing" in more


def test_tls_to_sentinels_that_do_not_take_it_says_tls_was_tried(
    group: SentinelGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rediss+sentinel:// URL to plain sentinels times out connecting: the message says
    TLS was tried (it said "Timeout connecting to server", nothing of TLS: review)."""
    tls = group.url.replace("redis+sentinel://", "rediss+sentinel://")
    output = run_cli(monkeypatch, DISPATCHER_REDIS_URL=tls, DISPATCHER_REDIS_TIMEOUT="0.3")
    assert (
        "configuration error DISPATCHER_REDIS_URL: no sentinel answered over TLS "
        "(rediss+sentinel://: do the sentinels take TLS? redis+sentinel:// is without)"
    ) in output, output


def test_the_sentinels_own_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sentinels with a `requirepass`: DISPATCHER_REDIS_SENTINEL_PASSWORD right, a command
    works; unset or wrong, it stops (exit 2) naming the setting, never showing it."""
    group = SentinelGroup(tmp_path, sentinel_password="sentinels-pw")
    group.start()
    try:
        monkeypatch.setenv("DISPATCHER_REDIS_URL", group.url)
        monkeypatch.setenv("DISPATCHER_REDIS_TIMEOUT", "1")
        monkeypatch.setenv("DISPATCHER_REDIS_SENTINEL_PASSWORD", "sentinels-pw")
        command = ["emit", "--project", "demo", "--event", "BUILD_END", "--event-id", "evt_pw"]
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0 and "evt_pw" in result.output, result.output
        monkeypatch.delenv("DISPATCHER_REDIS_SENTINEL_PASSWORD")
        unset = run_cli(monkeypatch)
        assert (
            "configuration error DISPATCHER_REDIS_SENTINEL_PASSWORD: every sentinel asks for a "
            "password, and DISPATCHER_REDIS_SENTINEL_PASSWORD is not set"
        ) in unset, unset
        wrong = run_cli(monkeypatch, DISPATCHER_REDIS_SENTINEL_PASSWORD="not-it")
        assert (
            "configuration error DISPATCHER_REDIS_SENTINEL_PASSWORD: every sentinel asks for a "
            "password, and DISPATCHER_REDIS_SENTINEL_PASSWORD is refused"
        ) in wrong, wrong
        assert "not-it" not in wrong and "sentinels-pw" not in unset + wrong
    finally:
        group.stop()


async def test_an_evicting_replica_stops_a_process_before_a_failover_promotes_it(
    group: SentinelGroup,
) -> None:
    """The start-up check asks each replica the sentinels list, not only today's master: a
    failover would make an evicting replica the master, dropping queued events when full.
    A replica the sentinels hold down is a warning naming it."""
    settings = make_settings(group.url)
    (port,) = [port for port in group.nodes if port != group.master_port()]
    replica = on_replica(group)
    try:
        await replica.config_set("maxmemory", "1gb")
        await replica.config_set("maxmemory-policy", "volatile-lru")
        with pytest.raises(InvalidSetting, match="maxmemory-policy volatile-lru") as caught:
            await preflight(settings)
        assert caught.value.param == "maxmemory-policy"
        assert f"(its replica 127.0.0.1:{port}, which a failover promotes)" in str(caught.value)
        await replica.config_set("maxmemory-policy", "noeviction")
        assert await preflight(settings) == []
    finally:
        await replica.config_set("maxmemory", "0")
        await replica.aclose()
    group.signal(port, signal.SIGSTOP)
    try:  # not answering, then (down-after-milliseconds later) held down by the sentinels
        quick = settings.model_copy(update={"redis_timeout": 0.3})
        seen = [await preflight(quick)]
        while "is down" not in seen[-1][0] and len(seen) < 20:
            seen.append(await preflight(quick))
    finally:
        group.signal(port, signal.SIGCONT)
    for (warning,) in seen:
        assert f"replica 127.0.0.1:{port} of master 'dispatcher'" in warning, warning
        assert warning.endswith("its maxmemory-policy not checked"), warning
    assert "did not answer INFO" in seen[0][0] and "is down" in seen[-1][0], seen


async def test_a_plain_url_to_a_replica_is_a_lost_connection(group: SentinelGroup) -> None:
    """READONLY (a failover demoted the node a managed Redis' DNS name still points at)
    drops the connection, so the next one can reach the master."""
    (replica,) = [port for port in group.nodes if port != group.master_port()]
    redis = connect(make_settings(f"redis://127.0.0.1:{replica}/0", redis_timeout=1))
    try:
        with pytest.raises(NotMaster, match=r"is not the master now \(READONLY"):
            await redis.set("k", "v")
        with pytest.raises(NotMaster, match="READONLY"):  # a script's write (Redis 6 wraps it)
            await redis.eval("return redis.call('SET', KEYS[1], 'v')", 1, "k")  # type: ignore[misc]
        assert await redis.ping()  # reads still work: it is a lost connection, not a dead one
    finally:
        await redis.aclose()


async def test_masterdown_and_noreplicas_are_outages_not_errors(tmp_path: Path) -> None:
    """A node short of the replicas its `min-replicas-to-write` asks for, or a replica
    whose master is away: callers wait them out like an outage (503, writes that wait)."""
    with EmbeddedRedis(tmp_path, persist=False) as server:
        redis = connect(make_settings(server.url, redis_timeout=1))
        try:
            await redis.config_set("min-replicas-to-write", "1")
            with pytest.raises(NotWritable, match="NOREPLICAS"):
                await redis.set("k", "v")
            with pytest.raises(NotWritable, match="NOREPLICAS"):
                await redis.eval("return redis.call('SET', KEYS[1], 'v')", 1, "k")  # type: ignore[misc]
            await redis.config_set("replica-serve-stale-data", "no")
            await redis.replicaof("127.0.0.1", str(free_port()))  # a master that is not there
            with pytest.raises(NotMaster, match="MASTERDOWN"):
                await redis.get("k")
        finally:
            await redis.aclose()


async def test_without_the_replicas_it_asks_for_an_emit_answers_503(
    redis: Redis, settings: Settings
) -> None:
    """The session's Redis has no replica: with DISPATCHER_REDIS_MIN_REPLICAS=1 a process
    starts with a warning, and an emit (Python, both routes, redelivery) is refused within
    the bound, saying that emitting again is safe."""
    strict = settings.model_copy(update={"redis_min_replicas": 1, "emit_wait": 0.5})
    assert await preflight(strict) == [
        "DISPATCHER_REDIS_MIN_REPLICAS=1, but the Redis of DISPATCHER_REDIS_URL has 0 "
        "replica(s) connected: emits are refused (503) until enough connect"
    ]
    with pytest.raises(Unavailable, match=r"0 of 1 replicas .* same event ids is safe"):
        await Producer(strict, redis).emit("demo", "BUILD_END", {}, event_id="e1")
    now = now_ms()
    callback_id, _ = await Registry(redis).create(
        "demo", "https://e.com/h", Event.BUILD_END, Region.DEVNET
    )  # enabled: its record's redelivery is not refused for a callback gone
    record_id = await RedisHistory(redis, settings, keys).add(
        {
            "projectId": "demo",
            "callBackUrl": "https://e.com/h",
            "events": "BUILD_END",
            "status": "FAILED",
            "startTime": now,
            "endTime": now,
            "createdTime": now,
            "callbackId": callback_id,
            "deliveryId": f"e0.{callback_id}",
            "eventId": "e0",
        }
    )
    async with app_client(strict, redis) as api:
        started = time.monotonic()
        single = await api.post(EVENTS, json={"event": "BUILD_END", "eventId": "e2"}, headers=UID)
        batch = await api.post(f"{EVENTS}/batch", json=[{"event": "BUILD_END"}], headers=UID)
        retry = await api.post(
            f"/ms/openapi/api/apigw/v3/projects/demo/callbacks/history/{record_id}/retry",
            headers=UID,
        )
        took = time.monotonic() - started
    for answer in (single, batch):
        body = answer.json()
        assert answer.status_code == 503 and body["status"] == 503, body
        assert "DISPATCHER_REDIS_MIN_REPLICAS" in body["message"]
        assert "same event ids is safe" in body["message"]
    message = retry.json()["message"]  # a redelivery is waited out too, and says what it is
    assert retry.status_code == 503 and "the redeliveries are queued on Redis' master" in message
    assert "look at the delivery's attempts first" in message
    assert took < 3 * 1.0  # each within DISPATCHER_EMIT_WAIT (0.5 s) and a round trip


async def test_a_plain_urls_master_short_of_replicas_starts_every_process_with_a_warning(
    tmp_path: Path,
) -> None:
    """A plain URL whose master has fewer replicas than DISPATCHER_REDIS_MIN_REPLICAS now (a
    managed Redis' new primary, minutes after its failover): a worker starts, and takes
    jobs (its writes wait for no replica), saying why emits are refused meanwhile. It
    stopped every process (exit 2), workers included: pods restarted then crash-looped
    (review)."""
    log = tmp_path / "worker.log"
    with EmbeddedRedis(tmp_path / "redis", persist=False) as server:
        worker = start_process(["worker"], server.url, log, DISPATCHER_REDIS_MIN_REPLICAS="1")
        redis = connect(make_settings(server.url))

        async def up() -> bool:
            assert worker.poll() is None, f"the worker stopped: {log.read_text()}"
            return len(await live_workers(redis, keys)) == 1

        try:
            await until(up, 40, "the worker up")
        finally:
            stop(worker)
            await redis.aclose()
    said = " ".join(log.read_text().split())  # as the console wrapped it
    assert "warning: DISPATCHER_REDIS_MIN_REPLICAS=1, but the Redis of" in said, said
    assert "emits are refused (503) until enough connect" in said, said


async def test_record_ids_skip_ahead_on_a_server_that_did_not_hand_out_the_last_block(
    redis: Redis,
) -> None:
    """A promoted replica (or a restarted server) may lack the last blocks of ids handed
    out: its first block starts `ID_GAP` further on, so no id is handed out twice."""
    fresh = [cast(AttemptRecord, {})]
    await RecordIds(redis, keys).assign(fresh)
    assert fresh[0]["id"] == 1  # a fresh Redis starts at 1
    same_server = [cast(AttemptRecord, {})]
    await RecordIds(redis, keys).assign(same_server)
    assert same_server[0]["id"] == ID_BLOCK + 1
    await redis.set(keys.HISTORY_SEQ_SERVER, "another-server")  # as a failover leaves it
    promoted = [cast(AttemptRecord, {})]
    await RecordIds(redis, keys).assign(promoted)
    assert promoted[0]["id"] == 2 * ID_BLOCK + ID_GAP + 1


def test_a_group_whose_ports_were_taken_meanwhile_starts_on_others(tmp_path: Path) -> None:
    """Free ports are picked when the group is made and used when it starts: another
    process may take one in between (tests running side by side). The group then starts
    that node or sentinel on another free port."""
    group = SentinelGroup(tmp_path / "group", replicas=0)
    taken = [group.first_master, next(iter(group.sentinels))]
    squatters = []
    for port in taken:
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        squatters.append(squatter)
    try:
        url = group.start()
        assert group.first_master not in taken
        assert not set(taken) & set(group.sentinels)
        assert redis_py.Redis(port=group.first_master).ping()
        assert url == group.url
    finally:
        group.stop()
        for squatter in squatters:
            squatter.close()
