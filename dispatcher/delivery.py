"""One HTTP delivery attempt: the request, its headers and signature, the timeout, the result.

Nothing here touches Redis: the worker decides what to record and whether to retry.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from dispatcher.addresses import connect_url
from dispatcher.backoff import parse_retry_after
from dispatcher.clock import now_ms
from dispatcher.errors import AddressRefused, describe
from dispatcher.headers import AuthHeader, mask_headers, request_headers, sent_secrets
from dispatcher.history.window import truncate_json
from dispatcher.masking import Budget, mask_cut, mask_secrets, past_cut

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from dispatcher.history.record import HeaderRow
    from dispatcher.settings import Settings

__all__ = [
    "AttemptResult",
    "Attempted",
    "Limits",
    "Outcome",
    "Outgoing",
    "Poster",
    "attempt",
    "classify",
    "encode_body",
    "send",
]


class Outcome(enum.StrEnum):
    """What one attempt means for the delivery."""

    SUCCESS = "success"  # 2xx
    RETRY = "retry"  # connection or protocol error, timeout, 408, 429, 5xx: try again later
    FAILED = "failed"  # any other answer (3xx, 4xx): final
    GONE = "gone"  # 410: final, a project's callback disabled at once (never a platform one)

    @property
    def is_final(self) -> bool:
        return self is not Outcome.RETRY


@dataclass(slots=True)
class AttemptResult:
    """What happened on the wire. Times are epoch milliseconds. `sent`: False when no
    connection was tried (the address refused, the host unresolved, the request
    unbuildable: `unsent`, and those `send` meets), so its duration is no exchange's and
    stays out of the attempt times."""

    outcome: Outcome
    status_code: int | None
    response_body: str | None
    error: str | None
    retry_after: float | None
    started_ms: int
    ended_ms: int
    sent: bool = True

    @property
    def duration_ms(self) -> int:
        return self.ended_ms - self.started_ms

    @classmethod
    def unsent(
        cls, error: str, outcome: Outcome = Outcome.FAILED, started_ms: int | None = None
    ) -> AttemptResult:
        """An attempt that sent nothing: final (FAILED), or tried again (RETRY)."""
        now = now_ms()
        started = now if started_ms is None else started_ms
        return cls(outcome, None, None, error, None, started, now, sent=False)


@dataclass(frozen=True, slots=True)
class Limits:
    """A worker's bounds on every attempt (from its settings)."""

    user_agent: str
    connect_timeout: float
    total_timeout: float
    max_response_body: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.user_agent, settings.connect_timeout, settings.total_timeout,
                   settings.max_response_body)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One attempt's request: the body bytes as built once for the event, what signs and
    names it, the callback's secrets, and extra headers (a trace context)."""

    url: str
    body: bytes
    event: str
    delivery_id: str
    project_id: str = ""
    token: str = ""
    previous_token: str = ""
    auth_header: AuthHeader | None = None
    extra: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Attempted:
    """What an attempt's history record needs: the result, and the headers as sent,
    secrets masked (none when nothing could be built)."""

    result: AttemptResult
    headers: list[HeaderRow]


def encode_body(event: str, project_id: str, data: Mapping[str, Any]) -> bytes:
    """The reference's envelope plus the emitting project, the producer's data untouched:
    `{"event", "projectId", "data"}` (signed with the rest, so a platform-wide receiver
    knows who emitted it)."""
    return orjson.dumps({"event": event, "projectId": project_id, "data": data})


def classify(status_code: int) -> Outcome:
    """2xx succeeds; 408, 429 and 5xx are retried; 410 is gone; other 3xx and 4xx are
    final. A status no request ends with (below 100; 101, a switch nobody asked for; 600 to
    999) is a protocol error, retried like an answer that is not HTTP."""
    if 200 <= status_code < 300:
        return Outcome.SUCCESS
    if status_code == 410:
        return Outcome.GONE
    if 300 <= status_code < 500 and status_code not in (408, 429):
        return Outcome.FAILED
    return Outcome.RETRY


