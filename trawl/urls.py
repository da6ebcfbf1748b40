"""The one spelling of a URL's host and origin, for every place that keys something by them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["host_of", "origin_of", "split_plain"]

# userinfo ends at the authority's LAST "@" (a password may hold an unencoded "@", as urllib and browsers read it).
_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#\\]*)")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# The common spelling, read without urlsplit (~1 µs instead of ~8): a lower-case http(s) scheme, a plain host name
# or IPv4 address (no userinfo, brackets or escapes), an optional port. Anything else goes the long way.
_PLAIN = re.compile(r"(https?)://([A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?(?=[/?#]|\Z)")


def split_plain(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, lower-cased host, port or None) of a plainly spelled http(s) URL; None: use urlsplit."""
    m = _PLAIN.match(url)
    if m is None:
        return None
    scheme, host, port = m.groups()
    if port is None:
        return scheme, host.lower(), None
    n = int(port)
    return (scheme, host.lower(), n) if n <= 65535 else None


def host_of(url: str) -> str:
    """``host[:port]`` of an absolute URL, lower-cased, without ``user:password@``: what a host's gate, breaker,
    robots.txt, metrics label, frontier shard and Scrapy's scheduler are keyed by ("" for a relative URL)."""
    m = _AUTHORITY.match(url)
    return m.group(1).rpartition("@")[2].lower() if m else ""


def origin_of(url: str) -> str:
    """``scheme://host:port`` with the port always spelled out (``https://a.example:443``), lower-cased, without
    credentials: what a source's credentials are scoped to (RFC 6454 origin). "" when the URL has no host."""
    plain = split_plain(url)
    if plain is not None:
        return f"{plain[0]}://{plain[1]}:{plain[2] or _DEFAULT_PORTS[plain[0]]}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a malformed port or IPv6 literal: no origin, so no credentials go there
        return ""
    host = parts.hostname
    scheme = parts.scheme.lower()
    if not host or not scheme:
        return ""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS.get(scheme, 0)}"
