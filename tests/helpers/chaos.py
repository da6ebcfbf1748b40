"""A chaos fleet: one in-process aiohttp server per misbehaviour, for proving the fetch layer.

Every behaviour gets its own loopback address (``127.0.0.10``, ``127.0.0.11``, ... in
:data:`BEHAVIOURS` order) and all of them share one port, so URLs differ only by host and the
crawler's per-host politeness, robots.txt cache and circuit breakers see distinct hosts.
All of 127.0.0.0/8 is on ``lo`` on Linux, so no configuration is needed.

==================  ===========================================================  ==========================================
behaviour           pages                                                        ``/robots.txt``
==================  ===========================================================  ==========================================
healthy             ``/`` index linking ``/products/1..N``; each product page    allow-all
                    links home and to three related products; ETag / 304
error500            every path: 500                                              500 (it is a request like any other)
retry_after         first request of each path: 503 + ``Retry-After: <s>``;      the same: 503 first, then allow-all
                    then a product page. ``/date/...`` gives an HTTP-date
burst429            the host's first K page requests: 429 (no Retry-After);      allow-all, never 429, not counted in K
                    then ``/`` links ``/products/1..5``                          (served from a cache in front)
reset               every path: TCP reset (SO_LINGER 0 + abort), no response;    reset too
                    one hit per attempt (trawl turns off aiohttp's own resend)
hang                every path: reads the request, never answers (an RST when    allow-all (so tests stay fast)
                    the fleet stops: shutdown never waits for it)
drip                every path: headers, then a product page a few bytes at      allow-all (so tests stay fast)
                    a time, every ``drip_interval`` s, ``drip_seconds`` in all
truncated           every path: Content-Length of a whole product page, half     allow-all (small bodies get through)
                    of it sent, then the connection closed
gzip_bomb           every path: ``Content-Encoding: gzip``, ~1 MiB that          the same bomb
                    inflates to ``bomb_bytes`` (1 GiB) of zeros
redirect_loop       ``/a`` -> 302 ``/b`` -> 302 ``/a`` ... forever                 allow-all
redirect_forbidden  ``/metadata`` -> 302 ``http://169.254.169.254/latest/``      allow-all
                    ``meta-data/``; ``/private-net`` -> 302 ``http://10.0.0.1/``
huge                ``/products/1``: a ``huge_bytes`` product page, chunked;     allow-all
                    ``/products/2``: the same with its Content-Length declared
malformed           ``/`` and ``/products/1..3``: invalid UTF-8, a NUL, unclosed  garbage bytes, junk lines and an
                    tags, unquoted attributes, a bogus charset; fields intact    unparseable Crawl-delay; allows all pages
robots              ``/`` links ``/public/products/1..3`` and                    ``Disallow: /private/``,
                    ``/private/products/1..2`` (private pages exist, counted)    ``Crawl-delay: <crawl_delay>``
throttle503         the first two requests of every path: 503 +                  the same: 503 twice, then allow-all
                    ``Retry-After: <throttle_after>``; then ``/`` links
                    ``/products/1..<throttle_pages>`` (20), each a product page
rate429             at most ``rate`` (5) answers per rolling second; past that   the same rule (robots.txt counts too)
                    429 + ``Retry-After: <rate_after>`` (1); ``/`` links
                    ``/products/1..<rate_pages>`` (50)
throttle_forever    every page: 429 + ``Retry-After: <throttle_after>``,         allow-all (so the pages are asked for)
                    for ever
==================  ===========================================================  ==========================================

The reset host is deterministic: every request is reset, there is no randomness anywhere. The
throttling hosts ask to slow down the way real sites and APIs do (a correct crawler slows down and
fetches every page of throttle503 and rate429; throttle_forever's pages end ``failed`` "throttled" once
``throttle_budget`` is spent). ``refusals`` keeps the time of every throttling answer, to check that
no request comes inside a ``Retry-After`` window.
:attr:`ChaosFleet.expected` says what a correct crawl of each host ends with, under
:data:`EXPECTED_SETTINGS` and :meth:`ChaosFleet.source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import math
import re
import socket
import struct
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from functools import lru_cache
from html import escape
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from trawl.demo.site import PRODUCT_COUNT, Product, ServerThread, product

__all__ = [
    "BEHAVIOURS",
    "EXPECTED_SETTINGS",
    "ChaosFleet",
    "ChaosFleetThread",
    "Expectation",
    "Hit",
    "gzip_bomb",
    "main",
]

BEHAVIOURS: Final[tuple[str, ...]] = (
    "healthy",
    "error500",
    "retry_after",
    "burst429",
    "reset",
    "hang",
    "drip",
    "truncated",
    "gzip_bomb",
    "redirect_loop",
    "redirect_forbidden",
    "huge",
    "malformed",
    "robots",
    "throttle503",
    "rate429",
    "throttle_forever",
)

EXPECTED_SETTINGS: Final[Mapping[str, Any]] = {
    # The fleet is on loopback; 169.254.0.0/16 and 10.0.0.0/8 stay forbidden.
    "allowed_networks": ["127.0.0.0/8"],
    "max_retries": 3,
    "backoff_base": 0.05,
    "backoff_max": 5.0,  # >= retry_after, so Retry-After is honoured in full
    "connect_timeout": 1.0,
    "read_timeout": 1.0,  # < hang_seconds; > drip_interval, so only total_timeout stops the drip
    "total_timeout": 2.0,  # < drip_seconds
    "max_redirects": 10,
    "max_body_bytes": 10 * 1024 * 1024,  # < huge_bytes and < bomb_bytes
    "breaker_fail_max": 5,
    "breaker_reset_timeout": 0.5,  # > any backoff sleep (0.05 * 2**3), so a retry after a trip meets an open breaker
    "breaker_requeues": 2,
    "robots_unavailable": "allow",
    "max_crawl_delay": 10.0,
    "per_host_delay": 0.0,
    "throttle_budget": 2.5,  # > a few Retry-After pauses of throttle_forever; throttle503 and rate429 never stall
}
"""The trawl settings (field names of ``trawl.settings.Settings``) that :attr:`ChaosFleet.expected` assumes.

