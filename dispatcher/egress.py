"""Where deliveries may go: the per-region address policy, and the HTTP client per region.

Always refused, in every region (internal ones and dev mode included): cloud-metadata hosts
and addresses (all of link-local, 169.254.0.0/16 and fe80::/10, the known metadata
addresses elsewhere, the known metadata names and their subdomains), in any notation (an
IPv4 address written as one number or in hex, or inside an IPv6 address: mapped,
compatible, NAT64, 6to4, Teredo), unspecified addresses, dangerous ports.
Refused unless the region allows internal targets (an operator setting, or dev mode):
loopback, private, shared (CGNAT), multicast and reserved addresses.

The check runs at registration and again at delivery time. In a direct region it runs
inside the client's DNS resolver: aiohttp connects to the addresses that resolver returned
(its DNS cache holds only those, and happy eyeballs is handed them as numbers), so a DNS
answer that changes between check and connect (rebinding) cannot slip through. Through a
proxy the proxy resolves the name itself: the worker checks the addresses it resolves
first, and refuses a name it cannot resolve unless the operator declares that the region's
proxy enforces the policy (`DISPATCHER_PROXY_ENFORCED_REGIONS`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from dispatcher.addresses import (
    LINK_LOCAL,
    METADATA_ADDRESSES,
    METADATA_HOSTS,
    IPAddress,
    connect_target,
    embedded_ipv4,
    host_name,
    is_internal,
    literal_ip,
)
from dispatcher.errors import AddressRefused, InvalidUrl
from dispatcher.lookups import OWNER, Names, bounded
from dispatcher.models import Region

if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextlib import AbstractAsyncContextManager

    from aiohttp.client_proto import ResponseHandler
    from aiohttp.connector import Connection
    from aiohttp.http import RawResponseMessage
    from aiohttp.streams import StreamReader

    from dispatcher.settings import Settings

__all__ = [
    "DANGEROUS_PORTS",
    "AddressPolicy",
    "Client",
    "GuardedResolver",
    "policy_for",
]

log = structlog.get_logger("dispatcher.egress")

DANGEROUS_PORTS = frozenset((
    19, 21, 22, 23, 25, 53, 110, 111, 135, 137, 139, 143, 445, 465,
    587, 993, 995, 1433, 1521, 1883, 2049, 2375, 2376, 2379, 3306, 3389, 4222, 5432,
    5672, 5984, 6379, 6380, 8500, 9042, 9200, 9300, 11211, 15672, 26379, 27017,
))  # fmt: skip


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which hosts, addresses and ports one region may reach."""

    allow_internal: bool = False

    def check_port(self, port: int) -> None:
        if port in DANGEROUS_PORTS:
            raise InvalidUrl(
                f"port {port} is refused (reserved for non-HTTP services)", param="url"
            )

    def check_host(self, host: str) -> None:
        name = host_name(host)
        if any(name == known or name.endswith("." + known) for known in METADATA_HOSTS):
            raise InvalidUrl(
                f"host {name!r} is a cloud metadata service: refused in every region",
                param="url",
            )
        # RFC 6761: whatever resolves them (a proxy's resolver included) answers loopback
        if not self.allow_internal and (name == "localhost" or name.endswith(".localhost")):
            raise InvalidUrl(
                f"host {name!r} is a loopback name, an internal address; the operator must "
                "allow internal targets for this region (DISPATCHER_ALLOW_INTERNAL_REGIONS)",
                param="url",
            )

    def check_address(self, ip: IPAddress, host: str) -> None:
        """Refuses `ip`, `host`'s address, unless the policy allows it. For a name, the
        message says what kind of address it resolves to, never the address: that is the
        platform's DNS, not the tenant's to map (`refused_name` logs it for the operator)."""
        if isinstance(ip, ipaddress.IPv6Address) and (v4 := embedded_ipv4(ip)) is not None:
            ip = v4
        if (what := self._refused(ip)) is None:
            return
        if literal_ip(host) is None:
            raise InvalidUrl(f"host {host_name(host)!r} resolves to {what}", param="url")
        raise InvalidUrl(f"{host} -> {ip} is {what}", param="url")

    def _refused(self, ip: IPAddress) -> str | None:
        """What kind of refused address `ip` is, or None."""
        if ip in METADATA_ADDRESSES:
            return "a cloud metadata address: refused in every region"
        if any(ip in network for network in LINK_LOCAL):
            return (
                "a link-local address, where cloud metadata services answer: refused in "
                "every region"
            )
        if ip.is_unspecified:
            return "an unspecified address, not a valid destination"
        if not self.allow_internal and is_internal(ip):
            return (
                "an internal address; the operator must allow internal targets for this "
                "region (DISPATCHER_ALLOW_INTERNAL_REGIONS)"
            )
        return None

    def check_url(self, url: str) -> None:
        """The checks that need no DNS: host name, literal address, port."""
        host, port = _host_port(url)
        self.check_origin(host, port)

    def check_origin(self, host: str, port: int) -> None:
        self.check_host(host)
        self.check_port(port)
        if (ip := literal_ip(host)) is not None:
            self.check_address(ip, host)
            if isinstance(ip, ipaddress.IPv4Address) and host != str(ip):  # aiohttp refuses
                raise InvalidUrl(  # `2130706433`, `127.1`, `010.0.0.1`, `8.8.8.8.` to send
                    f"host {host!r} is an IPv4 address written another way; write it {ip}",
                    param="url",
                )

    def refusal(self, url: str) -> str | None:
        """Why `check_url` refuses `url`, or None (see `refusal_at`)."""
        return self.refusal_at(*_host_port(url))

    def refusal_at(self, host: str, port: int) -> str | None:
        """Why `check_url` refuses a URL to `host` and `port`, or None; remembered per host
        and port (the checks cost tens of µs, and every attempt makes them)."""
        return _refusal(self, host, port)

    async def check_resolved(self, url: str, *, must_resolve: bool = False) -> None:
        """`check_url`, then every address the host resolves to. A name that does not
        resolve passes at registration (the delivery-time check refuses it if it still
        fails or resolves badly); with `must_resolve` (a delivery through a proxy that does
        not enforce the policy, which would resolve the name itself, unchecked) it is
        refused, and a temporary lookup failure is raised as the `OSError` it is."""
        host, port = _host_port(url)
        self.check_origin(host, port)
        try:
            infos = await bounded(lambda: asyncio.get_running_loop().getaddrinfo(host, None))
        except UnicodeError:  # IDNA encoding: an empty, too long or invalid label
            raise InvalidUrl(f"url {url!r} has an invalid host name", param="url") from None
        except OSError as exc:
            if not must_resolve:
                return
            if isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN:
                raise InvalidUrl(
                    f"host {host_name(host)!r} does not resolve from the worker "
                    f"({exc.strerror}), so its address cannot be checked; the region's "
                    "proxy would resolve it unchecked (DISPATCHER_PROXY_ENFORCED_REGIONS "
                    "declares a proxy that enforces the address policy itself)",
                    param="url",
                ) from None
            raise
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            try:
                self.check_address(ip, host)
            except InvalidUrl as exc:
                refused_name(host, ip, exc)
                raise


