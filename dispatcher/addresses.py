"""What a host or an address is, for the address policy (`dispatcher.egress`): the cloud
metadata services' names and addresses, internal ranges, the IPv4 address an IPv6 one
carries to, an address spelled as a host in any notation, a name as resolvers see it;
and the host and port a callback's URL connects to (`connect_url`, `target_of`)."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from yarl import URL

__all__ = [
    "LINK_LOCAL",
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "IPAddress",
    "connect_target",
    "connect_url",
    "embedded_ipv4",
    "host_name",
    "host_port",
    "is_internal",
    "literal_ip",
    "target_of",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names of cloud metadata services (each with its subdomains), compared without trailing
# dots, in lower case, IDNA-decoded.
METADATA_HOSTS = (
    "metadata",
    "metadata.google.internal",  # GCP
    "metadata.goog",  # GCP
    "metadata.azure.com",  # Azure
    "metadata.tencentyun.com",  # Tencent Cloud
    "instance-data",  # AWS
    "instance-data.ec2.internal",  # AWS
    "api.metadata.cloud.ibm.com",  # IBM Cloud
    "metadata.platformequinix.com",  # Equinix Metal
    "metadata.packet.net",  # Equinix Metal (formerly Packet)
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud (classic)
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS over IPv6 (metadata)
        "fd00:ec2::253",  # AWS over IPv6 (DNS)
    )
)
# Link-local: 169.254.169.254 (AWS, GCP, Azure, OpenStack, ...), 169.254.169.253 (AWS DNS),
# 169.254.170.2 (ECS task credentials) and their IPv6 counterparts all live there.
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def is_internal(ip: IPAddress) -> bool:
    """Loopback, private, link-local, multicast, reserved or shared (CGNAT)."""
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip in SHARED_ADDRESS_SPACE
    )


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to (mapped, compatible, NAT64, 6to4,
    Teredo), if any: the packets end up there."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # IPv4-compatible, ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(value)
    if ip in NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def literal_ip(host: str) -> IPAddress | None:
    """The address `host` spells, in any notation resolvers accept (`2852039166`,
    `0xa9.0xfe.0xa9.0xfe`, `169.254.43518`, `127.0.0.1.`), or None for a name."""
    host = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def host_name(host: str) -> str:
    """A host name as resolvers see it: lower case, no trailing dots, IDNA-decoded (so
    that `metadata。google。internal` is `metadata.google.internal`)."""
    name = host.strip("[]").rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").rstrip(".").lower()
        except UnicodeError:
            return name
    return name


def host_port(host: str, port: int) -> str:
    """`host:port` as written in a URL: an IPv6 address in brackets (`[::1]:443`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_target(url: str) -> tuple[str, int]:
    """The host and port a request to `url` connects to (`connect_url`)."""
    return target_of(connect_url(url))


@functools.lru_cache(maxsize=16_384)  # ~4 KB an entry of 2 KB, once aiohttp used it
def connect_url(url: str) -> URL:
    """`url` as aiohttp reads it, a request's only parse: yarl's (NFKC-normalised and
    IDNA-encoded: a host spelled in full-width or segmented digits is 127.0.0.1 to it,
    where `urlsplit` keeps it as spelled). The policy checks its host (`target_of`), never
    another parse's, and the request is sent to this object. Raises ValueError when yarl
    cannot parse `url`, or `urlsplit` cannot read its port (`+22`, full-width digits: yarl
    reads both). Callback URLs repeat: each is parsed once while it is remembered (one
    cache for the callback's `Destination` and its requests: each new URL was parsed
    twice)."""
    urlsplit(url).port  # noqa: B018  # raises on a port it cannot read
    return URL(url)


def target_of(target: URL) -> tuple[str, int]:
    """The host and port a request to `target` connects to."""
    port = target.port
    return target.raw_host or "", port if port is not None else (
        443 if target.scheme == "https" else 80
    )