``Settings(**EXPECTED_SETTINGS)`` gives them. With other values the table no longer holds:
it is worked out by hand from how trawl's fetcher retries, trips breakers and parks URLs.
"""

_FIRST_ADDRESS = "127.0.0.10"
_SHUTDOWN_TIMEOUT = 1.0
_BIND_ATTEMPTS = 20
_HITS_KEPT = 100_000
_CHUNK = 64 * 1024
_HTML = "text/html; charset=utf-8"
_ALLOW_ALL = "User-agent: *\nAllow: /\n"
_PRODUCT_PATH = re.compile(r"/products/(\d+)")
_RELATED_STEPS = (7, 13, 31, 37, 41, 43, 47, 53)
_BURST_PAGES = 5
_MALFORMED_PAGES = 3
_ROBOTS_PUBLIC = 3
_ROBOTS_PRIVATE = 2
_METADATA_URL = "http://169.254.169.254/latest/meta-data/"
_PRIVATE_NET_URL = "http://10.0.0.1/"

# What a record needs, as in the demo shop: the same selectors work on every host.
_FIELDS: Final[Mapping[str, Mapping[str, Any]]] = {
    "sku": {"selector": "span.sku", "required": True},
    "name": {"selector": "h1.name", "required": True},
    "price": {"selector": "p.price", "attr": "data-amount", "type": "float"},
    "category": {"selector": "span.category"},
}


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the fleet received: which host, which path, when (``time.monotonic()``)."""

    behaviour: str
    path: str
    at: float


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a correct crawl of one host ends with, under :data:`EXPECTED_SETTINGS` and :meth:`ChaosFleet.source`.

    ``outcomes`` counts the outcome kinds of every URL of the host the crawl touches (seeds and
    discovered links); ``requests`` is how often the host sees each path, robots.txt included
    (paths absent from it are never requested), over the aiohttp transport trawl's html connector uses;
    ``never_requested`` names paths a crawler must not ask for.
    """

    seeds: tuple[str, ...]
    outcome: str
    outcomes: Mapping[str, int]
    records: int
    requests: Mapping[str, int]
    never_requested: tuple[str, ...]
    why: str
    exact: bool = True
    """False where the host's answers depend on timing (the throttling hosts): ``requests`` are then minimums."""


# --- gzip bomb ----------------------------------------------------------------------------

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # no name, no mtime, max compression, unknown OS
_BOMB_BLOCK = 1 << 20


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from CRC(A), CRC(B) and len(B): zlib's ``crc32_combine``, which Python does not expose."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def _zeros_crc32(n: int) -> int:
    """CRC-32 of ``n`` zero bytes without touching ``n`` bytes (doubling with crc32_combine)."""
    crc, length = 0, 0
    piece_crc, piece_len = zlib.crc32(bytes(min(n, _BOMB_BLOCK))), min(n, _BOMB_BLOCK)
    blocks, rest = divmod(n, piece_len) if piece_len else (0, 0)
    while blocks:
        if blocks & 1:
            crc, length = _crc32_combine(crc, piece_crc, piece_len), length + piece_len
        blocks >>= 1
        if blocks:
            piece_crc, piece_len = _crc32_combine(piece_crc, piece_crc, piece_len), piece_len * 2
    if rest:
        crc = _crc32_combine(crc, zlib.crc32(bytes(rest)), rest)
    return crc


def _deflated_zeros(n: int) -> bytes:
    """Raw deflate of ``n`` zeros ending in a full flush: blocks that may be concatenated and repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return c.compress(bytes(n)) + c.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=4)
def gzip_bomb(size: int = 1 << 30) -> bytes:
    """A valid gzip stream that inflates to ``size`` zero bytes, built without ever holding them.

    A full flush resets the compressor, so the deflate of one 1 MiB block of zeros can simply
    be repeated; the CRC of the whole is combined arithmetically. 1 GiB gives about 1 MiB.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    blocks, rest = divmod(size, _BOMB_BLOCK)
    body = _deflated_zeros(_BOMB_BLOCK) * blocks + (_deflated_zeros(rest) if rest else b"")
    final = zlib.compressobj(9, zlib.DEFLATED, -15, 9).flush(zlib.Z_FINISH)  # an empty last block
    return _GZIP_HEADER + body + final + struct.pack("<II", _zeros_crc32(size), size & 0xFFFFFFFF)


# --- pages --------------------------------------------------------------------------------


def _sku(behaviour: str, i: int) -> str:
    # Unique across the fleet, so records keyed by sku never collapse across hosts.
    return f"SKU-{i:05d}" if behaviour == "healthy" else f"SKU-{behaviour.upper()}-{i:05d}"


def _product(behaviour: str, i: int) -> Product:
    base = product((i - 1) % PRODUCT_COUNT + 1)
    return dataclasses.replace(base, id=i, sku=_sku(behaviour, i))


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)} | Trawl Chaos Fleet</title>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        "</body>\n</html>\n"
    )


