"""The headers of a delivery: what names and signs it (Standard Webhooks), the rules a
callback's own auth header and secrets follow to be sendable, and how history shows them
(secrets masked; in what a receiver answered, `masking.py`). Nothing here sends anything
(`delivery.py` does)."""

from __future__ import annotations

import base64
import hmac
import re
import time
from typing import TYPE_CHECKING

from dispatcher.errors import InvalidInput
from dispatcher.models import MASK, SECRET_HEADERS
from dispatcher.tokens import PREFIX as ENCRYPTED_PREFIX

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dispatcher.history.record import HeaderRow

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "MAX_AUTH_HEADER_NAME",
    "MAX_AUTH_HEADER_VALUE",
    "PROJECT_HEADER",
    "TOKEN_HEADER",
    "AuthHeader",
    "check_auth_header",
    "check_header_value",
    "mask_headers",
    "request_headers",
    "sent_secrets",
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
RESERVED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "expect",
        "user-agent",
        "traceparent",
        "tracestate",
    }
)
RESERVED_PREFIXES = ("x-devops-", "webhook-")


def sign(delivery_id: str, timestamp: int, body: bytes, token: str) -> str:
    """Standard Webhooks `webhook-signature`: HMAC-SHA256 over `id.timestamp.body`.

    The key is the token's UTF-8 bytes, so receivers verify with
    `Webhook("whsec_" + base64(token))`.
    """
    mac = hmac.digest(token.encode(), f"{delivery_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(mac).decode()


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
    (CR, LF) or be cut by the receiver (NUL, spaces at either end). Nor may it start as a
    secret stored encrypted does (`fernet:`): while `DISPATCHER_TOKEN_KEYS` is unset values
    are stored as given, and one such made every later rotation stop at it (review)."""
    if len(value) > limit or not _HEADER_VALUE.fullmatch(value):
        raise InvalidInput(
            f"{param} must be printable ASCII (visible characters, spaces only between "
            f"them), without line breaks or control characters, at most {limit} characters",
            param=param,
        )
    if value.startswith(ENCRYPTED_PREFIX):
        raise InvalidInput(
            f"{param} must not start with {ENCRYPTED_PREFIX!r}: secrets stored encrypted do",
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
) -> list[HeaderRow]:
    """Headers as history stores them (`[{name, value}]`), secrets masked: the token, the
    usual credential headers, and the callback's custom auth header."""
    secret = SECRET_HEADERS if auth_header is None else SECRET_HEADERS | {auth_header[0].lower()}
    return [
        {"name": name, "value": MASK if name.lower() in secret else value}
        for name, value in headers.items()
    ]


def sent_secrets(
    headers: Mapping[str, str], previous_token: str = "", auth_header: AuthHeader | None = None
) -> list[str]:
    """What `mask_secrets` masks for an attempt: the secrets it sent (the token and the
    previous one, the credentials after a scheme such as `Bearer ` and then the custom auth
    header's whole value, each signature's MAC and then the signature), as sent: each that
    holds another just after it."""
    found = [headers.get(TOKEN_HEADER, ""), previous_token]
    if auth_header is not None:
        found += auth_header[1].partition(" ")[2], auth_header[1]
    for signature in headers.get("webhook-signature", "").split():
        found += signature[3:], signature  # the MAC, and with `v1,`
    return [secret for secret in found if secret]
