"""A site listed by sitemaps: an index of gzip'd sitemaps whose URLs (and lastmods) a test can change between runs."""

from __future__ import annotations

import asyncio
import gzip
from collections import Counter
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["SitemapSite", "sitemap_xml", "urlset"]


def urlset(entries: list[tuple[str, str | None]]) -> bytes:
    """A ``<urlset>`` document of (loc, lastmod) entries."""
    rows = [
        f"<url><loc>{loc}</loc>" + (f"<lastmod>{lastmod}</lastmod>" if lastmod else "") + "</url>"
        for loc, lastmod in entries
    ]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">' + "\n".join(rows) + "</urlset>"
    ).encode()


def sitemap_xml(children: list[str]) -> bytes:
    """A ``<sitemapindex>`` of child sitemap URLs."""
    rows = [f"<sitemap><loc>{c}</loc><lastmod>2026-01-01</lastmod></sitemap>" for c in children]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">' + "".join(rows) + "</sitemapindex>"
    ).encode()


class SitemapSite:
    """A small site for crawl tests: ``/sitemap_index.xml`` → ``/sitemap-{i}.xml.gz`` (``parts`` of them), listing ``/item/{n}`` pages
    (every ``off_every``-th one as ``/other/{n}``, which `follow` rules leave out). ``lastmod[n]`` is each
    page's lastmod; ``robots.txt`` names the index. ``requests`` counts paths served."""

    def __init__(self, pages: int, *, parts: int = 2, off_every: int = 10, host: str = "127.0.0.1") -> None:
        self.pages = pages
        self.parts = parts
        self.off_every = off_every
        self.host = host
        self.lastmod = dict.fromkeys(range(pages), "2026-11-01T00:00:00+00:00")
        self.requests: Counter[str] = Counter()
        self.delay = 0.0  # seconds each page takes
        self.url = ""
        self._runner: web.AppRunner | None = None

    def path(self, n: int) -> str:
        return f"/other/{n}" if self.off_every and n % self.off_every == 0 else f"/item/{n}"

    def in_pattern(self) -> list[int]:
        return [n for n in range(self.pages) if self.path(n).startswith("/item/")]

    def _part(self, i: int) -> bytes:
        per = -(-self.pages // self.parts)
        ns = range(i * per, min(self.pages, (i + 1) * per))
        return gzip.compress(urlset([(self.url + self.path(n), self.lastmod.get(n)) for n in ns]), 1)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        if path == "/robots.txt":
            return web.Response(text=f"User-agent: *\nAllow: /\nSitemap: {self.url}/sitemap_index.xml\n")
        if path == "/sitemap_index.xml":
            children = [f"{self.url}/sitemap-{i}.xml.gz" for i in range(self.parts)]
            return web.Response(body=sitemap_xml(children), content_type="application/xml")
        if path.startswith("/sitemap-") and path.endswith(".xml.gz"):
            body = self._part(int(path.removeprefix("/sitemap-").removesuffix(".xml.gz")))
            return web.Response(body=body, content_type="application/gzip")
        kind, _, n = path.strip("/").partition("/")
        if kind in ("item", "other") and n.isdigit():
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(text=f"<html><h1>{kind} {n}</h1></html>", content_type="text/html")
        return web.Response(status=404)

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
