"""What a hostile receiver answers ends as a bounded, recorded attempt that leaks nothing and
holds up no one else. Real Redis, real burst workers, real receivers on 127.0.0.1 (raw
sockets where aiohttp's server would not say what is wanted)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dispatcher import masking
from dispatcher.clock import now_ms
from dispatcher.history.redis import RedisHistory
from dispatcher.keys import Keys
from dispatcher.masking import WITHHELD
from dispatcher.models import Event, HistoryRecord, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import Receiver, RunWorker, compiling_costs, until

keys = Keys()  # today's key names (one shard)
PROJECT = "X-DEVOPS-PROJECT-ID"


async def records(
    redis: Redis, settings: Settings, url: str, project: str = "demo"
) -> list[HistoryRecord]:
    now = now_ms()
    page = await RedisHistory(redis, settings, keys).query(
        project, url, "BUILD_END", start_ms=now - 60_000, end_ms=now + 60_000, page_size=100
    )
    return list(reversed(page.records))  # oldest first


async def recorded(redis: Redis, settings: Settings, url: str, project: str) -> bool:
    return bool(await records(redis, settings, url, project))


# ---- a raw-socket receiver ------------------------------------------------------------

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
LONG = b"Z" * 7000 + b"\n\x1b[31m" + b"Z" * 100
BAD_ANSWERS = {  # what aiohttp refuses, quoting it (8 KB of it) in its error's message
    "/status-line": b"HTTP/1.1 2OO " + LONG + b"\r\n\r\n",
    "/header": b"HTTP/1.1 200 OK\r\nX\x00" + LONG + b": 1\r\n\r\n",
    "/chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + LONG + b"\r\n\r\n",
    "/cut-short": b"HTTP/1.1 503 X\r\nContent-Length: 100000\r\n\r\n" + LONG,
}
CLOSE = b"Content-Length: 0\r\nConnection: close"
BARE_101 = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"  # no Upgrade: aiohttp keeps it alive
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@dataclass
class RawReceiver:
    """Answers each connection's request by its path: `/endless` with 103 Early Hints for
    ever (never a status), `/hints-N` with N of them and then a 200 (the connection then
    closed), `/status-N` with status N and no body, `/echo-status` with a bad status line
    quoting its token, a path of `BAD_ANSWERS` with its answer. `events` tells, in
    order, each connection's request (`open /path`) and its end (`closed /path`: the peer
    closed or reset it). `/bare-101` answers a 101 with no `Upgrade` and then takes
    whatever else comes on the connection as the switched protocol (`after /bare-101 …`:
    what came); `/cut-head` sends a status line and a header quoting the token, then
    closes."""

    base: str = ""
    events: list[str] = field(default_factory=list)

    def of(self, path: str) -> list[str]:
        return [event.split()[0] for event in self.events if event.split()[1] == path]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = "?"
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.events.append(f"open {path}")
            if path == "/bare-101":
                await self.switch(head, reader, writer)
                return
            if path == "/echo-status":  # the token quoted in a status line aiohttp refuses
                token = head.partition(b"X-DEVOPS-WEBHOOK-TOKEN: ")[2].partition(b"\r")[0]
                writer.write(b"HTTP/1.1 2OO " + token + b"\r\n\r\n")
                await writer.drain()
                return
            if path == "/cut-head":
                self.cut(head, writer)
                return
            if path in BAD_ANSWERS:
                writer.write(BAD_ANSWERS[path])
                await writer.drain()
                return
            if path.startswith("/status-"):
                status = path.removeprefix("/status-").encode()
                framing = b"Upgrade: x\r\nConnection: Upgrade" if status == b"101" else CLOSE
                writer.write(b"HTTP/1.1 " + status + b" X\r\n" + framing + b"\r\n\r\n")
                await writer.drain()
                return
            if path.startswith("/hints-"):
                writer.write(EARLY_HINTS * int(path.removeprefix("/hints-")) + OK)
                await writer.drain()
                return
            while True:  # as fast as the peer reads, for ever
                writer.write(EARLY_HINTS * 1000)
                await writer.drain()
                await asyncio.sleep(0)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.events.append(f"closed {path}")
            writer.close()

    def cut(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        token = head.partition(b"X-DEVOPS-WEBHOOK-TOKEN: ")[2].partition(b"\r")[0]
        writer.write(b"HTTP/1.1 200 OK\r\nX-Echo: " + token + b"\r\nX-Note: see evil.example\r\n")

    async def switch(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(int(head.partition(b"Content-Length: ")[2].partition(b"\r")[0]))
        writer.write(BARE_101)
        await writer.drain()
        with contextlib.suppress(TimeoutError):  # until the peer closes, or 5 s
            while data := await asyncio.wait_for(reader.read(65536), 5):
                self.events.append(f"after /bare-101 {data[:200]!r}")


@asynccontextmanager
async def raw_receiver() -> AsyncIterator[RawReceiver]:
    receiver = RawReceiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield receiver
        server.close()


# ---- informational answers --------------------------------------------------------------


async def test_endless_informational_answers_end_the_attempt_at_the_cap(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """aiohttp skips 1xx answers one after another with no cap, without yielding while they
    are buffered: a receiver streaming `103 Early Hints` held the worker's loop (every
    project's deliveries) at 100% CPU, its memory growing, until the total timeout."""
    settings = settings.model_copy(update={"retry_schedule": (0.05,)})
    cap = "the receiver sent more than 8 informational (1xx) answers"
    async with raw_receiver() as hostile:
        urls = [hostile.base + path for path in ("/endless", "/hints-8", "/hints-9")]
        for url in [*urls, receiver.url()]:
            await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
        endless, eight, nine = [await records(redis, settings, url) for url in urls]

    for attempts in (endless, nine):  # retried like any protocol error, each saying why
        assert [(r.status.value, r.response_code, r.final) for r in attempts] == [
            ("FAILED", None, False),
            ("FAILED", None, True),
        ]
        assert all(cap in (r.error_msg or "") for r in attempts), attempts
    [fine] = eight  # 8 informational answers, then the status: as usual
    assert (fine.status.value, fine.response_code, fine.response_body) == ("SUCCESS", 200, "ok")
    [other] = await records(redis, settings, receiver.url())
    assert other.status.value == "SUCCESS"
    # each attempt on a connection of its own, closed by the worker before the next opened
    assert hostile.of("/endless") == hostile.of("/hints-9") == ["open", "closed"] * 2