def refused_name(host: str, ip: IPAddress, refusal: InvalidUrl) -> None:
    """The operator's log line of a host refused for the address it resolved to, with that
    address, which the tenant's message leaves out (none for a literal address)."""
    if literal_ip(host) is None:
        log.warning(
            "egress.refused", host=host_name(host), address=str(ip), project=OWNER.get(),
            refusal=refusal.message,
        )  # fmt: skip


def _host_port(url: str) -> tuple[str, int]:
    """`connect_target`, its malformed URLs refused."""
    try:
        return connect_target(url)
    except ValueError as exc:
        raise InvalidUrl(f"url is malformed: {exc}", param="url") from None


@functools.lru_cache(maxsize=4096)
def _refusal(policy: AddressPolicy, host: str, port: int) -> str | None:
    try:
        policy.check_origin(host, port)
    except InvalidUrl as exc:
        return exc.message
    return None


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses connections to addresses the policy forbids."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = DefaultResolver()
        self._names: Names[list[ResolveResult]] = Names()  # each owner's, apart

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            self.policy.check_host(host)
            self.policy.check_port(port)
        except InvalidUrl as exc:
            raise AddressRefused(exc.message) from exc
        results = await self._names.get(
            (host, port, family), lambda: self._inner.resolve(host, port, family)
        )
        allowed: list[ResolveResult] = []
        refusal: tuple[IPAddress, InvalidUrl] | None = None
        for result in results:
            ip = ipaddress.ip_address(result["host"])
            try:
                self.policy.check_address(ip, host)
            except InvalidUrl as exc:
                refusal = ip, exc
                continue
            allowed.append(result)
        if refusal is not None and not allowed:
            refused_name(host, *refusal)
            raise AddressRefused(refusal[1].message)
        if not allowed:
            raise OSError(f"{host} did not resolve")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


