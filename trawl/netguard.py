"""The network guard: which addresses a request may connect to, checked where the connection is made.

Every transport connects only to addresses :meth:`NetworkGuard.addresses` returned
(aiohttp through :class:`GuardedResolver`, httpx through its network backend,
Chromium through the in-process forward proxy, Scrapy through its aiohttp
handler), so the check and the connection use the same DNS answer. The earlier
:meth:`NetworkGuard.check` of a URL only turns a forbidden host into the URL's
``blocked_network`` outcome before anything is sent; its verdicts expire.

Resolution goes through :func:`resolve` (the system resolver) unless the guard
was given another; tests replace it to play a DNS answer that changes between
check and connect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import httpcore
from httpcore import SOCKET_OPTION

from trawl.errors import BlockedNetworkError, TransientFetchError

__all__ = [
    "GuardedBackend",
    "GuardedResolver",
    "NetworkGuard",
    "RefusedAddress",
    "Resolve",
    "UnresolvedHost",
    "resolve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: how the guard looks a host name up."""

VERDICT_TTL = 60.0
"""Seconds a host's verdict is trusted by :meth:`NetworkGuard.check` before it is looked up again."""


async def resolve(host: str, port: int) -> list[str]:
    """The system resolver (``getaddrinfo`` on the loop's executor): the host's addresses, IPv4 and IPv6."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


class RefusedAddress(OSError):
    """The guard refused every address of a host: raised where a transport connects (aiohttp reports it as
    the connection error's ``os_error``)."""


class UnresolvedHost(OSError):
    """The guard could not resolve a host: nothing is sent (fail closed); the attempt is retried as usual."""


class NetworkGuard:
    """Refuses hosts that resolve to loopback, private, link-local, CGNAT, multicast or reserved
    addresses unless one of the allowed networks contains them."""

    _CGNAT = ipaddress.ip_network("100.64.0.0/10")
    _NAT64 = ipaddress.ip_network("64:ff9b::/96")

    def __init__(self, allowed: list[str], *, resolver: Resolve | None = None, ttl: float = VERDICT_TTL) -> None:
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allowed]
        self._resolver = resolver
        self._ttl = ttl
        self._verdicts: dict[str, tuple[float, str | None]] = {}

    def forbidden(self, ip: IPAddress | str) -> bool:
        """Whether the guard refuses connections to this address."""
        if isinstance(ip, str):
            ip = ipaddress.ip_address(ip.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address):
            # IPv4 carried inside IPv6 (mapped, 6to4, Teredo, NAT64) is judged as the IPv4 it reaches.
            embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
            if embedded is None and ip in self._NAT64:
                embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            if embedded is not None:
                return self.forbidden(embedded)
        if any(ip in net for net in self._allowed):
            return False
        return (
            ip.is_loopback
            or ip.is_private
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
            or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
            or (isinstance(ip, ipaddress.IPv4Address) and ip in self._CGNAT)
        )

    async def addresses(self, host: str, port: int = 0) -> list[str]:
        """The addresses to connect to for ``host``: resolved now, every one allowed.

        Raises RefusedAddress when any answer is forbidden (a name that mixes public and
        private answers is refused whole, as an attacker's DNS would), UnresolvedHost when
        the lookup fails or answers nothing.
        """
        host = host.strip("[]").rstrip(".").lower()
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            lookup = self._resolver or resolve
            try:
                ips = await lookup(host, port)
            except (OSError, UnicodeError) as exc:
                raise UnresolvedHost(f"cannot resolve {host}: {exc}") from None
            if not ips:
                raise UnresolvedHost(f"cannot resolve {host}: no addresses") from None
        for ip in ips:
            if self.forbidden(ip):
                raise RefusedAddress(f"{host} resolves to {ip}, a network the settings do not allow")
        return ips

    async def check(self, url: str, host: str | None = None) -> None:
        """Raise BlockedNetworkError when the URL's host (``host``, if the caller split it) resolves to a
        forbidden address, TransientFetchError when it cannot be resolved (nothing is let through
        unchecked). Verdicts are kept for the guard's ``ttl``; failed lookups are not kept."""
        host = (urlsplit(url).hostname or "") if host is None else host
        now = time.monotonic()
        cached = self._verdicts.get(host)
        if cached is not None and cached[0] > now:
            reason = cached[1]
        else:
            try:
                await self.addresses(host)
                reason = None
            except RefusedAddress as exc:
                reason = str(exc)
            except UnresolvedHost as exc:
                raise TransientFetchError(str(exc), url=url) from None
            self._verdicts[host] = (now + self._ttl, reason)
        if reason:
            raise BlockedNetworkError(reason, url=url)

    def forget(self, host: str) -> None:
        """Drop a host's cached verdict (the next check looks it up again)."""
        self._verdicts.pop(host, None)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp resolver that returns only addresses the guard allows: aiohttp connects to exactly
    the addresses that were checked, so a DNS answer that changes after the guard's check never
    reaches a forbidden network."""

    def __init__(self, guard: NetworkGuard) -> None:
        self._guard = guard

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        ips = await self._guard.addresses(host, port)
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for ip in ips
            if family in (socket.AF_UNSPEC, 0) or (family == socket.AF_INET6) == (":" in ip)
        ]

    async def close(self) -> None:
        return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend (httpx's connections) that connects only to addresses the guard allows.

    ``connect_tcp(host, port)`` resolves through :meth:`NetworkGuard.addresses` and
    connects to the returned IPs in turn, so the address checked is the address
    connected to; TLS still verifies and sends SNI for the host name (httpcore calls
    ``start_tls(server_hostname=host)`` on the stream this returns). Raises
    RefusedAddress or UnresolvedHost, which reach the caller of the httpx request
    unchanged.
    """

    def __init__(self, guard: NetworkGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        ips = await self._guard.addresses(host, port)
        error: Exception | None = None
        for ip in ips:
            try:
                return await self._inner.connect_tcp(
                    ip, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:  # the next address, as getaddrinfo users do
                error = exc
        assert error is not None  # addresses() returns at least one address
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedAddress(f"unix socket {path}: only TCP connections to checked addresses are made")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