def _product_fields(p: Product) -> str:
    return (
        f'<article class="product" data-id="{p.id}">\n'
        f'<h1 class="name">{escape(p.name)}</h1>\n'
        f'<p>SKU: <span class="sku">{p.sku}</span></p>\n'
        f'<p class="price" data-amount="{p.price:.2f}">${p.price:,.2f}</p>\n'
        f'<p>Category: <span class="category">{escape(p.category)}</span></p>\n'
        f'<div class="description"><p>{escape(p.description)}</p></div>\n'
        "</article>"
    )


def _product_html(p: Product, links: Sequence[tuple[str, str]] = ()) -> str:
    nav = "".join(f'<li><a href="{escape(href)}">{escape(text)}</a></li>' for href, text in links)
    return _page(p.name, _product_fields(p) + (f'\n<nav><ul class="links">{nav}</ul></nav>' if nav else ""))


def _index_html(title: str, links: Sequence[tuple[str, str]]) -> str:
    items = "\n".join(f'<li><a href="{escape(href)}">{escape(text)}</a></li>' for href, text in links)
    return _page(title, f'<h1>{escape(title)}</h1>\n<ul class="products">\n{items}\n</ul>')


def _related(i: int, n: int) -> list[int]:
    out: list[int] = []
    for step in _RELATED_STEPS:
        c = (i * step) % n + 1
        if c != i and c not in out:
            out.append(c)
        if len(out) == 3:
            break
    return out


def _malformed_html(i: int, count: int) -> bytes:
    """A product page a browser would still render: broken markup and bytes, fields all there.

    The title is closed on purpose: an unclosed ``<title>`` is raw text to the end of the file.
    """
    p = _product("malformed", i)
    nxt = i % count + 1
    return (
        b"<html><head><title>Broken \xff\xfe shop</title>\n<body bgcolor=#fff>\n"
        b"<table><tr><td>menu<td><b><i>bold italic never closed\n"
        b'<div class="product"><h1 class="name">' + p.name.encode() + b" \xc3\x28</h1>\n"
        b'<p>SKU: <span class="sku">' + p.sku.encode() + b"</span>\n"
        b'<p class="price" data-amount="' + f"{p.price:.2f}".encode() + b'">$' + f"{p.price:.2f}".encode() + b"\n"
        b"<p>Category: <span class=category>" + escape(p.category).encode() + b"</span>\n"
        b"<p>nul \x00 byte, lone continuation \x80, overlong \xc0\xaf, cut \xe2\x82\n"
        b"<a href=/products/" + str(nxt).encode() + b">next (unquoted)</a>\n"
        b'<a href="/">home</a> <div><span><ul><li>never closed\n'
        b"<!-- an unterminated comment swallows the rest <a href=/nowhere>"
    )


def _malformed_index(count: int) -> bytes:
    links = b"".join(
        b"<li><a href=/products/" + str(i).encode() + b">item " + str(i).encode() for i in range(1, count + 1)
    )
    return b"<html><head><title>Broken \xe9 index</title><body><h1>Index<ul>" + links + b"<p>\xff\xfd trailing garbage"


_MALFORMED_ROBOTS = (
    b"\xef\xbb\xbf# robots.txt with junk \xff\xfe in it\r\n"
    b"User-agent: *\r\n"
    b"Disallow: /nothing-here/\r\n"
    b"this line has no colon \x80\x81\r\n"
    b"Crawl-delay: soon\r\n"
    b"<html><body>404 page pasted in</body></html>\n"
)


def _robots_txt(crawl_delay: float) -> str:
    return f"User-agent: *\nDisallow: /private/\nCrawl-delay: {crawl_delay:g}\n"


def _html_response(text: str | bytes, status: int = 200, content_type: str = _HTML) -> web.Response:
    body = text.encode() if isinstance(text, str) else text
    return web.Response(body=body, status=status, headers={"Content-Type": content_type})


