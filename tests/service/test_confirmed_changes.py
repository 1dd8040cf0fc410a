"""Callback changes a front end acknowledges (API, CLI; the console shares their `Services`)
wait for the replicas `DISPATCHER_REDIS_MIN_REPLICAS` asks for, as emits do: short of them
(the session's Redis has none), a 503 in the seeds' envelope says the change was made on
the master, not confirmed, and whether doing it again is safe. A rotation done again to the
token in use changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from dispatcher.cli import app
from dispatcher.connections import connect
from dispatcher.embedded import EmbeddedRedis
from dispatcher.errors import NotFound
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from dispatcher.tokens import TokenCipher
from tests.helpers import UID, app_client, make_settings

keys = Keys()  # today's key names (one shard)

BASE = "/apigw-user/v4/projects/demo/callbacks"
UNCONFIRMED = (
    "on Redis' master, but only 0 of 1 replicas (DISPATCHER_REDIS_MIN_REPLICAS) confirmed the "
    "write within 250 ms, so a failover now would undo it: not confirmed; "
)


async def test_a_change_no_replica_confirms_answers_503_saying_it_was_made_and_to_repeat(
    redis: Redis, settings: Settings
) -> None:
    strict = settings.model_copy(update={"redis_min_replicas": 1, "emit_wait": 0.5})
    registry = Registry(redis)
    kept, _ = await registry.create("demo", "https://e.com/a", Event.BUILD_END, Region.DEVNET, "t1")
    gone, _ = await registry.create("demo", "https://e.com/b", Event.BUILD_END, Region.DEVNET)
    new = {"event": "BUILD_END", "region": "DEVNET", "url": "https://e.com/c"}
    async with app_client(strict, redis) as api:
        answers = {
            "registered": await api.post(BASE, params=new, headers=UID),
            "rotated": await api.post(
                f"{BASE}/{kept}/secret", params={"secretToken": "t2"}, headers=UID
            ),
            "disabled": await api.put(f"{BASE}/{kept}/disable", headers=UID),
            "enabled": await api.put(f"{BASE}/{kept}/enable", headers=UID),
            "deleted": await api.delete(f"{BASE}/{gone}", headers=UID),
        }
        # done again, gone already on the master: still unconfirmed, so no 404 yet (it
        # answered 404 at once, "gone", nothing confirmed: review)
        answers["deleted again"] = await api.delete(f"{BASE}/{gone}", headers=UID)
    said = {
        "registered": "the callback is registered " + UNCONFIRMED + "register it again once "
        "they are back (safe: a registration is an upsert, made once)",
        "rotated": "the new token is set " + UNCONFIRMED + "rotate to the same token again "
        "once they are back (safe: a rotation to the token the callback holds already "
        "changes nothing, the old token's overlap kept)",
        "disabled": "the callback is disabled " + UNCONFIRMED + "disable it again once they "
        "are back (safe)",
        "enabled": "the callback is enabled " + UNCONFIRMED + "enable it again once they are "
        "back (safe)",
        "deleted": "the callback is deleted " + UNCONFIRMED + "delete it again once they are "
        "back (safe: a 404 then says it is gone)",
    }
    said["deleted again"] = said["deleted"]
    for what, answer in answers.items():
        assert answer.status_code == 503, (what, answer.text)
        assert answer.json() == {"data": None, "message": said[what], "status": 503}
    # each was made on the master all the same
    target = await registry.target(kept)
    assert target is not None and target.secret_token == "t2"
    assert len(await registry.match("demo", "BUILD_END")) == 2  # kept and the new one
    with pytest.raises(NotFound):
        await registry.get(gone, "demo")


@pytest.fixture
def cli(redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", redis_server.url)
    monkeypatch.setenv("DISPATCHER_REDIS_MIN_REPLICAS", "1")
    monkeypatch.setenv("DISPATCHER_EMIT_WAIT", "0.5")
    yield CliRunner()


def test_the_cli_says_a_change_no_replica_confirmed_was_made_and_to_repeat(
    cli: CliRunner, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def registered() -> int:
        redis = connect(make_settings(redis_server.url))
        try:
            await redis.flushdb()
            callback_id, _ = await Registry(redis).create(
                "demo", "https://e.com/a", Event.BUILD_END, Region.DEVNET, "t1"
            )
            return callback_id
        finally:
            await redis.aclose()

    callback_id = asyncio.run(registered())
    removed = cli.invoke(app, ["callbacks", "rm", str(callback_id), "--project", "demo"])
    output = " ".join(removed.output.split())  # as the console wrapped it
    assert removed.exit_code == 1, output
    assert "error: the callback is deleted " + UNCONFIRMED + "delete it again" in output
    monkeypatch.setenv("DISPATCHER_TOKEN_KEYS", TokenCipher.new_key())
    rotated = cli.invoke(app, ["tokens", "rotate"])
    output = " ".join(rotated.output.split())
    assert rotated.exit_code == 1, output
    assert "error: the secrets are re-encrypted " + UNCONFIRMED + "keep the old key" in output


async def test_a_rotation_to_the_token_in_use_changes_nothing(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    """A rotation repeated (its answer lost, or a 503 that said to) keeps the old token
    signing until the first one's overlap ends: it made the new token the previous one as
    well, and the old one stopped signing at once. With `overlapHours=0` it ends the
    overlap, as any rotation does."""
    callback_id, _ = await Registry(redis).create(
        "demo", "https://e.com/a", Event.BUILD_END, Region.DEVNET, "old-token"
    )
    secret = f"{BASE}/{callback_id}/secret"
    first = await api.post(secret, params={"secretToken": "new-token"}, headers=UID)
    again = await api.post(secret, params={"secretToken": "new-token"}, headers=UID)
    assert first.status_code == again.status_code == 200, again.text
    end = first.json()["data"]["rotationEndTime"]
    assert end is not None and again.json()["data"]["rotationEndTime"] == end
    target = await Registry(redis).target(callback_id)
    assert target is not None
    assert (target.secret_token, target.previous_token) == ("new-token", "old-token")
    ended = await api.post(
        secret, params={"secretToken": "new-token", "overlapHours": 0}, headers=UID
    )
    assert ended.status_code == 200 and ended.json()["data"]["rotationEndTime"] is None