def _verdict(status: int) -> str:
    """What `errorMsg` says of an answer that did not succeed."""
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed"
    if not 200 <= status < 600:
        return f"HTTP {status}: not a final status (200-599): a protocol error, retried"
    return f"HTTP {status}"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it was raised from, however deeply the client wrapped it (at most
    ten deep)."""
    for _ in range(10):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def _refused(exc: BaseException) -> AddressRefused | None:
    """The policy refusal behind a client error."""
    return next((e for e in _chain(exc) if isinstance(e, AddressRefused)), None)


# The client's own errors: their messages speak of hosts, addresses and sockets; but those
# of a malformed answer quote it (`_malformed`), and a server's disconnection holds the
# answer's head (said in our words; `describe` keeps no message that is not words).
_NETWORK_ERRORS = (aiohttp.ClientError, OSError)
_BAD_PROXY = "the region's proxy URL is not valid (DISPATCHER_REGION_PROXIES)"
_CLOSED = "the receiver closed the connection before its answer was complete"
MAX_ERROR = 300  # characters of an error text: a record's, a log line's, a lastError's


def _malformed(exc: BaseException) -> str | None:
    """What to say of an answer the client's HTTP parser refused: a fixed reason and the
    parser's name for what was wrong (`BadStatusLine`, `ContentLengthError`), never its
    message, which quotes up to 8 KB of the answer; None for any other error."""
    parsed = [type(e).__name__ for e in _chain(exc) if isinstance(e, HttpProcessingError)]
    if not parsed:
        return None
    what = f" ({parsed[-1]})" if parsed[-1] != "HttpProcessingError" else ""
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{type(exc).__name__}: the answer's body is cut short or malformed{what}"
    return f"{type(exc).__name__}: the answer is not HTTP the client accepts{what}"


def _error_text(exc: BaseException, timeouts: tuple[float, float]) -> str:
    """What went wrong, said as what happened, holding no secret."""
    if (malformed := _malformed(exc)) is not None:
        return malformed
    if isinstance(exc, aiohttp.ClientConnectorError):
        why = exc.os_error.strerror or exc.os_error
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return f"could not resolve host {exc.host}: {why}"
        return f"could not connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out connecting after {timeouts[0]:g}s"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeouts[1]:g}s" + (f" ({exc})" if str(exc) else "")
    if isinstance(exc, aiohttp.ServerDisconnectedError):  # its text: the head it had read
        return f"{type(exc).__name__}: {_CLOSED}"
    return describe(exc, trusted=_NETWORK_ERRORS)


def _one_line(text: str) -> str:
    """An error text as records and log lines keep it: control characters escaped, at most
    `MAX_ERROR` characters (what a client error's message quotes, from a peer say)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "... [cut]"


class Poster(Protocol):
    """What sends an attempt (`dispatcher.egress.Client`, one per region)."""

    def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]: ...


@functools.lru_cache(maxsize=16)
def _timeout(connect_timeout: float) -> aiohttp.ClientTimeout:
    """A new connection's connect (and TLS handshake) bounded. The whole exchange (the
    pool's wait, the resolution, each read) is bounded by `send` itself, with one timer:
    aiohttp's own `connect` and `sock_read` would start two or three more per request."""
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout)


def _names(exc: aiohttp.InvalidURL, target: URL) -> bool:
    """Whether the invalid URL `exc` speaks of is the callback's (or its host)."""
    return str(exc.url) in (str(target), target.raw_host, target.host)


def _check_headers(headers: Mapping[str, str]) -> None:
    """Header values go out as ASCII, one line each (stored values are checked when
    registered; this is the last line of defence, for what an older version stored)."""
    values = "".join(headers.values())
    if not values.isascii() or "\r" in values or "\n" in values or "\0" in values:
        raise ValueError("a header value is not ASCII, or holds a line break or a NUL")


