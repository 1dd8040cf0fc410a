"""Where deliveries may go: the per-region address policy, and the HTTP client per region.

Always refused: cloud-metadata hosts and addresses, unspecified addresses, dangerous ports.
Refused unless the region allows internal targets (an operator setting, or dev mode):
loopback, private, shared (CGNAT), link-local, multicast and reserved addresses.

The check runs at registration and again at delivery time, inside the client's DNS
resolver: the connection goes to the very address that was checked, so a DNS answer that
changes between check and connect (rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from httpx_aiohttp import AiohttpTransport

from dispatcher.errors import AddressRefused, InvalidUrl
from dispatcher.models import Region

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["DANGEROUS_PORTS", "AddressPolicy", "GuardedResolver", "make_transport", "policy_for"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "metadata.azure.com"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
DANGEROUS_PORTS = frozenset(
    {
        19, 21, 22, 23, 25, 53, 110, 111, 135, 137, 139, 143, 445, 465, 587, 993, 995,
        1433, 1521, 1883, 2049, 2375, 2376, 2379, 3306, 3389, 4222, 5432, 5672, 5984,
        6379, 6380, 8500, 9042, 9200, 9300, 11211, 15672, 26379, 27017,
    }
)  # fmt: skip


SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


def _is_internal(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _is_internal(ip.ipv4_mapped)
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip in SHARED_ADDRESS_SPACE
    )


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
        name = host.strip("[]").rstrip(".").lower()
        if name in METADATA_HOSTS:
            raise InvalidUrl(f"host {host!r} is a cloud metadata service", param="url")

    def check_address(self, ip: IPAddress, host: str) -> None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in METADATA_ADDRESSES:
            raise InvalidUrl(f"{host} -> {ip} is a cloud metadata address", param="url")
        if ip.is_unspecified:
            raise InvalidUrl(f"{host} -> {ip} is not a valid destination", param="url")
        if not self.allow_internal and _is_internal(ip):
            raise InvalidUrl(
                f"{host} -> {ip} is an internal address; the operator must allow internal "
                "targets for this region (DISPATCHER_ALLOW_INTERNAL_REGIONS)",
                param="url",
            )

    def check_url(self, url: str) -> None:
        """The checks that need no DNS: host name, literal address, port."""
        host, port = _host_port(url)
        self.check_origin(host, port)

    def check_origin(self, host: str, port: int) -> None:
        self.check_host(host)
        self.check_port(port)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        self.check_address(ip, host)

    def refusal(self, url: str) -> str | None:
        """Why `check_url` refuses `url`, or None; remembered per host and port (the
        checks cost tens of µs, and every attempt makes them)."""
        return _refusal(self, *_host_port(url))

    async def check_resolved(self, url: str) -> None:
        """`check_url`, then every address the host resolves to (a failed lookup passes:
        the delivery-time check will refuse it if it still fails or resolves badly)."""
        self.check_url(url)
        host = urlsplit(url).hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except UnicodeError:  # IDNA encoding: an empty, too long or invalid label
            raise InvalidUrl(f"url {url!r} has an invalid host name", param="url") from None
        except OSError:
            return
        for info in infos:
            self.check_address(ipaddress.ip_address(info[4][0]), host)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


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

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            self.policy.check_host(host)
            self.policy.check_port(port)
        except InvalidUrl as exc:
            raise AddressRefused(exc.message) from exc
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refusal: InvalidUrl | None = None
        for result in results:
            try:
                self.policy.check_address(ipaddress.ip_address(result["host"]), host)
            except InvalidUrl as exc:
                refusal = exc
                continue
            allowed.append(result)
        if refusal is not None and not allowed:
            raise AddressRefused(refusal.message)
        if not allowed:
            raise OSError(f"{host} did not resolve")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def policy_for(settings: Settings, region: Region) -> AddressPolicy:
    """The policy of `region`: internal targets only where the operator allowed them."""
    allowed = settings.dev_mode or region in settings.allow_internal_regions
    return AddressPolicy(allow_internal=allowed)


def make_transport(settings: Settings, region: Region) -> AiohttpTransport:
    """One long-lived httpx transport per region: its proxy, its address policy, aiohttp
    underneath (httpx's own pool slows down under concurrency). It never follows redirects."""
    policy = policy_for(settings, region)
    proxy_url = settings.region_proxies.get(region)

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            resolver=GuardedResolver(policy) if proxy_url is None else None,
            ssl=settings.verify_tls,
            keepalive_timeout=30,
        )
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)

    options: dict[str, Any] = {"client": session, "verify": settings.verify_tls}
    if proxy_url:
        options["proxy"] = httpx.Proxy(proxy_url)
    return AiohttpTransport(**options)