MAX_INFORMATIONAL = 8  # 1xx answers a request may get before its status


class TooManyInformational(aiohttp.ClientError):
    """The receiver sent more informational (1xx) answers than a request may get."""

    def __init__(self) -> None:
        super().__init__(
            f"the receiver sent more than {MAX_INFORMATIONAL} informational (1xx) answers"
        )


class _Response(aiohttp.ClientResponse):
    """aiohttp's response, its informational answers capped, its connection closed after a
    status no request ends with. `start` skips 1xx answers one after another, without end
    or yielding while they are buffered: a receiver streaming `103 Early Hints` held the
    worker's loop until the total timeout. Each message `start` reads is seen on the way
    (the connection's `read`, wrapped for that call alone): past the cap it raises, and
    aiohttp closes the connection; a status outside 200-599 (a bare `101`, no `Upgrade`)
    marks it to close when released: it went back to the pool, and the next delivery to
    that host and port, another project's too, was written into the switched protocol."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        if (handler := connection.protocol) is None:  # aiohttp's own start says what's wrong
            return await super().start(connection)
        protocol: ResponseHandler = handler  # (a property: read once)
        read, seen = protocol.read, 0

        async def counted() -> tuple[RawResponseMessage, StreamReader]:
            nonlocal seen
            message, payload = await read()
            if 200 <= message.code < 600:
                return message, payload
            if 100 <= message.code < 200 and message.code != 101:  # what `start` skips
                seen += 1
                if seen > MAX_INFORMATIONAL:
                    raise TooManyInformational
            else:  # the answer, released when its (empty) body ends: never to be reused
                protocol.force_close()
            return message, payload

        protocol.read = counted  # type: ignore[method-assign]
        try:
            return await super().start(connection)
        finally:
            del protocol.read


def policy_for(settings: Settings, region: Region) -> AddressPolicy:
    """The policy of `region`: internal targets only where the operator allowed them."""
    allowed = settings.dev_mode or region in settings.allow_internal_regions
    return AddressPolicy(allow_internal=allowed)


class Client:
    """One region's long-lived HTTP client for deliveries: an aiohttp session (made on
    first use, inside the running loop) with the region's proxy and address policy. It
    never follows redirects, never decompresses, keeps no cookies, and keeps connections
    alive 30 s.

    Deliveries use aiohttp directly: httpx's request and response models (its header
    objects above all) cost as much CPU as aiohttp's whole exchange (bench/README.md)."""

    def __init__(self, settings: Settings, region: Region) -> None:
        self.settings = settings
        self.policy = policy_for(settings, region)
        self.proxy: URL | None = None
        # credentials in the proxy's URL go as a Proxy-Authorization header, built once
        # (aiohttp's own way, BasicAuth, is deprecated)
        self._proxy_login: dict[str, str] | None = None
        if (proxy_url := settings.region_proxies.get(region)) is not None:  # checked at start
            self.proxy = URL(proxy_url)
            if self.proxy.user is not None:
                login = f"{self.proxy.user}:{self.proxy.password or ''}".encode()
                basic = f"Basic {base64.b64encode(login).decode()}"
                self._proxy_login = {"Proxy-Authorization": basic}
                self.proxy = self.proxy.with_user(None)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        settings = self.settings
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            limit_per_host=settings.max_per_host,  # the worker's shares keep below it
            resolver=GuardedResolver(self.policy) if self.proxy is None else None,
            # lookups counted and kept as their owner's (`lookups.Names`): aiohttp's cache
            # shares one lookup of a host among callers, held by the first's owner
            use_dns_cache=False,
            ssl=settings.verify_tls,
            keepalive_timeout=30,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            proxy=self.proxy,
            response_class=_Response,
            # no cookies kept: one jar is every project's (a cookie set for one went with
            # another's deliveries to its host), and what it sent no record would show
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """POST `body` to `url`: the response, open to read, closed on leaving."""
        if self._session is None:
            self._session = self._open()
        login = self._proxy_login
        tunnelled = url.scheme == "https"  # through a CONNECT: the login goes on it alone
        if login is not None and not tunnelled:  # to the proxy itself, which drops it
            headers = {**headers, **login}
        return self._session.post(
            url,
            data=body,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            proxy_headers=login if tunnelled else None,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
