"""Sitemaps (sitemaps.org): the URLs a site lists, with their ``lastmod``, read as a stream.

A sitemap is parsed while it is decompressed (lxml's pull parser fed in chunks,
each ``<url>`` element dropped once read), so a 50,000-URL file never sits in
memory as a tree. Sitemap indexes are followed (nested up to
:data:`MAX_NESTING` levels, each sitemap read once); gzip'd sitemaps are
inflated whether or not the server says ``Content-Encoding``. The protocol's
limits hold: at most 50,000 URLs and 50 MiB (uncompressed) per file; what lies
beyond is dropped with a warning, as search engines do.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import structlog
from lxml import etree

__all__ = [
    "MAX_BYTES",
    "MAX_NESTING",
    "MAX_URLS",
    "SitemapEntry",
    "SitemapError",
    "parse_sitemap",
    "sitemap_entries",
]

log = structlog.get_logger("trawl.sitemaps")

MAX_URLS = 50_000
"""URLs (or child sitemaps) one sitemap file may list (sitemaps.org)."""
MAX_BYTES = 50 * 1024 * 1024
"""Largest sitemap file, uncompressed (sitemaps.org: 50 MiB)."""
MAX_NESTING = 3
"""Levels of sitemap indexes followed below a configured sitemap (an index of indexes of sitemaps)."""
_CHUNK = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


class SitemapError(ValueError):
    """A sitemap that cannot be read (not XML, not a sitemap, over the size limit)."""


@dataclass(frozen=True, slots=True)
class SitemapEntry:
    """One ``<loc>`` of a sitemap: a page (``index`` False) or a child sitemap of an index."""

    url: str
    lastmod: str | None
    index: bool = False


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def parse_sitemap(body: bytes, url: str) -> Iterator[SitemapEntry]:
    """The entries of one sitemap document (``urlset`` or ``sitemapindex``), gzip'd or not, in document order.

    Streamed: the body is inflated and parsed in chunks and each entry's element is
    freed once read. Stops after :data:`MAX_URLS` entries (a warning says how many
    were dropped) and fails past :data:`MAX_BYTES` of XML. Relative ``<loc>``s are
    resolved against ``url``; entries that are not http(s) are skipped.
    """
    parser = etree.XMLPullParser(
        events=("start", "end"), resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )
    root: str | None = None
    count = dropped = 0
    seen_bytes = 0
    loc: str | None = None
    lastmod: str | None = None
    for chunk in _xml_chunks(body, url):
        seen_bytes += len(chunk)
        if seen_bytes > MAX_BYTES:
            raise SitemapError(f"sitemap {url}: more than {MAX_BYTES} bytes uncompressed (the protocol's limit)")
        try:
            parser.feed(chunk)
            events = list(parser.read_events())
        except etree.XMLSyntaxError as exc:
            raise SitemapError(f"sitemap {url}: not well-formed XML ({exc})") from None
        for event, elem in events:
            name = _local(elem.tag)
            if event == "start":
                if root is None:
                    root = name
                    if root not in ("urlset", "sitemapindex"):
                        raise SitemapError(f"sitemap {url}: root element <{root}>, not <urlset> or <sitemapindex>")
                continue
            if name == "loc":
                loc = (elem.text or "").strip()
            elif name == "lastmod":
                lastmod = (elem.text or "").strip() or None
            elif name in ("url", "sitemap"):
                if loc:
                    if count >= MAX_URLS:
                        dropped += 1
                    else:
                        target = urljoin(url, loc)
                        if urlsplit(target).scheme in ("http", "https"):
                            count += 1
                            yield SitemapEntry(target, lastmod, index=name == "sitemap")
                loc = lastmod = None
                elem.clear()  # the tree never grows: each entry is dropped once read
                parent = elem.getparent()
                if parent is not None:
                    while elem.getprevious() is not None:
                        del parent[0]
    try:
        parser.close()
    except etree.XMLSyntaxError as exc:
        if root is None:
            raise SitemapError(f"sitemap {url}: not a sitemap ({exc})") from None
        log.warning("sitemap ends early", sitemap=url, error=str(exc), entries=count)
    if dropped:
        log.warning("sitemap over the protocol's limit", sitemap=url, limit=MAX_URLS, dropped=dropped)


def _xml_chunks(body: bytes, url: str) -> Iterator[bytes]:
    """The document in pieces of at most :data:`_CHUNK` bytes, inflated piece by piece when it is gzip'd (a
    small gzip'd chunk may inflate a thousandfold: the output is bounded, not the input)."""
    if body[:2] != _GZIP_MAGIC:
        for offset in range(0, len(body), _CHUNK):
            yield body[offset : offset + _CHUNK]
        return
    inflate = zlib.decompressobj(wbits=31)
    for offset in range(0, len(body), _CHUNK):
        data = body[offset : offset + _CHUNK]
        while data:
            try:
                out = inflate.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise SitemapError(f"sitemap {url}: bad gzip data ({exc})") from None
            if out:
                yield out
            data = inflate.unconsumed_tail
            if inflate.eof:
                return


SitemapFetch = Callable[[str], Awaitable[bytes | None]]
"""Fetches one sitemap's body (None: it failed, and its outcome is recorded)."""


async def sitemap_entries(roots: list[str], fetch: SitemapFetch) -> AsyncIterator[SitemapEntry]:
    """The page entries of ``roots`` and of every sitemap index below them (each sitemap fetched once).

    Children of an index are read depth-first in the order listed; a sitemap that
    fails to parse is logged and skipped (the entries it gave so far count).
    """
    seen: set[str] = set()

    async def walk(url: str, level: int) -> AsyncIterator[SitemapEntry]:
        if url in seen:
            return
        seen.add(url)
        body = await fetch(url)
        if body is None:
            return
        children: list[str] = []
        try:
            for entry in parse_sitemap(body, url):
                if entry.index:
                    children.append(entry.url)
                else:
                    yield entry
        except SitemapError as exc:
            log.warning("sitemap unreadable", sitemap=url, error=str(exc))
        del body
        if children and level >= MAX_NESTING:
            log.warning("sitemap index nested too deep", sitemap=url, levels=MAX_NESTING, skipped=len(children))
            return
        for child in children:
            async for entry in walk(child, level + 1):
                yield entry

    for root in roots:
        async for entry in walk(root, 0):
            yield entry
