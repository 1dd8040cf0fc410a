"""One HTTP delivery attempt: the request, its headers and signature, the timeout, the result.

Nothing here touches Redis: the worker decides what to record and whether to retry.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import orjson

from dispatcher.backoff import parse_retry_after
from dispatcher.clock import now_ms
from dispatcher.errors import AddressRefused, InvalidInput, describe
from dispatcher.models import MASK, SECRET_HEADERS

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "PROJECT_HEADER",
    "TOKEN_HEADER",
    "AttemptResult",
    "AuthHeader",
    "Outcome",
    "check_auth_header",
    "check_header_value",
    "classify",
    "encode_body",
    "mask_headers",
    "request_headers",
    "send",
    "sign",
    "unsendable",
]

TOKEN_HEADER = "X-DEVOPS-WEBHOOK-TOKEN"
EVENT_HEADER = "X-DEVOPS-EVENT"
DELIVERY_HEADER = "X-DEVOPS-DELIVERY-ID"
PROJECT_HEADER = "X-DEVOPS-PROJECT-ID"

AuthHeader = tuple[str, str]  # a callback's custom auth header: (name, value)
MAX_AUTH_HEADER_NAME = 64
MAX_AUTH_HEADER_VALUE = 4096
# RFC 9110 token characters. A value registered now is visible ASCII, spaces only between
# characters; what a delivery can still send (a value stored by an older version) is any
# printable ASCII and tabs: never CR, LF, NUL, another control character or non-ASCII.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+(?: +[\x21-\x7e]+)*")
_SENDABLE_VALUE = re.compile(r"[\x20-\x7e\t]*")
# What a callback's own header may not be: hop-by-hop and framing headers, and every
# header a delivery sets itself (by name, or by the prefixes of ours).
RESERVED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
    "content-length", "content-type", "content-encoding", "expect", "user-agent",
    "traceparent", "tracestate",
})  # fmt: skip
RESERVED_PREFIXES = ("x-devops-", "webhook-")


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


def encode_body(event: str, project_id: str, data: Mapping[str, Any]) -> bytes:
    """The reference's envelope plus the emitting project, the producer's data untouched:
    `{"event", "projectId", "data"}` (signed with the rest, so a platform-wide receiver
    knows who emitted it)."""
    return orjson.dumps({"event": event, "projectId": project_id, "data": data})


def sign(delivery_id: str, timestamp: int, body: bytes, token: str) -> str:
    """Standard Webhooks `webhook-signature`: HMAC-SHA256 over `id.timestamp.body`.

    The key is the token's UTF-8 bytes, so receivers verify with
    `Webhook("whsec_" + base64(token))`.
    """
    mac = hmac.new(token.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def check_auth_header(name: str, value: str) -> AuthHeader:
    """A custom auth header a callback may carry, checked; returns it trimmed. Refused: a
    name that is not an HTTP token, a hop-by-hop or framing header, one we send ourselves
    (`X-DEVOPS-*`, `webhook-*`, ...), and a value with a line break or control character."""
    name, value = name.strip(), value.strip()
    if not name or not value:
        raise InvalidInput(
            "authHeaderName and authHeaderValue go together (both non-empty)",
            param="authHeaderName" if not name else "authHeaderValue",
        )
    if len(name) > MAX_AUTH_HEADER_NAME or not _HEADER_NAME.fullmatch(name):
        raise InvalidInput(
            f"authHeaderName must be an HTTP header name (letters, digits, '-', at most "
            f"{MAX_AUTH_HEADER_NAME} characters)",
            param="authHeaderName",
        )
    lower = name.lower()
    if lower in RESERVED_HEADERS or lower.startswith(RESERVED_PREFIXES):
        raise InvalidInput(
            f"authHeaderName {name!r} is reserved: the dispatcher sets it, or it is a "
            "hop-by-hop header",
            param="authHeaderName",
        )
    return name, check_header_value(value, "authHeaderValue", MAX_AUTH_HEADER_VALUE)


def check_header_value(value: str, param: str, limit: int) -> str:
    """A secret that goes out as a header value (`secretToken`, `authHeaderValue`), checked
    at registration: visible ASCII, spaces only between characters, at most `limit`
    characters. Anything else could never be sent (non-ASCII), or would forge headers
    (CR, LF) or be cut by the receiver (NUL, spaces at either end)."""
    if len(value) > limit or not _HEADER_VALUE.fullmatch(value):
        raise InvalidInput(
            f"{param} must be printable ASCII (visible characters, spaces only between "
            f"them), without line breaks or control characters, at most {limit} characters",
            param=param,
        )
    return value


def unsendable(token: str, auth_header: AuthHeader | None) -> str | None:
    """Why a callback's stored secrets cannot go out as headers (stored by an older
    version, before registration refused them), or None. Never quotes them."""
    if not _sendable(token):
        return _UNSENDABLE.format(param="secretToken")
    if auth_header is not None and not (
        _HEADER_NAME.fullmatch(auth_header[0]) and _sendable(auth_header[1])
    ):
        return _UNSENDABLE.format(param="authHeaderValue")
    return None


def _sendable(value: str) -> bool:
    # every attempt asks: the common case without a regular expression (5x faster)
    return (value.isascii() and value.isprintable()) or bool(_SENDABLE_VALUE.fullmatch(value))


_UNSENDABLE = (
    "the callback's {param} holds a line break, a control character or non-ASCII text "
    "(registered before these were refused), so it cannot be sent as a header: register the "
    "callback again with a valid {param}"
)


def request_headers(
    *,
    event: str,
    delivery_id: str,
    body: bytes,
    token: str,
    user_agent: str,
    project_id: str = "",
    auth_header: AuthHeader | None = None,
    timestamp: int | None = None,
    previous_token: str = "",
) -> dict[str, str]:
    """Every header of a delivery: the emitting project's id when known. No token, no
    token header and no signature; the callback's custom auth header when it has one.
    While a rotation's overlap lasts (`previous_token`), the signature header carries one
    signature per secret, the new one first, space-separated as Standard Webhooks
    specifies; the token header only the new token."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    # (an id queued by an older version may not be sendable: the body names it all the same)
    if project_id and project_id.isascii() and project_id.isprintable():
        headers[PROJECT_HEADER] = project_id
    if token:
        ts = int(time.time()) if timestamp is None else timestamp
        headers[TOKEN_HEADER] = token
        headers["webhook-id"] = delivery_id
        headers["webhook-timestamp"] = str(ts)
        headers["webhook-signature"] = sign(delivery_id, ts, body, token)
        if previous_token and previous_token != token:
            headers["webhook-signature"] += " " + sign(delivery_id, ts, body, previous_token)
    if auth_header is not None:
        headers[auth_header[0]] = auth_header[1]
    return headers


def mask_headers(
    headers: Mapping[str, str], auth_header: AuthHeader | None = None
) -> list[dict[str, str]]:
    """Headers as history stores them (`[{name, value}]`), secrets masked: the token, the
    usual credential headers, and the callback's custom auth header."""
    secret = SECRET_HEADERS if auth_header is None else SECRET_HEADERS | {auth_header[0].lower()}
    return [
        {"name": name, "value": MASK if name.lower() in secret else value}
        for name, value in headers.items()
    ]


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
    return {"timeout": {"connect": connect_timeout, "read": total_timeout,
                        "write": total_timeout, "pool": total_timeout}}  # fmt: skip


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
            "POST", _parsed(url), content=body, headers=headers,
            extensions=_extensions(connect_timeout, total_timeout),
        )  # fmt: skip
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
