"""The headers of a delivery: what names and signs it (Standard Webhooks), the rules a
callback's own auth header and secrets follow to be sendable, and how history shows them
(secrets masked). Nothing here sends anything (`delivery.py` does)."""

from __future__ import annotations

import base64
import codecs
import functools
import hmac
import html
import json
import re
import time
from typing import TYPE_CHECKING

from dispatcher.errors import InvalidInput
from dispatcher.models import MASK, SECRET_HEADERS
from dispatcher.tokens import PREFIX as ENCRYPTED_PREFIX

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
    "mask_cut",
    "mask_headers",
    "mask_secrets",
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


SHORT_SECRET = 8  # shorter secrets are masked only where they stand alone


def mask_secrets(text: str, secrets: Sequence[str]) -> str:
    """`text` (what a receiver answered, an error) with each of `secrets` masked, as sent
    and as encoders escape it (`_pattern`), the longest first (a secret may hold another:
    the previous token the new one). When none is there, one `in` per secret no longer
    than `text`: of a run of its letters and digits, which every form keeps (`_anchor`);
    one that holds the secret before it (`sent_secrets`) is there only if that one is.
    One shorter than `SHORT_SECRET` is masked only where no letter or digit touches it:
    inside words, masking would garble the text and give the secret away by its gaps."""
    size, found, inner, there = len(text), [], "", False
    for secret in secrets:
        if len(secret) > size:
            continue
        if not (inner and inner in secret):
            there = _anchor(secret) in text
        if there:
            found.append(secret)
        inner = secret
    if not found:
        return text
    for secret in sorted(found, key=len, reverse=True):
        if "\\" in secret or sum(not c.isalnum() for c in secret) > MOST_ESCAPABLE:
            text = _mask_forms(text, _forms(secret))  # as sent too: too many mixes to try
            continue
        if _whole(secret) and secret in text:
            text = text.replace(secret, MASK)
        if _anchor(secret) in text:  # escaped, or short: the pattern
            text = _pattern(secret).sub(MASK, text)
    return text


# A secret holding more characters that encoders escape than this, or a backslash (its
# two forms, `\\` and `\\\\`, make a run of them match in 2^n ways), is masked in the forms
# common encoders give it (`_forms`), not in every mix of escapes (`_pattern`): the
# pattern's scan costs the text's length times those characters, and a project chooses its
# secrets (an auth header value of 4,096 slashes made each attempt take 2.7 s of the
# worker's loop, every project's deliveries waiting: review). At this many, 20 KB of text
# made to match almost everywhere costs ~9 ms a secret at worst (a random token of 64
# visible ASCII characters holds ~20 such characters; one of letters, digits and base64's,
# a few).
MOST_ESCAPABLE = 12


@functools.lru_cache(maxsize=256)
def _forms(secret: str) -> tuple[str, ...]:
    """`secret` as sent and as JSON (standard, PHP's `\\/`, Go's `\\u0026` for `&<>`,
    .NET's `\\u002B` for `+&<>'"` and the backtick, Gson's `\\u003d` for `=&<>'`) and HTML
    write it (`&<>` escaped, each quote as itself or any of its references)."""
    standard = json.dumps(secret)[1:-1]
    go = standard.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    dotnet, gson = standard.replace('\\"', "\\u0022"), standard
    for c in "+&<>'`":
        dotnet = dotnet.replace(c, f"\\u{ord(c):04X}")
    for c in "=&<>'":
        gson = gson.replace(c, f"\\u{ord(c):04x}")
    found = [secret, standard, standard.replace("/", "\\/"), go, dotnet, gson]
    bare = html.escape(secret, quote=False)  # then each way HTML writes the quotes
    for single in ("&#x27;", "&#39;", "&#039;", "&apos;", "'"):
        for double in ("&quot;", "&#34;", '"'):
            found.append(bare.replace("'", single).replace('"', double))
    return tuple(form for form in dict.fromkeys(found) if form)


