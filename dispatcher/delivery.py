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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import orjson

from dispatcher.backoff import parse_retry_after
from dispatcher.errors import AddressRefused

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "TOKEN_HEADER",
    "AttemptResult",
    "Outcome",
    "classify",
    "encode_body",
    "mask_headers",
    "request_headers",
    "send",
    "sign",
]

TOKEN_HEADER = "X-DEVOPS-WEBHOOK-TOKEN"
EVENT_HEADER = "X-DEVOPS-EVENT"
DELIVERY_HEADER = "X-DEVOPS-DELIVERY-ID"
MASK = "******"
SECRET_HEADERS = frozenset({TOKEN_HEADER.lower(), "authorization", "proxy-authorization"})


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


def encode_body(event: str, data: Mapping[str, Any]) -> bytes:
    """The reference's envelope, the producer's data untouched: `{"event", "data"}`."""
    return orjson.dumps({"event": event, "data": data})


def sign(delivery_id: str, timestamp: int, body: bytes, token: str) -> str:
    """Standard Webhooks `webhook-signature`: HMAC-SHA256 over `id.timestamp.body`.

    The key is the token's UTF-8 bytes, so receivers verify with
    `Webhook("whsec_" + base64(token))`.
    """
    mac = hmac.new(token.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def request_headers(
    *,
    event: str,
    delivery_id: str,
    body: bytes,
    token: str,
    user_agent: str,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Every header of a delivery. No token, no token header and no signature."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
    }
    if token:
        ts = int(time.time()) if timestamp is None else timestamp
        headers[TOKEN_HEADER] = token
        headers["webhook-id"] = delivery_id
        headers["webhook-timestamp"] = str(ts)
        headers["webhook-signature"] = sign(delivery_id, ts, body, token)
    return headers


def mask_headers(headers: Mapping[str, str]) -> list[dict[str, str]]:
    """Headers as history stores them (`[{name, value}]`), secrets masked."""
    return [
        {"name": name, "value": MASK if name.lower() in SECRET_HEADERS else value}
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


def _error_text(exc: BaseException, total_timeout: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"timed out after {total_timeout:g}s" + (f" ({exc})" if str(exc) else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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


@functools.lru_cache(maxsize=4096)
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

    The request goes straight to the transport: a delivery needs none of the client's
    layers (cookies, auth flows, redirects, hooks), and skipping them is measurably cheaper.
    """
    started = _now_ms()
    status: int | None = None
    text: str | None = None
    retry_after: float | None = None
    try:
        async with asyncio.timeout(total_timeout):
            request = httpx.Request(
                "POST", _parsed(url), content=body, headers=headers,
                extensions=_extensions(connect_timeout, total_timeout),
            )  # fmt: skip
            response = await transport.handle_async_request(request)
            try:
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                raw, truncated = await _read_capped(response, max_response_body)
            finally:
                await response.aclose()
            text = raw.decode("utf-8", errors="replace")
            if truncated:
                text += f"... [truncated at {max_response_body} bytes]"
    except (httpx.HTTPError, httpx.InvalidURL, aiohttp.ClientError, TimeoutError, OSError) as exc:
        # aiohttp.ClientError: what the transport does not translate (e.g. a reply that is
        # not HTTP). Whatever the receiver does, the attempt ends as a result, never a crash.
        ended = _now_ms()
        if status is not None:  # the answer came, reading its body failed: judge the answer
            return AttemptResult(
                classify(status), status, text, _error_text(exc, total_timeout), retry_after,
                started, ended,
            )  # fmt: skip
        if (refusal := _refused(exc)) is not None:  # retrying cannot help
            return AttemptResult(
                Outcome.FAILED, None, None, f"refused: {refusal}", None, started, ended
            )
        return AttemptResult(
            Outcome.RETRY, None, None, _error_text(exc, total_timeout), None, started, ended
        )
    outcome = classify(status)
    error = None if outcome is Outcome.SUCCESS else f"HTTP {status}"
    if 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed"
    return AttemptResult(outcome, status, text, error, retry_after, started, _now_ms())
