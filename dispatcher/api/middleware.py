"""Plain ASGI middleware. `RequestId` is the outermost, so every answer carries
`X-Request-ID` and `ANSWER_HEADERS`, the refusals of `Limits` included."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
import uuid
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from dispatcher.api.errors import ANSWER_HEADERS, REQUEST_ID_KEY, envelope

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from dispatcher.settings import Settings

__all__ = [
    "UNGATED",
    "Limits",
    "RequestId",
    "cross_site_refusal",
    "host_refusal",
    "identity_refusal",
]

MAX_QUERY_BYTES = 8 * 1024
# Probes and the Prometheus scrape come from inside the cluster, not through the gateway.
UNGATED = frozenset({"/healthz", "/readyz", "/metrics"})
# Who calls, and the credentials that vouch for it: each given once, or the request is
# refused with this code (a gateway that appends its header would let a caller pick).
ONCE = {b"x-devops-uid": 400, b"x-devops-gateway-token": 401, b"x-devops-operator-token": 401}
# What another site's page may send without asking first (a form, a no-cors fetch): not
# taken by the API's routes that change something (`cross_site_refusal`).
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
CONSOLE = "/console"


# A caller's request id, taken as its first 64 characters when they are all of these: it
# is bound to every log line of the request (a NEL, CSI or markup would reach them as sent).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# What every answer says unless its route said it (the console's pages send a stricter
# Content-Security-Policy): no page of another site may frame it (Swagger UI at /docs and
# ReDoc at /redoc could be framed under another site's page: review; the policy sets
# nothing else, so their scripts and styles load as before), and no browser reads it as
# another type than it says.
class RequestId:
    """Binds the request's id (the caller's `X-Request-ID` when `REQUEST_ID` takes it, else
    a new one) to every log line of the request and names it in the answer, which also
    carries each of `ANSWER_HEADERS` that its route did not set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id", "")[:64]
        if not REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                given = {name for name, _ in headers.raw}
                headers.raw.extend(h for h in ANSWER_HEADERS if h[0] not in given)
                headers["X-Request-ID"] = request_id
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)


