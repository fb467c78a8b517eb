"""Where outbound calls may connect: the private-address guard, applied to resolved IPs at connect time.

Two kinds of outbound call take a URL a tenant admin typed: webhook tools (`tools.webhooks`) and
provider credentials (`llm`). Both go through this guard, each with its own rule (an
`EgressRule`, read from settings at connect time): lowest in the layers, so `tenants` (the
credential's form), `llm` and `tools` share it.

A hostname is only a name: it can resolve to 10.0.0.5 or 169.254.169.254 today, and to something
else between a check and a connect (DNS rebinding). So the guard sits in the network backend of
the HTTP client. For each new connection it resolves the host once, refuses the connection when
any resolved address is disallowed, and then connects to the validated IP itself; TLS
certificate checks and SNI still use the URL's hostname, and the Host header is the URL's.

Disallowed: loopback, private, link-local, multicast, reserved, unspecified and anything not
globally routable, IPv4-mapped IPv6 included. A rule may lift that (`TOOLS_WEBHOOK_ALLOW_PRIVATE`;
`PROVIDER_ALLOW_PRIVATE_URLS`, or only for `PROVIDER_ALLOWED_NETWORKS`), except for the cloud
metadata endpoints, which are never reachable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore2
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# AWS, GCP, Azure, OpenStack (IPv4, link-local) and AWS's IPv6 (Nitro) instance metadata.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class AddressRefused(Exception):
    """The host resolves to an address Parley must not connect to."""


@dataclass(frozen=True)
class EgressRule:
    """Which non-public addresses one kind of outbound call may reach (metadata: never)."""

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def refusal(self, address: IPAddress) -> str | None:
        return address_refusal(address, allow_private=self.allow_private, allowed_networks=self.allowed_networks)


def webhook_rule() -> EgressRule:
    return EgressRule(allow_private=bool(getattr(settings, "TOOLS_WEBHOOK_ALLOW_PRIVATE", False)))


def provider_rule() -> EgressRule:
    networks = tuple(ipaddress.ip_network(network, strict=False) for network in settings.PROVIDER_ALLOWED_NETWORKS)
    return EgressRule(allow_private=settings.PROVIDER_ALLOW_PRIVATE_URLS, allowed_networks=networks)


def address_refusal(
    address: IPAddress, *, allow_private: bool, allowed_networks: tuple[IPNetwork, ...] = ()
) -> str | None:
    """Why `address` is refused, or None when it may be connected to."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private or any(address in network for network in allowed_networks):
        return None
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not address.is_global:
        return "an address that is not publicly routable"
    return None


async def address_resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order (IP literals resolve to themselves)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        # Scope ids ("fe80::1%eth0") are not part of the address.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def addresses_allowed(host: str, port: int, *, timeout: float | None, rule: EgressRule) -> list[IPAddress]:
    """Resolve `host` and return its addresses if every one of them is allowed.

    Raises AddressRefused, or httpcore2.ConnectError when the name does not resolve."""
    try:
        addresses = await asyncio.wait_for(address_resolve(host, port), timeout)
    except (OSError, UnicodeError) as error:
        raise httpcore2.ConnectError(f"could not resolve {host}: {error}") from None
    except TimeoutError:
        raise httpcore2.ConnectTimeout(f"resolving {host} timed out") from None
    if not addresses:
        raise httpcore2.ConnectError(f"{host} has no address")
    for address in addresses:
        reason = rule.refusal(address)
        if reason is not None:
            # Refuse the host outright, even if another of its addresses is public: which one a
            # client would pick is not ours to predict.
            raise AddressRefused(f"{host} resolves to {reason}")
    return addresses


class GuardedBackend(httpcore2.AsyncNetworkBackend):
    """An httpcore network backend that connects only to validated addresses."""

    def __init__(self, rule: Callable[[], EgressRule]) -> None:
        self._inner = httpcore2.AnyIOBackend()
        self._rule = rule  # read at each connect: settings may change under a long-lived client

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await addresses_allowed(host, port, timeout=timeout, rule=self._rule())
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as error:
                last_error = error
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise AddressRefused("outbound calls connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def url_address_refusal(url: str, rule: EgressRule) -> str | None:
    """Save-time check of a URL a tenant admin typed: why it may not be used, or None.

    Resolves the host now (synchronously: forms are sync) and refuses it when any address is
    disallowed. A name that does not resolve here is not refused: every connect checks again."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "the URL must use http or https"
    if not host:
        return "the URL has no host"
    if parts.username or parts.password:
        return "the URL must not carry credentials"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for *_, sockaddr in infos:
        reason = rule.refusal(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        if reason is not None:
            return f"{host} resolves to {reason}"
    return None


def provider_url_refusal(url: str) -> str | None:
    """Why a provider credential may not point at `url` (the admin form, create_tenant)."""
    return url_address_refusal(url, provider_rule())