def _mask_forms(text: str, forms: Sequence[str]) -> str:
    """`text` with every place any of `forms` stands masked, places that overlap or touch
    as one: found in the text as it came, each form in one linear pass, so no form's
    masking leaves part of another standing (one after another, PHP's `\\/abc\\\\`, found
    first where the secret `/abc\\` as sent ended, left it but its last character)."""
    spans = []
    for form in forms:
        at = text.find(form)
        while at >= 0:
            spans.append((at, at + len(form)))
            at = text.find(form, at + 1)
    if not spans:
        return text
    spans.sort()
    kept: list[str] = []
    done = 0  # the text kept so far ends here
    begin, end = spans[0]
    for at, stop in spans[1:]:
        if at <= end:  # overlaps or touches the place being masked
            end = max(end, stop)
        else:
            kept += text[done:begin], MASK
            done, begin, end = end, at, stop
    kept += text[done:begin], MASK, text[end:]
    return "".join(kept)


def _whole(secret: str) -> bool:
    """Whether `secret` as sent is a whole form wherever it stands, so that replacing it
    leaves nothing of an escape behind: long enough, and no escape of its first character
    ends with it (`\\/`), nor one of its last begins with it (`&amp;`, `\\\\`)."""
    return len(secret) >= SHORT_SECRET and secret[0].isalnum() and secret[-1] not in "&\\"


def mask_cut(body: bytes, limit: int, secrets: Sequence[str]) -> str:
    """The first `limit` bytes of `body` decoded (a character they cut left out), with
    `secrets` masked, and one across the cut too: `body` goes on past the cut as far as the
    widest form of the longest secret (`past_cut`), so a secret the cut falls inside is
    masked whole there, and what is kept ends with a mask where the two part."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    head = decoder.decode(body[:limit])
    past = body[limit : limit + past_cut(secrets)]  # a read may have brought much more
    whole = mask_secrets(head + decoder.decode(past, final=True), secrets)
    head = mask_secrets(head, secrets)
    if whole.startswith(head):
        return head
    same, differs = 0, min(len(head), len(whole))  # their longest common start, by halves
    while same < differs:
        middle = (same + differs + 1) // 2
        same, differs = (middle, differs) if whole[:middle] == head[:middle] else (same, middle - 1)
    return head[:same] if head[:same].endswith(MASK) else head[:same] + MASK


def past_cut(secrets: Sequence[str]) -> int:
    """How far `mask_cut` wants to read past a cut: the widest form of the longest secret."""
    return ESCAPED_WIDTH * max(map(len, secrets), default=0)


_LONG_RUN = re.compile(r"[A-Za-z0-9]{8,}")
_RUN = re.compile(r"[A-Za-z0-9]+")
# What a character other than a letter or digit may be written as, besides itself: after a
# backslash (JSON's `\/` and `\"`), as a `\u` escape in either case (Go's `\u0026`, .NET's
# `\u002B`), as an HTML character reference (`&quot;`, `&#39;`, `&#039;`, `&#x27;`). At
# most `ESCAPED_WIDTH` characters each.
_NAMED = {'"': "|&quot;", "&": "|&amp;", "<": "|&lt;", ">": "|&gt;", "'": "|&apos;", "\t": r"|\\t"}
ESCAPED_WIDTH = 8


@functools.lru_cache(maxsize=4096)
def _anchor(secret: str) -> str:
    """A run of `secret`'s ASCII letters and digits, which no encoder escapes: the whole
    secret when it is nothing else, else its first run of 8 or more, else its longest."""
    if secret.isascii() and secret.isalnum():
        return secret
    if (run := _LONG_RUN.search(secret)) is not None:
        return run.group()
    return max(_RUN.findall(secret), key=len, default="")


def _escaped(c: str) -> str:
    """A pattern of `c`, a character other than a letter or digit, as any form it may take."""
    code, named = ord(c), _NAMED.get(c, "")
    literal = re.escape(c)
    return (  # the escapes first: the last character's `&amp;` masked whole, not its `&`
        rf"(?:\\{literal}|(?i:\\u{code:04x}|&#x0{{0,2}}{code:x};)|&#0{{0,2}}{code};"
        rf"{named}|{literal})"
    )


@functools.lru_cache(maxsize=256)
def _pattern(secret: str) -> re.Pattern[str]:
    """Every form of `secret`: its letters and digits as they are, each other character
    as `_escaped` says; standing alone when shorter than `SHORT_SECRET`."""
    forms = "".join(c if c.isascii() and c.isalnum() else _escaped(c) for c in secret)
    if len(secret) < SHORT_SECRET:
        forms = rf"(?<![A-Za-z0-9]){forms}(?![A-Za-z0-9])"
    return re.compile(forms)