# ---- cookies ----------------------------------------------------------------------------


async def test_a_cookie_a_receiver_sets_rides_on_no_later_request(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The region's client kept one cookie jar for every project: a cookie set in an answer
    to projA's delivery went with projB's deliveries to that host (`Domain=` a parent
    domain: to its other hosts too), and no record showed it. Here every answer sets one,
    each project's first is a 503, and projB's is given once projA's answer is recorded:
    each retry follows both projects' cookies."""
    url = receiver.url().replace("127.0.0.1", "localhost")  # a name: the jar took no address's

    async def hook(request: web.Request) -> web.StreamResponse:
        project = request.headers[PROJECT]
        first = [seen.headers[PROJECT] for seen in receiver.requests()].count(project) == 1
        if project == "projB" and first:
            await until(lambda: recorded(redis, settings, url, "projA"), 5, "projA's record")
        answered = web.Response(status=503 if first else 200, text="ok")
        answered.set_cookie("session", f"{project}-session", max_age=86400)
        return answered

    receiver.script("/hook", hook)
    for project in ("projA", "projB"):
        await Registry(redis).create(project, url, Event.BUILD_END, Region.DEVNET)
    producer = Producer(settings, redis)
    for project in ("projA", "projB"):
        await producer.emit(project, "BUILD_END", {})
    await run_worker()

    seen = receiver.requests()
    assert sorted(s.headers[PROJECT] for s in seen) == ["projA", "projA", "projB", "projB"]
    assert [s.headers.get("Cookie") for s in seen] == [None] * 4
    for project in ("projA", "projB"):
        attempts = await records(redis, settings, url, project)
        assert [r.response_code for r in attempts] == [503, 200]


# ---- what a receiver echoes -------------------------------------------------------------

OLD_TOKEN, NEW_TOKEN = "old-secret-token-1", 'new-"secret"-token-2'  # `"`: JSON escapes it
BEARER = "bearer-credential-3"


async def test_secrets_a_receiver_echoes_are_masked_in_the_record(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """A receiver echoing its request (httpbin, a debug page, "401 invalid Bearer …") put
    the callback's token, the previous one during a rotation, its auth header's value and
    the signatures into the record's responseBody, which every member reads; a bad status
    line quoting the token put it in errorMsg. They are masked now, as the headers are (an
    error text no longer quotes an answer at all, and is masked all the same)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        signatures = request.headers["webhook-signature"].split()
        said = {
            "headers": dict(request.headers),
            "signatures": signatures,
            "macs": [signature.partition(",")[2] for signature in signatures],
            "error": f"invalid Bearer {BEARER}; expected token {OLD_TOKEN}",
        }
        return web.json_response(said, status=401)

    url = receiver.script("/echo", echo)
    async with raw_receiver() as hostile:
        bad_status = hostile.base + "/echo-status"
        registry = Registry(redis)
        for target in (url, bad_status):
            callback_id, _ = await registry.create(
                "demo", target, Event.BUILD_END, Region.DEVNET, OLD_TOKEN,
                auth_header=("Authorization", f"Bearer {BEARER}"),
            )  # fmt: skip
            await registry.rotate_secret(callback_id, "demo", NEW_TOKEN, 3600)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker()
        [echoed] = await records(redis, settings, url)
        quoted = await records(redis, settings, bad_status)  # retried: no answer came

    [seen] = receiver.requests("/echo")
    sent = seen.headers["webhook-signature"]
    assert seen.headers["X-DEVOPS-WEBHOOK-TOKEN"] == NEW_TOKEN and len(sent.split()) == 2
    secrets = [OLD_TOKEN, NEW_TOKEN, BEARER, sent, *(s.partition(",")[2] for s in sent.split())]
    body = echoed.response_body or ""
    assert echoed.response_code == 401 and body.count("******") >= 7, body
    assert '"invalid ******; expected token ******"' in body  # the rest as it came
    assert '"Content-Type": "application/json"' in body
    assert not [s for s in secrets if s in body or s.replace('"', '\\"') in body], body
    errors = [record.error_msg or "" for record in quoted]
    assert len(errors) == settings.max_attempts and all("BadStatusLine" in e for e in errors)
    assert not [s for s in secrets for e in errors if s in e], errors


ESCAPED_TOKEN = "tok-0123456789abcdefXYZ/+&<>'\"=end"  # a character of each kind escaped
CREDENTIAL = "cred/0123456789+abcdef=="  # base64, as a MAC is: `/` and `+`


def php(said: dict[str, str]) -> str:  # json_encode: `/` as `\\/`
    return json.dumps(said).replace("/", "\\/")


def go(said: dict[str, str]) -> str:  # encoding/json: `&<>` as `\\u0026`, `\\u003c`, `\\u003e`
    escaped = json.dumps(said).replace("&", "\\u0026")
    return escaped.replace("<", "\\u003c").replace(">", "\\u003e")


def page(said: dict[str, str]) -> str:  # a debug page's HTML
    return "".join(f"<dt>{html.escape(k)}<dd>{html.escape(v)}" for k, v in said.items())


ENCODERS = {"/php": php, "/go": go, "/html": page}


async def test_secrets_a_receiver_echoes_escaped_are_masked_in_the_record(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver's framework escapes what it echoes: PHP writes `/` as `\\/`, Go `&<>` as
    `\\u0026`…, an HTML page `"` as `&quot;`. Only JSON's `\\"` and `\\\\` were looked for,
    so the token, the auth header's value and the signature went to the record in clear.
    (What is masked, not its budget: on a loaded machine a body was once withheld whole.)"""
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))

    def echo(encode: Callable[[dict[str, str]], str]) -> Callable[[web.Request], Any]:
        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(status=401, text=encode(dict(request.headers)))

        return answer

    urls = {path: receiver.script(path, echo(encode)) for path, encode in ENCODERS.items()}
    for url in urls.values():
        await Registry(redis).create(
            "demo", url, Event.BUILD_END, Region.DEVNET, ESCAPED_TOKEN,
            auth_header=("Authorization", f"Bearer {CREDENTIAL}"),
        )  # fmt: skip
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()

    for path, url in urls.items():
        [seen] = receiver.requests(path)
        signature = seen.headers["webhook-signature"]
        secrets = [ESCAPED_TOKEN, f"Bearer {CREDENTIAL}", CREDENTIAL, signature, signature[3:]]
        [record] = await records(redis, settings, url)
        body = record.response_body or ""
        # JSON still (the masks are inside its strings), and the HTML page, read back
        read = html.unescape(body) if path == "/html" else " ".join(json.loads(body).values())
        assert not [secret for secret in secrets if secret in read], body
        assert read.count("******") == 3 and "BUILD_END" in read, body


