"""The one spelling of a URL's host, for every place that keys something by host."""

from __future__ import annotations

import re

__all__ = ["host_of"]

_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?([^/?#]*)")


def host_of(url: str) -> str:
    """``host[:port]`` of an absolute URL, lower-cased, without ``user:password@``: what a host's gate, breaker,
    robots.txt, metrics label, frontier shard and Scrapy's scheduler are keyed by ("" for a relative URL)."""
    m = _AUTHORITY.match(url)
    return m.group(1).lower() if m else ""
