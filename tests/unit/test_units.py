"""The pure pieces, without Redis or a network: retry arithmetic, outcome classification,
signatures, and the doctests of the modules that carry them."""

from __future__ import annotations

import base64
import doctest
import hashlib
import hmac
import random
from types import ModuleType
from typing import Any

import orjson
import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import (
    ClusterDownError,
    DataError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from standardwebhooks import Webhook

from dispatcher import backoff, settings
from dispatcher.backoff import next_delay, parse_retry_after
from dispatcher.connections import transient_reply
from dispatcher.delivery import Outcome, classify
from dispatcher.failover import primary_connection_class
from dispatcher.headers import request_headers, sign
from dispatcher.history.record import AttemptRecord
from dispatcher.history.stream import stream_fields


@pytest.mark.parametrize("module", [backoff, settings])
def test_doctests_hold(module: ModuleType) -> None:
    failed, tried = doctest.testmod(module)
    assert tried > 0 and failed == 0


def test_next_delay_follows_the_schedule_then_stops() -> None:
    schedule = [5, 30, 120]
    assert [next_delay(schedule, n) for n in (1, 2, 3, 4)] == [5.0, 30.0, 120.0, None]
    assert next_delay(schedule, 0) is None
    assert next_delay([], 1) is None


def test_next_delay_jitter_stays_within_its_spread() -> None:
    rng = random.Random(7)
    delays = [next_delay([100], 1, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(d is not None and 80 <= d <= 120 for d in delays)
    assert len({round(d or 0, 6) for d in delays}) > 100  # spread, not constant


def test_retry_after_wins_when_longer_and_is_capped() -> None:
    assert next_delay([5], 1, retry_after=60) == 60.0
    assert next_delay([5], 1, retry_after=2) == 5.0  # shorter than the schedule: ignored
    assert next_delay([5], 1, retry_after=10_000, retry_after_cap=300) == 300.0
    assert next_delay([5], 2, retry_after=60) is None  # no attempts left, whatever it asks


def test_retry_after_as_a_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412510.0) == 0.0
    assert parse_retry_after("not a date") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (200, Outcome.SUCCESS), (204, Outcome.SUCCESS), (299, Outcome.SUCCESS),
        (301, Outcome.FAILED), (302, Outcome.FAILED), (400, Outcome.FAILED),
        (401, Outcome.FAILED), (404, Outcome.FAILED), (408, Outcome.RETRY),
        (410, Outcome.GONE), (429, Outcome.RETRY), (500, Outcome.RETRY),
        (502, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY),
        (101, Outcome.RETRY), (600, Outcome.RETRY), (999, Outcome.RETRY),  # protocol errors
    ],
)  # fmt: skip
def test_classify(code: int, outcome: Outcome) -> None:
    assert classify(code) is outcome
    assert outcome.is_final is (outcome is not Outcome.RETRY)


def test_sign_is_hmac_sha256_over_id_timestamp_body() -> None:
    body = b'{"event":"BUILD_END","data":{}}'
    expected = hmac.new(b"s3cret", b"evt_1.2.1700000000." + body, hashlib.sha256).digest()
    assert (
        sign("evt_1.2", 1700000000, body, "s3cret") == "v1," + base64.b64encode(expected).decode()
    )
    assert sign("evt_1.2", 1700000001, body, "s3cret") != sign("evt_1.2", 1700000000, body,
                                                               "s3cret")  # fmt: skip


def test_signed_headers_verify_with_standard_webhooks() -> None:
    body = b'{"event":"BUILD_END","data":{"n":1}}'
    headers = request_headers(event="BUILD_END", delivery_id="evt_1.2", body=body,
                              token="s3cret", user_agent="t")  # fmt: skip
    webhook = Webhook("whsec_" + base64.b64encode(b"s3cret").decode())
    assert webhook.verify(body, headers) == {"event": "BUILD_END", "data": {"n": 1}}
    unsigned = request_headers(event="BUILD_END", delivery_id="d", body=body, token="",
                               user_agent="t")  # fmt: skip
    assert "webhook-signature" not in unsigned and "X-DEVOPS-WEBHOOK-TOKEN" not in unsigned


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", b"v", 1, 0.5, "é"),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", b"\x00\xff" * 3000, -7, 1e20),
        ("CONFIG GET", "maxmemory"),  # a command name with a space: redis-py splits it
        (b"CLIENT SETNAME", "w"),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    """Our connections pack with hiredis (C): the bytes on the wire are redis-py's."""
    ours = primary_connection_class(Connection)()
    assert b"".join(ours.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_a_value_hiredis_does_not_take_is_refused_as_redis_py_refuses_it() -> None:
    ours = primary_connection_class(Connection)()
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", None)  # type: ignore[arg-type]  # the point


def test_postgresql_history_keeps_each_record_whole() -> None:
    """A record naming its emission's kept body (`history.kept`) goes to PostgreSQL whole:
    its stream entry holds its body and not the name."""
    doc: AttemptRecord = {
        "id": 7, "projectId": "p", "callBackUrl": "http://127.0.0.1:1/h", "events": "BUILD_END",
        "status": "FAILED", "createdTime": 1, "requestBody": "x" * 2_000, "requestBodyOf": "p:e@1",
    }  # fmt: skip
    raw = stream_fields(doc, False)["r"]
    assert isinstance(raw, bytes)
    shipped = orjson.loads(raw)
    assert shipped["requestBody"] == "x" * 2_000 and "requestBodyOf" not in shipped


PIPELINE = "Command # 1 (SET k -BUSY x) of pipeline caused error: "


@pytest.mark.parametrize(
    ("reply", "transient"),
    [
        (ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's …"), True),
        (ResponseError("LOADING Redis is loading the dataset in memory"), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (ResponseError(PIPELINE + "('BUSY Redis is busy running a script.',)"), True),
        (ResponseError("ERR Error running script (call to f_1): @user_script:1: -OOM …"), True),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (ReadOnlyError("You can't write against a read only replica."), True),
        (TryAgainError("Multiple keys request during rehashing of slot"), True),  # type: ignore[no-untyped-call]
        (ClusterDownError("The cluster is down"), True),  # type: ignore[no-untyped-call]
        (ResponseError("BUSYKEY Target key name already exists."), False),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (ResponseError("ERR unknown command 'NOPE'"), False),
        (ResponseError(PIPELINE + "('ERR syntax error',)"), False),  # its command is no reply
        (ConnectionError("refused"), False),  # an outage, not a reply: `REDIS_ERRORS`
    ],
)
def test_a_reply_that_means_not_now_is_told_from_one_that_means_never(
    reply: Exception, transient: bool
) -> None:
    """The producers, the API and the worker's writes share this: what they wait out."""
    assert transient_reply(reply) is transient
