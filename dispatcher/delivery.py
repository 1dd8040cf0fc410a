"""One HTTP delivery attempt: the request, its headers and signature, the timeout, the result.

Nothing here touches Redis: the worker decides what to record and whether to retry.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import orjson

from dispatcher.backoff import parse_retry_after
from dispatcher.clock import now_ms
from dispatcher.errors import AddressRefused, describe
from dispatcher.headers import AuthHeader, mask_headers, request_headers

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dispatcher.history.record import HeaderRow

__all__ = [
    "AttemptResult",
    "Attempted",
    "Limits",
    "Outcome",
    "Outgoing",
    "attempt",
    "classify",
    "encode_body",
    "send",
]


class Outcome(enum.StrEnum):
    """What one attempt means for the delivery."""

    SUCCESS = "success"  # 2xx
    RETRY = "retry"  # connection error, timeout, 408, 429, 5xx: try again later
    FAILED = "failed"  # any other answer (3xx, 4xx): final
    GONE = "gone"  # 410: final, and the callback is disabled at once

    @property
    def is_final(self) -> bool:
        return self is not Outcome.RETRY


@dataclass(slots=True)
class AttemptResult:
    """What happened on the wire. Times are epoch milliseconds."""

    outcome: Outcome
    status_code: int | None
    response_body: str | None
    error: str | None
    retry_after: float | None
    started_ms: int
    ended_ms: int

    @property
    def duration_ms(self) -> int:
        return self.ended_ms - self.started_ms


@dataclass(frozen=True, slots=True)
class Limits:
    """A worker's bounds on every attempt (from its settings)."""

    user_agent: str
    connect_timeout: float
    total_timeout: float
    max_response_body: int


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
    """2xx succeeds; 408, 429 and 5xx are retried; 410 disables; the rest is final."""
    if 200 <= status_code < 300:
        return Outcome.SUCCESS
    if status_code == 410:
        return Outcome.GONE
    if status_code in (408, 429) or status_code >= 500:
        return Outcome.RETRY
    return Outcome.FAILED


def _refused(exc: BaseException | None) -> AddressRefused | None:
    """The policy refusal behind a client error, however deeply the client wrapped it."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, AddressRefused):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


# The transport's own errors: their messages speak of hosts, addresses and sockets.
_NETWORK_ERRORS = (httpx.HTTPError, httpx.InvalidURL, aiohttp.ClientError, OSError)


def _error_text(exc: BaseException, timeouts: tuple[float, float]) -> str:
    """What went wrong, said as what happened, holding no secret. httpx-aiohttp wraps
    aiohttp's errors (and calls every connection error a `ConnectTimeout`): the text comes
    from the error it wrapped."""
    if isinstance(exc, httpx.HTTPError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, aiohttp.ClientConnectorError):
        why = exc.os_error.strerror or exc.os_error
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return f"could not resolve host {exc.host}: {why}"
        return f"could not connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out connecting after {timeouts[0]:g}s"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"timed out after {timeouts[1]:g}s" + (f" ({exc})" if str(exc) else "")
    return describe(exc, trusted=_NETWORK_ERRORS)


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body; the rest is never read into memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


@functools.lru_cache(maxsize=16_384)  # about 10 MB at most
def _parsed(url: str) -> httpx.URL:
    """Callback URLs repeat: parse each once (a third of building a request)."""
    return httpx.URL(url)


@functools.lru_cache(maxsize=16)
def _extensions(connect_timeout: float, total_timeout: float) -> dict[str, Any]:
    return {
        "timeout": {
            "connect": connect_timeout,
            "read": total_timeout,
            "write": total_timeout,
            "pool": total_timeout,
        }
    }


async def send(
    transport: httpx.AsyncBaseTransport,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    total_timeout: float,
    max_response_body: int,
) -> AttemptResult:
    """POST once, bounded by `total_timeout` overall and `max_response_body` bytes read.
    Whatever goes wrong ends as a result, never an exception: a request that cannot be
    built fails for good; a failure on the wire is judged by the answer when one came, and
    is retried when none did (but for an address the policy refuses).

    The request goes straight to the transport: a delivery needs none of the client's
    layers (cookies, auth flows, redirects, hooks), and skipping them is measurably cheaper.
    """
    started = now_ms()
    try:
        request = httpx.Request(
            "POST",
            _parsed(url),
            content=body,
            headers=headers,
            extensions=_extensions(connect_timeout, total_timeout),
        )
    except Exception as exc:  # retrying cannot help: the same request again would fail
        text = f"the request could not be built: {describe(exc, trusted=(httpx.InvalidURL,))}"
        return AttemptResult(Outcome.FAILED, None, None, text, None, started, now_ms())
    answer = _Answer()
    try:
        async with asyncio.timeout(total_timeout):
            await _exchange(transport, request, answer, max_response_body)
    except Exception as exc:  # a receiver can make anything raise: it ends as a result
        error = _error_text(exc, (connect_timeout, total_timeout))
        if answer.status is not None:  # the answer came, reading it failed: judge the answer
            return answer.result(classify(answer.status), error, started)
        if (refusal := _refused(exc)) is not None:  # retrying cannot help
            return answer.result(Outcome.FAILED, f"refused: {refusal}", started)
        return answer.result(Outcome.RETRY, error, started)
    status = answer.status
    assert status is not None
    outcome = classify(status)
    verdict = None if outcome is Outcome.SUCCESS else f"HTTP {status}"
    if 300 <= status < 400:
        verdict = f"HTTP {status}: redirects are not followed"
    return answer.result(outcome, verdict, started)


@dataclass(slots=True)
class _Answer:
    """What the receiver said, as far as it was read."""

    status: int | None = None
    text: str | None = None
    retry_after: float | None = None

    def result(self, outcome: Outcome, error: str | None, started: int) -> AttemptResult:
        return AttemptResult(
            outcome, self.status, self.text, error, self.retry_after, started, now_ms()
        )


async def _exchange(
    transport: httpx.AsyncBaseTransport, request: httpx.Request, answer: _Answer, limit: int
) -> None:
    response = await transport.handle_async_request(request)
    try:
        answer.status = response.status_code
        answer.retry_after = parse_retry_after(response.headers.get("retry-after"))
        raw, truncated = await _read_capped(response, limit)
    finally:
        await response.aclose()
    answer.text = raw.decode("utf-8", errors="replace")
    if truncated:
        answer.text += f"... [truncated at {limit} bytes]"


async def attempt(
    transport: httpx.AsyncBaseTransport,
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
        result = refused or await send(
            transport,
            out.url,
            out.body,
            headers,
            connect_timeout=limits.connect_timeout,
            total_timeout=limits.total_timeout,
            max_response_body=limits.max_response_body,
        )
    except Exception as exc:
        now = now_ms()
        error = f"the request could not be sent: {describe(exc)}"
        result = AttemptResult(Outcome.FAILED, None, None, error, None, now, now)
    return Attempted(result, mask_headers(headers, out.auth_header))