async def test_secrets_a_receiver_echoes_url_encoded_are_masked_on_the_attempt_page(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    api: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver answering with what it got as a query (`token=tok%2Fen%2Bvalue%3D%3D`,
    the auth header's value with `+` for its space) showed both to every member on the
    attempt's page and in the history API: a secret's URL-encoded forms were not looked
    for (review). (What is masked, not its budget, as above.)"""
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))
    token, bearer = "tok/en+value==", "Bearer abc/def+ghi=="

    async def echo(request: web.Request) -> web.StreamResponse:
        said = {"token": request.headers["X-DEVOPS-WEBHOOK-TOKEN"]}
        said |= {"auth": request.headers["Authorization"]}
        return web.Response(status=401, text="rejected: " + urlencode(said))

    url = receiver.script("/hook", echo)
    await Registry(redis).create(
        "demo", url, Event.BUILD_END, Region.DEVNET, token, auth_header=("Authorization", bearer)
    )
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()
    [record] = await records(redis, settings, url)
    assert record.response_body == "rejected: token=******&auth=******"
    page = await api.get(f"/console/projects/demo/history/{record.id}")
    assert page.status_code == 200 and "rejected: token=******&amp;auth=******" in page.text
    for secret in (token, bearer, "abc/def+ghi=="):
        assert quote(secret, safe="") not in page.text and secret not in page.text


async def test_a_secret_across_the_read_limit_is_masked_whole(
    settings: Settings, redis: Redis, receiver: Receiver, run_worker: RunWorker
) -> None:
    """The body was cut to the read limit, then masked: a secret across the cut kept its
    start, so a member choosing the size of a payload the receiver echoes read the token
    but its last character. Here the cut falls inside the token as sent, and inside its
    `\\/` as PHP writes it."""
    limit = settings.max_response_body
    escaped = ESCAPED_TOKEN.replace("/", "\\/")
    padding = {"/plain": limit - 11, "/php": limit - escaped.index("/")}  # the cut's place

    def echo(path: str) -> Callable[[web.Request], Any]:
        async def answer(request: web.Request) -> web.StreamResponse:
            token = request.headers["X-DEVOPS-WEBHOOK-TOKEN"]
            token = token.replace("/", "\\/") if path == "/php" else token
            return web.Response(status=401, text="x" * padding[path] + token + " and more")

        return answer

    urls = {path: receiver.script(path, echo(path)) for path in padding}
    for url in urls.values():
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, ESCAPED_TOKEN)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker()

    for path, url in urls.items():
        [record] = await records(redis, settings, url)
        body = record.response_body or ""
        kept = body.removesuffix(f"... [truncated at {limit} bytes]")
        assert kept != body and kept.startswith("x" * padding[path] + "******"), body[-80:]
        assert "tok-" not in kept, body[-80:]


FLOODED_TOKEN = "a&" * 6 + "Zq8Zq8Zq8Zq8"  # each `a&amp;` a match's start, as far as `Zq8`
FLOODED_CREDENTIAL = "a<" * 6 + "Yw7Yw7Yw7Yw7"


async def test_an_answer_that_masking_would_take_too_long_on_is_withheld(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A project chooses its secrets and its receiver the text: one made to match their
    patterns almost everywhere took ~25 ms of the worker's loop an attempt on 20 KB and
    ~50 ms past the read limit, every other project's deliveries waiting (review). An
    attempt's masking now has a budget of the loop's time (`masking.MASKING_CPU`, 5 ms;
    made nothing here, so that any scan is past it): past it the answer is withheld whole,
    and no secret the attempt sent is anywhere in its record."""
    monkeypatch.setattr(masking, "MASKING_CPU", 0.0)
    settings = settings.model_copy(update={"retry_schedule": ()})
    limit = settings.max_response_body
    floods = {"/flood": limit // 12, "/flood-past-limit": limit // 5}  # `a&amp;`: 6 bytes

    def echo(path: str) -> Callable[[web.Request], Any]:
        async def answer(request: web.Request) -> web.StreamResponse:
            said = [
                html.escape(request.headers[name])
                for name in ("X-DEVOPS-WEBHOOK-TOKEN", "Authorization")
            ] + [php({"s": request.headers["webhook-signature"]})]
            return web.Response(status=401, text=" ".join(said) + " " + "a&amp;" * floods[path])

        return answer

    urls = {path: receiver.script(path, echo(path)) for path in floods}
    for url in urls.values():
        await Registry(redis).create(
            "demo", url, Event.BUILD_END, Region.DEVNET, FLOODED_TOKEN,
            auth_header=("Authorization", f"Bearer {FLOODED_CREDENTIAL}"),
        )  # fmt: skip
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)

    for path, url in urls.items():
        [seen] = receiver.requests(path)
        signature = seen.headers["webhook-signature"]
        secrets = [FLOODED_TOKEN, FLOODED_CREDENTIAL, signature, signature[3:]]
        [record] = await records(redis, settings, url)
        cut = f"... [truncated at {limit} bytes]" if path == "/flood-past-limit" else ""
        assert record.response_code == 401 and record.response_body == WITHHELD + cut
        stored = record.model_dump_json()
        forms = [html.escape(s) for s in secrets] + [json.dumps(s)[1:-1] for s in secrets]
        forms += [form.replace("/", "\\/") for form in forms]  # as PHP's JSON
        assert not [s for s in secrets + forms if s in stored], stored


async def test_a_patterns_compiling_counts_in_the_budget_of_a_short_answer(
    settings: Settings,
    redis: Redis,
    receiver: Receiver,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A secret found escaped is masked by its pattern, compiled first (~2.5 ms for one of
    4,096 characters, new for each secret a project chooses), and the budget was looked at
    before the compiling only: an answer of one window (4,096 characters) was then masked
    in one `sub`, whatever the compiling took (review). The worker's clock here goes 6 ms
    on at each compiling, past the budget: the answer is withheld, the token nowhere."""
    compiling_costs(monkeypatch, 0.006)
    settings = settings.model_copy(update={"retry_schedule": ()})

    async def echo(request: web.Request) -> web.Response:
        said = html.escape(request.headers["X-DEVOPS-WEBHOOK-TOKEN"])
        return web.Response(status=401, text=f"invalid token {said}")

    url = receiver.script("/compiling", echo)
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, FLOODED_TOKEN)
    await Producer(settings, redis).emit("demo", "BUILD_END", {})
    await run_worker(settings)

    [record] = await records(redis, settings, url)
    assert record.response_code == 401 and record.response_body == WITHHELD, record
    stored = record.model_dump_json()
    assert FLOODED_TOKEN not in stored and html.escape(FLOODED_TOKEN) not in stored


# ---- error texts ------------------------------------------------------------------------


async def test_an_answer_the_client_refuses_is_recorded_in_a_short_line_of_our_own(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """aiohttp's message for a bad status line, header or chunk quotes what it choked on:
    `HTTP/1.1 2OO ` and 7,000 characters gave a 7,147-character errorMsg with line breaks,
    in the record, the log line, the callback's lastError and a disable reason. Now the
    error's type, a fixed reason and the parser's name for what was wrong."""
    settings = settings.model_copy(update={"retry_schedule": ()})
    async with raw_receiver() as hostile:
        for path in BAD_ANSWERS:
            await Registry(redis).create(
                "demo", hostile.base + path, Event.BUILD_END, Region.DEVNET
            )
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
        got = {path: await records(redis, settings, hostile.base + path) for path in BAD_ANSWERS}

    said = {
        path: [(r.response_code, r.error_msg) for r in attempts] for path, attempts in got.items()
    }
    not_http = "ClientResponseError: the answer is not HTTP the client accepts"
    assert said == {
        "/status-line": [(None, f"{not_http} (BadStatusLine)")],
        "/header": [(None, f"{not_http} (BadHttpMessage)")],
        "/chunk": [(None, f"{not_http} (BadHttpMessage)")],
        "/cut-short": [
            (503, "ClientPayloadError: the answer's body is cut short or malformed "
             "(ContentLengthError)")
        ],
    }  # fmt: skip


async def test_a_connection_closed_inside_the_answers_head_is_said_in_our_words(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """aiohttp's `ServerDisconnectedError` holds the message it had parsed, and its text is
    that message's repr: the receiver's reason phrase and header values (the token it
    echoed, a note of its own) in errorMsg, the log line, lastError and a disable reason;
    a token holding both `'` and `"` was not even masked there, its quotes escaped."""
    settings = settings.model_copy(update={"retry_schedule": ()})
    token = "ab'cd\"ef-0123456789"
    async with raw_receiver() as hostile:
        url = hostile.base + "/cut-head"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET, token)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
        [record] = await records(redis, settings, url)

    assert (record.response_code, record.error_msg) == (
        None,
        "ServerDisconnectedError: the receiver closed the connection before its answer was "
        "complete",
    )


# ---- statuses ---------------------------------------------------------------------------

NOT_FINAL = "not a final status (200-599): a protocol error, retried"


@pytest.mark.parametrize(
    ("status", "errors"),
    [
        (101, [f"HTTP 101: {NOT_FINAL}"] * 2),  # a protocol switch nobody asked for
        (99, [f"HTTP 99: {NOT_FINAL}"] * 2),  # `099`: below any status
        (600, [f"HTTP 600: {NOT_FINAL}"] * 2),
        (999, [f"HTTP 999: {NOT_FINAL}"] * 2),
        (599, ["HTTP 599"] * 2),  # 5xx: retried
        (499, ["HTTP 499"]),  # 4xx: final
        (204, [None]),
    ],
)
async def test_a_status_outside_200_599_is_a_protocol_error_and_retried(
    settings: Settings, redis: Redis, run_worker: RunWorker, status: int, errors: list[str]
) -> None:
    """600-999 were retried as 5xx (the code read `>= 500`), 101 was final as a 4xx; the
    README said neither. Now any status a request cannot end with is a protocol error."""
    settings = settings.model_copy(update={"retry_schedule": (0.05,)})
    async with raw_receiver() as hostile:
        url = f"{hostile.base}/status-{status:03}"
        await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
        await Producer(settings, redis).emit("demo", "BUILD_END", {})
        await run_worker(settings)
        attempts = await records(redis, settings, url)
    assert [(r.response_code, r.error_msg) for r in attempts] == [(status, e) for e in errors]
    assert [r.final for r in attempts] == [False] * (len(errors) - 1) + [True]


async def test_a_connection_that_answered_101_carries_no_other_request(
    settings: Settings, redis: Redis, run_worker: RunWorker
) -> None:
    """A bare `101 Switching Protocols` (no `Upgrade` header) left the connection in the
    client's pool: the next delivery to that host and port (projB's as likely as projA's
    own retry) was written into what the receiver had switched to another protocol, its
    token and signature with it, and failed as `ServerDisconnectedError`. A connection that
    answered a status outside 200-599 is closed now. projA's 101 and projB's 503 are both
    retried after 50 ms, and every request goes on a connection of its own."""
    settings = settings.model_copy(update={"retry_schedule": (0.05,)})
    async with raw_receiver() as hostile:
        urls = {"projA": hostile.base + "/bare-101", "projB": hostile.base + "/status-503"}
        for project, url in urls.items():
            await Registry(redis).create(project, url, Event.BUILD_END, Region.DEVNET, project * 3)
        for project in urls:
            await Producer(settings, redis).emit(project, "BUILD_END", {})
        await run_worker(settings)
        said = {p: [(r.response_code, r.error_msg) for r in await records(redis, settings, u, p)]
                for p, u in urls.items()}  # fmt: skip

    assert [event for event in hostile.events if event.startswith("after")] == []
    assert said == {
        "projA": [(101, f"HTTP 101: {NOT_FINAL}")] * 2,
        "projB": [(503, "HTTP 503")] * 2,
    }
    assert hostile.of("/bare-101") == ["open", "closed"] * 2