def _abort(request: web.BaseRequest, *, reset: bool = True) -> None:
    """Drop the connection with no response; with ``reset`` the peer sees an RST, not a clean FIN."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(text=_page("Not found", "<h1>Not found</h1>"), content_type="text/html")


# --- the fleet ----------------------------------------------------------------------------


class ChaosFleet:
    """Serves every chosen behaviour on its own loopback address (one shared port) for an ``async with`` block.

    ``behaviours`` picks hosts (default: all of :data:`BEHAVIOURS`); ``pages`` sizes the healthy shop;
    ``retry_after`` is the seconds the retry_after host asks for (a non-integer is sent as is, which
    RFC 9110 does not allow but keeps tests fast); ``burst`` is how many page requests burst429 refuses;
    ``hang_seconds`` how long hang holds a request; ``drip_seconds`` / ``drip_interval`` how long a drip
    takes and the gap between its writes; ``huge_bytes`` and ``bomb_bytes`` the size of a huge page and
    of an inflated bomb; ``crawl_delay`` the robots host's ``Crawl-delay``; ``port`` the shared port
    (0: a free one) and ``first_address`` the address of the first behaviour in :data:`BEHAVIOURS`.

    ``requests`` counts ``(behaviour, path)``, ``totals`` counts requests per behaviour, and ``hits``
    keeps the last 100,000 requests with their times (to check Retry-After and Crawl-delay spacing).

    The throttling hosts: ``throttle_after`` is the ``Retry-After`` of throttle503 and throttle_forever (the
    issue's 2 s scaled down, so a crawl of the fleet stays short), ``throttle_pages`` the products of
    throttle503; rate429 answers at most ``rate`` requests per rolling second, then 429 with
    ``Retry-After: rate_after``, and has ``rate_pages`` products. ``refusals`` lists ``(behaviour, path,
    time, Retry-After)`` of every throttling answer.
    """

    def __init__(
        self,
        behaviours: Iterable[str] | None = None,
        *,
        pages: int = 50,
        retry_after: float = 2,
        burst: int = 3,
        hang_seconds: float = 3600.0,
        drip_seconds: float = 10.0,
        drip_interval: float = 0.25,
        huge_bytes: int = 20 * 1024 * 1024,
        bomb_bytes: int = 1 << 30,
        crawl_delay: float = 1.0,
        throttle_after: float = 0.5,
        throttle_pages: int = 20,
        rate: int = 5,
        rate_after: float = 1.0,
        rate_pages: int = 50,
        port: int = 0,
        first_address: str = _FIRST_ADDRESS,
    ) -> None:
        chosen = list(dict.fromkeys(BEHAVIOURS if behaviours is None else behaviours))
        unknown = [b for b in chosen if b not in BEHAVIOURS]
        if unknown:
            raise ValueError(f"unknown behaviours {unknown}; choose from {', '.join(BEHAVIOURS)}")
        if not chosen:
            raise ValueError("a fleet needs at least one behaviour")
        if pages < 1:
            raise ValueError("pages must be >= 1")
        if min(retry_after, hang_seconds, drip_seconds, crawl_delay, burst, huge_bytes, bomb_bytes, throttle_after) < 0:
            raise ValueError("times, counts and sizes must be >= 0")
        if min(throttle_pages, rate, rate_pages) < 1 or rate_after < 0:
            raise ValueError("times, counts and sizes must be >= 0")
        if drip_interval <= 0:
            raise ValueError("drip_interval must be > 0")
        first = ipaddress.IPv4Address(first_address)
        if not first.is_loopback or not (first + len(BEHAVIOURS) - 1).is_loopback:
            raise ValueError(f"{first_address} + {len(BEHAVIOURS) - 1} must stay inside 127.0.0.0/8")
        # Fixed per behaviour (not per position in the chosen subset), so a host is recognisable in any log.
        self.behaviours: tuple[str, ...] = tuple(b for b in BEHAVIOURS if b in chosen)
        self.addresses: dict[str, str] = {b: str(first + BEHAVIOURS.index(b)) for b in self.behaviours}
        self.pages = pages
        self.retry_after = retry_after
        self.burst = burst
        self.hang_seconds = hang_seconds
        self.drip_seconds = drip_seconds
        self.drip_interval = drip_interval
        self.huge_bytes = huge_bytes
        self.bomb_bytes = bomb_bytes
        self.crawl_delay = crawl_delay
        self.throttle_after = throttle_after
        self.throttle_pages = throttle_pages
        self.rate = rate
        self.rate_after = rate_after
        self.rate_pages = rate_pages
        self.refusals: list[tuple[str, str, float, float]] = []
        self._served: deque[float] = deque()  # rate429: when it answered, over the last second
        self.port = port
        self.requests: Counter[tuple[str, str]] = Counter()
        self.totals: Counter[str] = Counter()
        self.hits: deque[Hit] = deque(maxlen=_HITS_KEPT)
        self._runners: list[web.AppRunner] = []
        self._closing: asyncio.Event | None = None
        self._retried: set[str] = set()
        self._burst_seen = 0

    # --- addresses -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._runners)

    @property
    def hosts(self) -> dict[str, str]:
        """Behaviour -> base URL (``http://127.0.0.x:PORT``, no trailing slash); only while serving."""
        if not self._runners:
            raise RuntimeError("ChaosFleet is not running")
        return {b: f"http://{self.addresses[b]}:{self.port}" for b in self.behaviours}

    def url(self, behaviour: str, path: str = "/") -> str:
        """The full URL of ``path`` on a behaviour's host."""
        if behaviour not in self.addresses:
            raise KeyError(f"{behaviour!r} is not in this fleet ({', '.join(self.behaviours)})")
        return self.hosts[behaviour] + (path if path.startswith("/") else "/" + path)

    def _seed_paths(self, behaviour: str) -> tuple[str, ...]:
        return {
            "retry_after": ("/products/1", "/date/products/2"),
            "drip": ("/products/1",),
            "truncated": ("/products/1",),
            "redirect_loop": ("/a",),
            "redirect_forbidden": ("/metadata", "/private-net"),
            "huge": ("/products/1", "/products/2"),
        }.get(behaviour, ("/",))

    def seed_urls(self) -> list[str]:
        """Start URLs for a crawl over the whole fleet, hosts in :data:`BEHAVIOURS` order."""
        return [self.url(b, p) for b in self.behaviours for p in self._seed_paths(b)]

    def source(self, name: str = "chaos") -> dict[str, Any]:
        """An ``html`` source (as in a trawl config file) crawling the fleet from :meth:`seed_urls`.

        One record per ``/products/N`` page, keyed by sku (skus are unique across the fleet).
        """
        return {
            "name": name,
            "kind": "html",
            "start_urls": self.seed_urls(),
            "follow": {"max_depth": 3},
            "record_urls": r"/products/\d+$",
            "key": "sku",
            "fields": {k: dict(v) for k, v in _FIELDS.items()},
        }

    # --- what a correct crawler ends with ----------------------------------------------------

    @property
    def expected(self) -> dict[str, Expectation]:
        """Per behaviour, the outcome of a crawl of :meth:`source` under :data:`EXPECTED_SETTINGS`.

        Worked out from trawl's fetch path: robots.txt is fetched once per host through the same
        retries and breaker as pages (5xx/unreachable -> allow all, 4xx -> allow all); throttle signals
        (429, 503 with Retry-After) pause and slow the host and are retried without using a retry or
        counting for the breaker, until ``throttle_budget`` runs out at the slowest rate; transient
        failures (other 5xx, resets, timeouts, truncated bodies) are retried ``max_retries`` times;
        five consecutive transient failures open a host's breaker, after which a URL is parked and
        re-probed ``breaker_requeues`` times before ending ``skipped_breaker``; too-large bodies,
        too many redirects and forbidden networks fail at once.
        """
        s = EXPECTED_SETTINGS
        tries = int(s["max_retries"]) + 1
        fail_max = int(s["breaker_fail_max"])
        probes = int(s["breaker_requeues"])
        cap = int(s["max_body_bytes"])
        out: dict[str, Expectation] = {}
        for b in self.behaviours:
            seeds = tuple(self.url(b, p) for p in self._seed_paths(b))
            robots = {"/robots.txt": 1}
            never: tuple[str, ...] = ()
            exact = True
            if b == "healthy":
                reqs = {**robots, "/": 1, **{f"/products/{i}": 1 for i in range(1, self.pages + 1)}}
                e = ("fetched", {"fetched": self.pages + 1}, self.pages, reqs, "index + every product, once each")
            elif b == "throttle503":
                # Throttle signals neither use retries nor count for the breaker: every path is asked 3 times.
                n = self.throttle_pages
                reqs = {"/robots.txt": 3, "/": 3, **{f"/products/{i}": 3 for i in range(1, n + 1)}}
                e = ("fetched", {"fetched": n + 1}, n, reqs, "each path: 503 twice (the host pauses), then 200")
            elif b == "rate429":
                # How many 429s each path meets depends on timing: at least one request each, every page fetched.
                n, exact = self.rate_pages, False
                reqs = {**robots, "/": 1, **{f"/products/{i}": 1 for i in range(1, n + 1)}}
                e = ("fetched", {"fetched": n + 1}, n, reqs, "the crawler slows to the host's rate")
            elif b == "throttle_forever":
                exact = False
                reqs = {**robots, "/": 1}
                e = ("failed", {"failed": 1}, 0, reqs, "throttled past throttle_budget: failed, not skipped_breaker")
            elif b in ("error500", "reset"):
                # robots.txt fails `tries` times (then: allow all); the seed's first failure trips the breaker,
                # and each later probe fails too. One attempt is one request at the host: trawl turns off aiohttp's
                # own resend of an idempotent request on a dropped connection (RFC 9112 9.3.1).
                assert tries < fail_max <= tries + 1, "EXPECTED_SETTINGS changed: redo the breaker arithmetic"
                reqs = {"/robots.txt": tries, "/": 1 + probes}
                e = ("skipped_breaker", {"skipped_breaker": 1}, 0, reqs, "robots.txt fails, then the breaker opens")
            elif b == "retry_after":
                reqs = {"/robots.txt": 2, "/products/1": 2, "/date/products/2": 2}
                e = ("fetched", {"fetched": 2}, 2, reqs, "each path: 503, wait Retry-After, 200")
            elif b == "burst429":
                # 429 is a throttle signal: retried without using max_retries, however long the burst.
                products = {f"/products/{i}": 1 for i in range(1, _BURST_PAGES + 1)}
                reqs = {**robots, "/": self.burst + 1, **products}
                e = ("fetched", {"fetched": 1 + _BURST_PAGES}, _BURST_PAGES, reqs, "the index outlasts the burst")
            elif b in ("hang", "drip", "truncated"):
                limit = float(s["read_timeout"]) if b == "hang" else float(s["total_timeout"])
                slow = self.hang_seconds if b == "hang" else self.drip_seconds
                if b == "truncated" or slow > limit:
                    reqs = {**robots, self._seed_paths(b)[0]: tries}
                    e = ("failed", {"failed": 1}, 0, reqs, f"every attempt fails ({b}), retried {tries - 1} times")
                else:
                    reqs = {**robots, self._seed_paths(b)[0]: 1}
                    records = 1 if b == "drip" else 0
                    e = ("fetched", {"fetched": 1}, records, reqs, f"{b} ends within the timeout")
            elif b == "gzip_bomb":
                kind = "failed" if self.bomb_bytes > cap else "fetched"
                e = (kind, {kind: 1}, 0, {**robots, "/": 1}, "inflated body over max_body_bytes: permanent")
            elif b == "redirect_loop":
                hops = int(s["max_redirects"]) + 1
                reqs = {**robots, "/a": (hops + 1) // 2, "/b": hops // 2}
                e = ("failed", {"failed": 1}, 0, reqs, "more than max_redirects redirects: permanent")
            elif b == "redirect_forbidden":
                reqs = {**robots, "/metadata": 1, "/private-net": 1}
                e = ("blocked_network", {"blocked_network": 2}, 0, reqs, "the redirect target is link-local/private")
            elif b == "huge":
                kind = "failed" if self.huge_bytes > cap else "fetched"
                reqs = {**robots, "/products/1": 1, "/products/2": 1}
                e = (kind, {kind: 2}, 0 if kind == "failed" else 2, reqs, "body over max_body_bytes: permanent")
            elif b == "malformed":
                reqs = {**robots, "/": 1, **{f"/products/{i}": 1 for i in range(1, _MALFORMED_PAGES + 1)}}
                e = ("fetched", {"fetched": 1 + _MALFORMED_PAGES}, _MALFORMED_PAGES, reqs, "broken but parseable")
            else:  # robots
                public = {f"/public/products/{i}": 1 for i in range(1, _ROBOTS_PUBLIC + 1)}
                never = tuple(f"/private/products/{i}" for i in range(1, _ROBOTS_PRIVATE + 1))
                outcomes = {"fetched": 1 + _ROBOTS_PUBLIC, "skipped_robots": _ROBOTS_PRIVATE}
                e = ("fetched", outcomes, _ROBOTS_PUBLIC, {**robots, "/": 1, **public}, "private pages never asked for")
            kind, outcomes, records, reqs, why = e
            out[b] = Expectation(seeds, kind, outcomes, records, reqs, never, why, exact)
        return out

    # --- serving ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every host on one port (a free one when ``port`` is 0, read back into ``port``)."""
        if self._runners:
            raise RuntimeError("ChaosFleet already running")
        self._closing = asyncio.Event()
        self._retried.clear()
        self._burst_seen = 0
        self._served.clear()
        self.refusals.clear()
        wanted = self.port
        for attempt in range(_BIND_ATTEMPTS):
            runners: list[web.AppRunner] = []
            port = wanted
            try:
                for b in self.behaviours:
                    runner = web.AppRunner(self._app(b), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
                    await runner.setup()
                    runners.append(runner)
                    await web.TCPSite(runner, self.addresses[b], port).start()
                    port = int(runner.addresses[0][1])
            except OSError as exc:
                await asyncio.gather(*(r.cleanup() for r in runners))
                # The OS picked a port free on the first address only: another one may hold it. Pick again.
                if exc.errno == errno.EADDRINUSE and wanted == 0 and attempt < _BIND_ATTEMPTS - 1:
                    continue
                raise
            except BaseException:
                await asyncio.gather(*(r.cleanup() for r in runners))
                raise
            self.port = port
            self._runners = runners
            return

    async def stop(self) -> None:
        """Stop every host; hanging and dripping responses are cut off first, so this is quick."""
        if self._closing is not None:
            self._closing.set()
        runners, self._runners = self._runners, []
        await asyncio.gather(*(r.cleanup() for r in runners))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _counting(self, behaviour: str) -> Middleware:
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.requests[(behaviour, request.path)] += 1
            self.totals[behaviour] += 1
            self.hits.append(Hit(behaviour, request.path, time.monotonic()))
            return await handler(request)

        return count

    def _app(self, behaviour: str) -> web.Application:
        handlers: dict[str, tuple[Callable[[web.Request], Awaitable[web.StreamResponse]] | None, Handler]] = {
            "healthy": (None, self._healthy),
            "error500": (self._error500, self._error500),
            "retry_after": (self._retry_after, self._retry_after),
            "burst429": (None, self._burst429),
            "reset": (self._reset, self._reset),
            "hang": (None, self._hang),
            "drip": (None, self._drip),
            "truncated": (None, self._truncated),
            "gzip_bomb": (self._gzip_bomb, self._gzip_bomb),
            "redirect_loop": (None, self._redirect_loop),
            "redirect_forbidden": (None, self._redirect_forbidden),
            "huge": (None, self._huge),
            "malformed": (self._malformed_robots, self._malformed),
            "robots": (self._robots_robots, self._robots),
            "throttle503": (self._throttle503, self._throttle503),
            "rate429": (self._rate429, self._rate429),
            "throttle_forever": (None, self._throttle_forever),
        }
        robots, pages = handlers[behaviour]
        app = web.Application(middlewares=[self._counting(behaviour)])
        app.router.add_get("/robots.txt", robots or self._allow_all)
        app.router.add_get("/{tail:.*}", pages)
        return app

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short when the fleet stops; True when it is stopping."""
        assert self._closing is not None
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return False
        return True

    # --- handlers, one behaviour each ---------------------------------------------------------

    async def _allow_all(self, request: web.Request) -> web.Response:
        return web.Response(text=_ALLOW_ALL, content_type="text/plain")

    async def _healthy(self, request: web.Request) -> web.Response:
        path = request.path
        if path == "/":
            links = [(f"/products/{i}", _product("healthy", i).name) for i in range(1, self.pages + 1)]
            html = _index_html("Healthy shop", links)
        elif (m := _PRODUCT_PATH.fullmatch(path)) and 1 <= (i := int(m[1])) <= self.pages:
            related = [(f"/products/{r}", _product("healthy", r).name) for r in _related(i, self.pages)]
            html = _product_html(_product("healthy", i), [("/", "Home"), *related])
        else:
            raise _not_found()
        body = html.encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers={"ETag": etag})
        resp = _html_response(body)
        resp.headers["ETag"] = etag
        return resp

    async def _error500(self, request: web.Request) -> web.Response:
        return _html_response(_page("Server error", "<h1>500 Internal Server Error</h1>"), status=500)

    async def _retry_after(self, request: web.Request) -> web.Response:
        path = request.path
        if path not in self._retried:
            self._retried.add(path)
            if path.startswith("/date/"):
                # HTTP-dates have whole seconds: round up so a client never retries early.
                value = formatdate(math.ceil(time.time() + self.retry_after), usegmt=True)
            else:
                value = f"{self.retry_after:g}"
            resp = _html_response(_page("Busy", "<h1>503 Service Unavailable</h1>"), status=503)
            resp.headers["Retry-After"] = value
            return resp
        if path == "/robots.txt":
            return await self._allow_all(request)
        m = _PRODUCT_PATH.fullmatch(path.removeprefix("/date"))
        if path == "/":
            return _html_response(
                _index_html("Retry-After", [("/products/1", "seconds"), ("/date/products/2", "date")])
            )
        if m is None or int(m[1]) < 1:
            raise _not_found()
        return _html_response(_product_html(_product("retry_after", int(m[1]))))

    async def _burst429(self, request: web.Request) -> web.Response:
        self._burst_seen += 1
        if self._burst_seen <= self.burst:
            return _html_response(_page("Slow down", "<h1>429 Too Many Requests</h1>"), status=429)
        if request.path == "/":
            links = [(f"/products/{i}", _product("burst429", i).name) for i in range(1, _BURST_PAGES + 1)]
            return _html_response(_index_html("Burst", links))
        m = _PRODUCT_PATH.fullmatch(request.path)
        if m is None or not 1 <= int(m[1]) <= _BURST_PAGES:
            raise _not_found()
        return _html_response(_product_html(_product("burst429", int(m[1])), [("/", "Home")]))

    async def _reset(self, request: web.Request) -> web.Response:
        _abort(request)
        return web.Response()  # never written: the transport is gone, aiohttp drops it quietly

    async def _hang(self, request: web.Request) -> web.Response:
        await self._pause(self.hang_seconds)
        _abort(request)
        return web.Response()

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        body = _product_html(_product("drip", 1)).encode()
        steps = max(1, round(self.drip_seconds / self.drip_interval))
        size = max(1, -(-len(body) // steps))
        resp = web.StreamResponse(headers={"Content-Type": _HTML})
        resp.content_length = len(body)
        try:
            await resp.prepare(request)
            for at in range(0, len(body), size):
                if await self._pause(self.drip_interval):
                    _abort(request)
                    return resp
                await resp.write(body[at : at + size])
        except ConnectionError:
            pass  # the client gave up: exactly what a timeout should do
        return resp

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        body = _product_html(_product("truncated", 1)).encode()
        resp = web.StreamResponse(headers={"Content-Type": _HTML})
        resp.content_length = len(body)
        with contextlib.suppress(ConnectionError):
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()  # a clean FIN after the bytes already written: the body just stops
        return resp

    async def _gzip_bomb(self, request: web.Request) -> web.StreamResponse:
        data = gzip_bomb(self.bomb_bytes)
        ctype = "text/plain; charset=utf-8" if request.path == "/robots.txt" else _HTML
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Content-Encoding": "gzip"})
        resp.content_length = len(data)
        try:
            await resp.prepare(request)
            view = memoryview(data)
            for at in range(0, len(data), _CHUNK):
                await resp.write(view[at : at + _CHUNK])
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def _redirect_loop(self, request: web.Request) -> web.Response:
        targets = {"/a": "/b", "/b": "/a", "/": "/a"}
        if request.path not in targets:
            raise _not_found()
        raise web.HTTPFound(targets[request.path])

    async def _redirect_forbidden(self, request: web.Request) -> web.Response:
        targets = {"/metadata": _METADATA_URL, "/private-net": _PRIVATE_NET_URL}
        if request.path == "/":
            return _html_response(_index_html("Forbidden redirects", [(p, p) for p in targets]))
        if request.path not in targets:
            raise _not_found()
        raise web.HTTPFound(targets[request.path])

    def _huge_pieces(self, i: int) -> Iterator[bytes]:
        """Exactly ``huge_bytes`` bytes (at least head and tail): a product page padded with filler paragraphs."""
        p = _product("huge", i)
        head = _page(p.name, _product_fields(p) + "\n<section class='filler'>\n").encode()
        head, tail = head[: head.rindex(b"</main>")], b"</section>\n</main>\n</body>\n</html>\n"
        yield head
        filler = (b"<p>lorem ipsum dolor sit amet, consectetur adipiscing elit.</p>\n" * (_CHUNK // 64 + 1))[:_CHUNK]
        left = max(0, self.huge_bytes - len(head) - len(tail))
        while left > 0:
            piece = filler[: min(left, _CHUNK)]
            left -= len(piece)
            yield piece
        yield tail

    def _huge_size(self, i: int) -> int:
        head, tail = next(iter(self._huge_pieces(i))), b"</section>\n</main>\n</body>\n</html>\n"
        return max(self.huge_bytes, len(head) + len(tail))

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        m = _PRODUCT_PATH.fullmatch(request.path)
        if m is None or int(m[1]) not in (1, 2):
            raise _not_found()
        i = int(m[1])
        resp = web.StreamResponse(headers={"Content-Type": _HTML})
        if i == 2:
            resp.content_length = self._huge_size(i)
        else:
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for piece in self._huge_pieces(i):
                if self._closing is not None and self._closing.is_set():
                    _abort(request)
                    return resp
                await resp.write(piece)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def _malformed_robots(self, request: web.Request) -> web.Response:
        return web.Response(body=_MALFORMED_ROBOTS, headers={"Content-Type": "text/plain; charset=utf-8"})

    async def _malformed(self, request: web.Request) -> web.Response:
        if request.path == "/":
            return _html_response(_malformed_index(_MALFORMED_PAGES))
        m = _PRODUCT_PATH.fullmatch(request.path)
        if m is None or not 1 <= (i := int(m[1])) <= _MALFORMED_PAGES:
            raise _not_found()
        # The last page names a charset nobody knows: a client must fall back, not crash.
        ctype = "text/html; charset=x-no-such-charset" if i == _MALFORMED_PAGES else _HTML
        return _html_response(_malformed_html(i, _MALFORMED_PAGES), content_type=ctype)

    async def _robots_robots(self, request: web.Request) -> web.Response:
        return web.Response(text=_robots_txt(self.crawl_delay), content_type="text/plain")

    async def _robots(self, request: web.Request) -> web.Response:
        path = request.path
        if path == "/":
            links = [(f"/public/products/{i}", f"public {i}") for i in range(1, _ROBOTS_PUBLIC + 1)]
            links += [(f"/private/products/{i}", f"private {i}") for i in range(1, _ROBOTS_PRIVATE + 1)]
            return _html_response(_index_html("Robots", links))
        for area, count in (("public", _ROBOTS_PUBLIC), ("private", _ROBOTS_PRIVATE)):
            m = _PRODUCT_PATH.fullmatch(path.removeprefix(f"/{area}"))
            if path.startswith(f"/{area}/") and m and 1 <= (i := int(m[1])) <= count:
                # Public pages link to a private one, so a crawler meets disallowed links more than once.
                links = [("/", "Home"), (f"/private/products/{(i - 1) % _ROBOTS_PRIVATE + 1}", "members only")]
                p = _product("robots", i if area == "public" else 100 + i)
                return _html_response(_product_html(p, links))
        raise _not_found()

    def _slow_down(self, behaviour: str, request: web.Request, status: int, after: float) -> web.Response:
        self.refusals.append((behaviour, request.path, time.monotonic(), after))
        resp = _html_response(_page("Slow down", f"<h1>{status}</h1>"), status=status)
        resp.headers["Retry-After"] = f"{after:g}"
        return resp

    def _shop(self, behaviour: str, path: str, count: int) -> web.Response:
        """``/`` linking ``/products/1..count``, and those product pages (each links home)."""
        if path == "/robots.txt":
            return web.Response(text=_ALLOW_ALL, content_type="text/plain")
        if path == "/":
            links = [(f"/products/{i}", _product(behaviour, i).name) for i in range(1, count + 1)]
            return _html_response(_index_html(behaviour, links))
        m = _PRODUCT_PATH.fullmatch(path)
        if m is None or not 1 <= int(m[1]) <= count:
            raise _not_found()
        return _html_response(_product_html(_product(behaviour, int(m[1])), [("/", "Home")]))

    async def _throttle503(self, request: web.Request) -> web.Response:
        if self.requests[("throttle503", request.path)] <= 2:  # counted before the handler runs
            return self._slow_down("throttle503", request, 503, self.throttle_after)
        return self._shop("throttle503", request.path, self.throttle_pages)

    async def _rate429(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        served = self._served
        while served and served[0] <= now - 1.0:
            served.popleft()
        if len(served) >= self.rate:
            return self._slow_down("rate429", request, 429, self.rate_after)
        served.append(now)
        return self._shop("rate429", request.path, self.rate_pages)

    async def _throttle_forever(self, request: web.Request) -> web.Response:
        return self._slow_down("throttle_forever", request, 429, self.throttle_after)


class ChaosFleetThread(ServerThread[ChaosFleet]):
    """Runs a :class:`ChaosFleet` on its own event loop in a background thread.

    For sync code, benchmarks and tests that drive the crawler from a subprocess.
    """

    what = "chaos fleet"

    def __init__(self, behaviours: Iterable[str] | None = None, *, start_timeout: float = 10.0, **options: Any) -> None:
        super().__init__(ChaosFleet(behaviours, **options), start_timeout)
        self.fleet = self.server

    @property
    def hosts(self) -> dict[str, str]:
        """Behaviour -> base URL of the running fleet."""
        return self.fleet.hosts

    def url(self, behaviour: str, path: str = "/") -> str:
        """The full URL of ``path`` on a behaviour's host."""
        return self.fleet.url(behaviour, path)

    def seed_urls(self) -> list[str]:
        """Start URLs for a crawl over the whole fleet."""
        return self.fleet.seed_urls()

    @property
    def requests(self) -> Counter[tuple[str, str]]:
        """``(behaviour, path)`` request counts so far (written by the server thread)."""
        return self.fleet.requests

    @property
    def totals(self) -> Counter[str]:
        """Requests per behaviour so far."""
        return self.fleet.totals

    @property
    def expected(self) -> dict[str, Expectation]:
        """See :attr:`ChaosFleet.expected`."""
        return self.fleet.expected


async def _serve_forever(fleet: ChaosFleet) -> None:
    async with fleet:
        for behaviour, url in fleet.hosts.items():
            print(f"{behaviour:<20} {url}", flush=True)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.helpers.chaos``: serve the fleet until Ctrl-C, one ``behaviour URL`` line per host."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.helpers.chaos", description="Serve the trawl chaos fleet until Ctrl-C."
    )
    parser.add_argument("--behaviours", help=f"comma-separated subset of: {', '.join(BEHAVIOURS)} (default: all)")
    parser.add_argument("--port", type=int, default=0, help="port shared by every host; 0 picks a free one")
    parser.add_argument(
        "--first-address", default=_FIRST_ADDRESS, help=f"first host's address (default {_FIRST_ADDRESS})"
    )
    parser.add_argument("--pages", type=int, default=50, help="product pages on the healthy host (default 50)")
    parser.add_argument("--retry-after", type=float, default=2, help="seconds the retry_after host asks for")
    parser.add_argument("--burst", type=int, default=3, help="requests the burst429 host answers with 429")
    parser.add_argument("--drip-seconds", type=float, default=10.0, help="how long the drip host takes per page")
    parser.add_argument(
        "--throttle-after", type=float, default=0.5, help="Retry-After of throttle503 and throttle_forever"
    )
    args = parser.parse_args(argv)
    behaviours = [b.strip() for b in args.behaviours.split(",") if b.strip()] if args.behaviours else None
    try:
        fleet = ChaosFleet(
            behaviours,
            pages=args.pages,
            retry_after=args.retry_after,
            burst=args.burst,
            drip_seconds=args.drip_seconds,
            throttle_after=args.throttle_after,
            port=args.port,
            first_address=args.first_address,
        )
    except ValueError as exc:
        parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(fleet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
