"""Forward proxies: which one carries a request, and benching the ones that fail.

A source (or the ``proxies`` setting) lists proxy URLs, credentials in their
``user:password@`` (from the environment: ``${VAR}``, masked wherever trawl
writes). :class:`ProxyPool` picks one per request (``per_request``: round
robin) or per target host (``sticky``: a host keeps its proxy while it works).
Each proxy has its own circuit breaker, fed only by failures to reach or use
the proxy itself (connection refused or reset by it, 407): after
``breaker_fail_max`` in a row it is benched for ``breaker_reset_timeout``
seconds and the others carry on; the target host's breaker and rate are not
touched by a proxy's failure.

The network guard still checks every target host (before the request, on each
redirect hop); the proxy's own address must be in ``allowed_networks`` when it
is not public, like any address trawl connects to.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from trawl.breakers import BreakerRegistry, HostBreaker
from trawl.errors import BreakerOpen, ProxyUnavailable

__all__ = ["Proxy", "ProxyPool", "ProxyRotation", "check_proxy_url", "proxy_label"]

ProxyRotation = Literal["per_request", "sticky"]
_SCHEMES = ("http", "https")


def check_proxy_url(value: str) -> str:
    """A proxy URL trawl can use (``http://`` or ``https://``, a host and a port, nothing after), else ValueError."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"malformed proxy URL {proxy_label(value)!r}: {exc}") from None
    if parts.scheme.startswith("socks"):
        raise ValueError(
            f"proxy {proxy_label(value)!r}: {parts.scheme}:// is not supported by trawl's transports here "
            "(aiohttp and httpx need aiohttp-socks / socksio for SOCKS); use an http:// or https:// proxy"
        )
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(f"not an http(s) proxy URL: {proxy_label(value)!r}")
    if port is None:
        raise ValueError(f"proxy {proxy_label(value)!r} needs a port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy {proxy_label(value)!r}: no path, query or fragment")
    return value


def proxy_label(url: str) -> str:
    """``scheme://host:port`` of a proxy URL, without its credentials: what logs and outcome rows show."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<malformed proxy URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy: its URL (credentials included) and the label it is shown by."""

    url: str
    label: str


class ProxyPool:
    """The proxies one source's requests go through, and their breakers (shared by every source using a proxy)."""

    def __init__(self, urls: Sequence[str], rotation: ProxyRotation, breakers: BreakerRegistry) -> None:
        self.proxies = tuple(Proxy(u, proxy_label(u)) for u in urls)
        self.rotation = rotation
        self._breakers = breakers
        self._turn = itertools.count()
        self._sticky: dict[str, int] = {}

    def breaker(self, proxy: Proxy) -> HostBreaker:
        return self._breakers.get(f"proxy {proxy.label}")

    def pick(self, host: str, url: str) -> tuple[Proxy, bool]:
        """The proxy for a request to ``host`` and whether it is its breaker's half-open probe.

        ``per_request`` takes the proxies in turn; ``sticky`` keeps a host on one
        proxy (first chosen by a stable hash of the host) and moves it on only
        while that one is benched. Benched proxies are passed over; when all are,
        ProxyUnavailable (nothing was sent).
        """
        n = len(self.proxies)
        if self.rotation == "sticky":
            start = self._sticky.get(host)
            if start is None:
                start = zlib.crc32(host.encode()) % n
        else:
            start = next(self._turn) % n
        for i in range(n):
            index = (start + i) % n
            proxy = self.proxies[index]
            try:
                probe = self.breaker(proxy).admit(url)
            except BreakerOpen:
                continue
            if self.rotation == "sticky":
                self._sticky[host] = index
            return proxy, probe
        raise ProxyUnavailable(f"every proxy is benched ({', '.join(p.label for p in self.proxies)})", url=url)