async def send(
    client: Poster,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    total_timeout: float,
    max_response_body: int,
    secrets: Sequence[str] = (),
) -> AttemptResult:
    """POST once, bounded by `total_timeout` overall and `max_response_body` bytes read,
    `secrets` masked in what the receiver answered and in the error (`mask_secrets`), both
    within one `Budget` of the loop's time (past it, the text is withheld).
    Whatever goes wrong ends as a result, never an exception: a request that cannot be
    built fails for good; a failure on the wire is judged by the answer when one came, and
    is retried when none did (but for an address the policy refuses)."""
    started = now_ms()
    try:
        target = connect_url(url)  # the parse the egress check read (`rules.destination`)
        _check_headers(headers)
    except Exception as exc:  # retrying cannot help: the same request again would fail
        text = f"the request could not be built: {describe(exc)}"
        return AttemptResult.unsent(text, started_ms=started)
    answer, budget = _Answer(), Budget()
    try:
        async with asyncio.timeout(total_timeout):
            async with client.post(target, body, headers, _timeout(connect_timeout)) as response:
                await answer.read(response, max_response_body, secrets, budget)
    except Exception as exc:  # a receiver can make anything raise: it ends as a result
        error = _error_text(exc, (connect_timeout, total_timeout))
        error = _one_line(mask_secrets(error, secrets, budget))
        if answer.status is not None:  # the answer came, reading it failed: judge the answer
            return answer.result(classify(answer.status), error, started)
        # the ones below sent nothing (`AttemptResult.sent`): no connection was tried
        if (refusal := _refused(exc)) is not None:  # retrying cannot help
            return answer.result(Outcome.FAILED, f"refused: {refusal}", started, sent=False)
        if isinstance(exc, aiohttp.InvalidURL) and not _names(exc, target):
            # another's URL, the region's proxy: the operator's to fix (unseen, it may
            # hold a password), and then the attempt is worth making again
            return answer.result(Outcome.RETRY, _BAD_PROXY, started, sent=False)
        if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
            built = f"the request could not be built: {error}"  # it never will be sent
            return answer.result(Outcome.FAILED, built, started, sent=False)
        unresolved = isinstance(exc, aiohttp.ClientConnectorDNSError)  # the host's name
        return answer.result(Outcome.RETRY, error, started, sent=not unresolved)
    status = answer.status
    assert status is not None
    outcome = classify(status)
    return answer.result(outcome, None if outcome is Outcome.SUCCESS else _verdict(status), started)


@dataclass(slots=True)
class _Answer:
    """What the receiver said, as far as it was read."""

    status: int | None = None
    text: str | None = None
    retry_after: float | None = None

    async def read(
        self, response: aiohttp.ClientResponse, limit: int, secrets: Sequence[str], budget: Budget
    ) -> None:
        """The status, then `Retry-After`, then at most `limit` bytes of the body, `secrets`
        masked, kept as far as it takes at most `limit` bytes in the record (`truncate_json`:
        a control character read as 1 byte is stored as 6). A longer body is read on as far
        as the widest form of the longest secret (`mask_cut`), the rest never into memory."""
        self.status = response.status
        self.retry_after = parse_retry_after(response.headers.get("retry-after"))
        body = await _read(response.content, limit)
        if len(body) > limit:
            if (wanted := limit + past_cut(secrets) - len(body)) > 0:
                body += await _read(response.content, wanted)
            text = mask_cut(body, limit, secrets, budget)
        else:
            text = body.decode("utf-8", errors="replace")
            text = mask_secrets(text, secrets, budget) if text else text
        self.text, cut = truncate_json(text, limit)
        if len(body) > limit or cut:
            self.text += f"... [truncated at {limit} bytes]"

    def result(
        self, outcome: Outcome, error: str | None, started: int, *, sent: bool = True
    ) -> AttemptResult:
        return AttemptResult(
            outcome, self.status, self.text, error, self.retry_after, started, now_ms(), sent
        )


async def _read(content: aiohttp.StreamReader, limit: int) -> bytes:
    """What `content` holds, read until there is more than `limit` bytes or it ends."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


async def attempt(
    client: Poster,
    limits: Limits,
    out: Outgoing,
    *,
    refused: AttemptResult | None = None,
) -> Attempted:
    """One attempt, start to end: the headers built and signed, the POST (not when
    `refused`: the caller's address check said no, and that is the result), the headers
    masked for the record. Whatever raises while the request is built fails the attempt
    for good: the same request would fail the same way."""
    headers: dict[str, str] = {}
    try:
        headers = request_headers(
            event=out.event,
            delivery_id=out.delivery_id,
            body=out.body,
            token=out.token,
            user_agent=limits.user_agent,
            project_id=out.project_id,
            auth_header=out.auth_header,
            previous_token=out.previous_token,
        )
        if out.extra:
            headers.update(out.extra)
        secrets = sent_secrets(headers, out.previous_token, out.auth_header)
        result = refused or await send(
            client,
            out.url,
            out.body,
            headers,
            connect_timeout=limits.connect_timeout,
            total_timeout=limits.total_timeout,
            max_response_body=limits.max_response_body,
            secrets=secrets,
        )
    except Exception as exc:
        result = AttemptResult.unsent(f"the request could not be sent: {describe(exc)}")
    return Attempted(result, mask_headers(headers, out.auth_header))