class Limits:
    """Refuses what must not reach a route: a request on a loopback address naming another
    host (400, `host_refusal`), an oversized query string (400), a body beyond the route's
    limit (413: a declared length at once, a body sent without one as soon as it grows past
    the limit), and, when a gateway token is configured, a request without it (401). Every
    route takes `DISPATCHER_API_MAX_BODY_BYTES`, but those named in
    `body_limits` (route path -> bytes)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, body_limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = settings.api_max_body_bytes
        self.allowed_hosts = settings.allowed_hosts
        self.route_limits = [
            (compile_path(path)[0], limit) for path, limit in (body_limits or {}).items()
        ]
        self.gateway_token = (
            None
            if settings.gateway_token is None
            else settings.gateway_token.get_secret_value().encode()
        )

    def body_limit(self, path: str) -> int:
        """The largest body the route at `path` takes."""
        for pattern, limit in self.route_limits:
            if pattern.match(path):
                return limit
        return self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.body_limit(scope["path"])
        refusal = self.refusal(scope, limit)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a body sent without its length
                raise HTTPException(413, too_large(limit))
            return message

        await self.app(scope, receive_within_limit, send)

    def refusal(self, scope: Scope, limit: int) -> ASGIApp | None:
        headers = Headers(scope=scope)
        if (refused := host_refusal(scope, headers, self.allowed_hosts)) is not None:
            return refused
        query = scope.get("query_string", b"")
        if len(query) > MAX_QUERY_BYTES:
            return envelope(400, f"query string longer than {MAX_QUERY_BYTES} bytes")
        if (twice := _repeated(query)) is not None:
            return envelope(400, f"query parameter {twice} given more than once: send it once")
        if (refused := identity_refusal(scope["headers"])) is not None:
            return refused
        if (refused := cross_site_refusal(scope, headers)) is not None:
            return refused
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return envelope(413, too_large(limit))
        if self.gateway_token is not None and scope["path"] not in UNGATED:
            given = headers.get("x-devops-gateway-token", "").encode()
            if not hmac.compare_digest(given, self.gateway_token):
                return envelope(401, "missing or wrong X-DEVOPS-GATEWAY-TOKEN")
        return None


def host_refusal(scope: Scope, headers: Headers, allowed: frozenset[str]) -> ASGIApp | None:
    """A 400 for a request that came on a loopback address (the socket's: `scope["server"]`,
    as uvicorn gives it) and names another host in its Host: a page whose name its owner
    points at 127.0.0.1 after it loaded (DNS rebinding) is the console's own origin to the
    browser, and read every page and posted the console's forms (as anyone, under the open
    access of `dispatcher run`: review). `localhost`, the loopback addresses, `0.0.0.0`,
    `[::]` and `allowed` (DISPATCHER_ALLOWED_HOSTS: a proxy on the same host that forwards
    its public Host) pass, and so does every request on another address, where a rebound
    name cannot be told from a real one (the gateway token guards those). None when it
    passes."""
    server = scope.get("server")
    if not server or not _loopback(str(server[0])):
        return None
    host = _host_name(headers.get("host", "localhost"))
    if _loopback(host.strip("[]")) or host in _UNSPECIFIED or host in allowed or "*" in allowed:
        return None
    return envelope(
        400,
        f"Host {host[:64]!r} is not answered on a loopback address (DNS rebinding): use "
        "localhost or 127.0.0.1, or list the name in DISPATCHER_ALLOWED_HOSTS",
    )


# `0.0.0.0` and `[::]` (`dispatcher run --host 0.0.0.0` prints its URL so, and Linux sends
# a connection to them to 127.0.0.1): no page's Host is one, its own name is (review)
_UNSPECIFIED = frozenset(("0.0.0.0", "[::]"))


def _host_name(host: str) -> str:
    """The name or address in a Host header, lower case, without its port or a trailing
    dot; an IPv6 address keeps its brackets (`[::1]`)."""
    host = host.lower()
    name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
    return name.rstrip(".")


@functools.lru_cache(maxsize=256)
def _loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback address (127.0.0.0/8, ::1, or 127.x as
    an IPv6 socket gives it, `::ffff:127.0.0.1`)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def identity_refusal(headers: list[tuple[bytes, bytes]]) -> ASGIApp | None:
    """A 400 or 401 for an identity or token header given twice, or a user name that two
    were folded into (`alice, mallory`); None when each is given at most once."""
    given = [(name, value) for name, value in headers if name in ONCE]
    names = [name for name, _ in given]
    for name in names:
        if names.count(name) > 1:
            return envelope(
                ONCE[name],
                f"header {name.decode().upper()} given {names.count(name)} times: send it once "
                "(a gateway must set it, replacing what the caller sent)",
            )
    if any(name == b"x-devops-uid" and b"," in value for name, value in given):
        return envelope(
            400, "header X-DEVOPS-UID names more than one user (a ','): send one user name"
        )
    return None


def cross_site_refusal(scope: Scope, headers: Headers) -> ASGIApp | None:
    """A 403 for a change asked by another site's page (`Sec-Fetch-Site`, as browsers send
    it), a 415 for a change sent as a form or plain text: what such a page may send without
    asking first, carrying the gateway's cookie (cross-site request forgery). The API takes
    JSON or no body; the console's forms carry a token of their own. None otherwise."""
    if scope["method"] not in CHANGES or scope["path"].startswith(CONSOLE):
        return None
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return envelope(403, "a change asked by another site's page is refused (Sec-Fetch-Site)")
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media in FORM_TYPES:
        return envelope(
            415, f"Content-Type {media} is not taken: send application/json, or no body"
        )
    return None


def _repeated(query: bytes) -> str | None:
    """The first query parameter named twice, else None: no route takes a list, and the last
    one given won in silence (`role=admin&role=member` stored `member`; review), where a
    repeated identity header is refused. The name is shown escaped, at most 64 characters."""
    if b"&" not in query:
        return None
    names = [name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return repr(name[:64])
        seen.add(name)
    return None


def too_large(limit: int) -> str:
    """The 413's message, the same whether the length was declared or counted."""
    return f"request body larger than {limit} bytes"
