"""Hostile pages for every transport: redirects out of the allowed network, bad Locations, decompression bombs.

:class:`HostileSite` is an aiohttp app on ``127.0.0.1`` (inside the hostile fleet's
allowed ``127.0.0.0/24``) whose pages lead where trawl must not go:

* ``/to?url=U`` answers 302 to ``U`` (any Location, malformed ones too);
* ``/links?url=U`` is an html page linking to ``U``; ``/api?next=U`` a JSON page of
  one item whose ``next`` is ``U``;
* ``/bomb/{gzip,deflate,br}`` a body of zeros that inflates to :data:`BOMB_BYTES`
  (compressed a MiB at a time, once per process; ~400 bytes for brotli, ~260 KB for gzip).

:func:`run_source` runs one source (html, api or spider) through its connector with a
real Fetcher and returns its records, outcomes and the exception that ended it, if
any. ``python -m tests.helpers.transport KIND URL LIMIT`` does the same in a process
of its own and prints the outcomes with the process's peak RSS before and after
(the bomb tests measure memory there, where nothing else ran).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import brotli
import orjson
import scrapy
from aiohttp import web

from trawl.config import ApiSource, HtmlSource, SpiderSource
from trawl.connectors import SourceContext, SourceStats, connector_for
from trawl.connectors.spider import SpiderConnector
from trawl.fetch import Fetcher
from trawl.records import Outcome, Record
from trawl.settings import Settings

__all__ = ["BOMB_BYTES", "HostileSite", "LinksSpider", "Run", "run_source", "source_for"]

BOMB_BYTES = 256 * 2**20
"""What a bomb inflates to."""

_MIB = b"\0" * 2**20


class LinksSpider(scrapy.Spider):
    """Requests each of ``urls`` (comma-separated) and follows every link of the pages; one item per page."""

    name = "links"

    def __init__(self, urls: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.urls = urls.split(",")

    async def start(self) -> AsyncIterator[Any]:
        for url in self.urls:
            yield scrapy.Request(url, dont_filter=True)

    def parse(self, response: Any, **kwargs: Any) -> Iterator[Any]:
        yield {"url": response.url, "status": response.status}
        if hasattr(response, "css"):
            for href in response.css("a::attr(href)").getall():
                yield response.follow(href)


def _compress(coding: str) -> bytes:
    """:data:`BOMB_BYTES` of zeros compressed with ``coding``, a MiB at a time (the zeros are never held whole)."""
    if coding == "br":
        br = brotli.Compressor(quality=5)
        compress, finish = br.process, br.finish
    else:
        z = zlib.compressobj(9, zlib.DEFLATED, 31 if coding == "gzip" else 15)
        compress, finish = z.compress, z.flush
    out = [compress(_MIB) for _ in range(BOMB_BYTES // len(_MIB))]
    out.append(finish())
    return b"".join(out)


_BOMBS: dict[str, bytes] = {}


async def bomb(coding: str) -> bytes:
    """The bomb for ``coding`` (made once per process, off the loop: a second or two for gzip)."""
    if coding not in _BOMBS:
        _BOMBS[coding] = await asyncio.to_thread(_compress, coding)
    return _BOMBS[coding]


class HostileSite:
    """The pages above, on a free port of 127.0.0.1 in the test's loop; ``hits`` counts requests by path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def to(self, target: str) -> str:
        return f"{self.url}/to?{urlencode({'url': target})}"

    def links(self, target: str) -> str:
        return f"{self.url}/links?{urlencode({'url': target})}"

    def api(self, next_url: str) -> str:
        return f"{self.url}/api?{urlencode({'next': next_url})}"

    async def _count(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def _to(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        # Set raw: aiohttp's redirect helpers would refuse a malformed Location, a hostile server does not.
        return web.Response(status=302, headers={"Location": request.query["url"]})

    async def _links(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        href = request.query["url"].replace('"', "&quot;")
        return web.Response(
            text=f'<html><body><h1>links</h1><a href="{href}">there</a></body></html>', content_type="text/html"
        )

    async def _api(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        return web.json_response({"items": [{"id": 1}], "next": request.query["next"]})

    async def _bomb(self, request: web.Request) -> web.StreamResponse:
        await self._count(request)
        coding = request.match_info["coding"]
        body = await bomb(coding)
        resp = web.StreamResponse(headers={"Content-Type": "text/html", "Content-Encoding": coding})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            # In one write (a few hundred bytes for brotli, ~260 KB for gzip): as a hostile server sends it.
            await resp.write(body)
            await resp.write_eof()
        except (ConnectionError, OSError):
            pass  # the client stopped reading: as it should
        return resp

    async def _robots(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="User-agent: *\nAllow: /\n")

    async def __aenter__(self) -> HostileSite:
        app = web.Application()
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/to", self._to)
        app.router.add_get("/links", self._links)
        app.router.add_get("/api", self._api)
        app.router.add_get("/bomb/{coding}", self._bomb)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def source_for(kind: str, url: str, *, follow: bool = False) -> HtmlSource | ApiSource | SpiderSource:
    """A source of ``kind`` that starts at ``url`` (html: following links when ``follow``; api: ``next`` URLs)."""
    if kind == "html":
        where = {"start_urls": [url], "follow": {"same_host": False}} if follow else {"urls": [url]}
        return HtmlSource.model_validate({"kind": "html", "name": "h", **where, "fields": {"h1": {"selector": "h1"}}})
    if kind == "api":
        return ApiSource.model_validate(
            {
                "kind": "api",
                "name": "a",
                "url": url,
                "key": "id",
                "items_path": "items",
                "pagination": {"type": "next_url", "next_path": "next"},
            }
        )
    return SpiderSource.model_validate(
        {"kind": "spider", "name": "s", "spider": "tests.helpers.transport:LinksSpider", "args": {"urls": url}}
    )


@dataclass
class Run:
    """What one source's run produced."""

    records: list[Record] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    error: BaseException | None = None

    def outcome(self, url: str) -> Outcome:
        """The one outcome recorded for ``url``."""
        found = [o for o in self.outcomes if o.url == url]
        assert len(found) == 1, f"{len(found)} outcomes for {url}: {self.outcomes}"
        return found[0]


async def run_source(source: HtmlSource | ApiSource | SpiderSource, settings: Settings) -> Run:
    """Run one source through its connector; an exception that ends it is kept in ``error``, not raised."""
    run = Run()

    async def emit(outcome: Outcome) -> None:
        run.outcomes.append(outcome)

    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("run-hostile-1", settings, fetcher, emit, SourceStats())
        connector = SpiderConnector(source, ctx) if isinstance(source, SpiderSource) else connector_for(source, ctx)
        try:
            async for item in connector.fetch():
                if isinstance(item, Record):
                    run.records.append(item)
        except Exception as exc:
            run.error = exc
    return run


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def _child(kind: str, url: str, limit: int) -> None:
    settings = Settings(
        allowed_networks=["127.0.0.0/24"], max_body_bytes=limit, max_retries=0, connect_timeout=5, total_timeout=60
    )
    # Warm up first (imports, Scrapy's crawler, the clients), so the baseline holds everything but the body.
    async with HostileSite() as site:
        await run_source(source_for(kind, site.api("") if kind == "api" else site.links(site.url)), settings)
    baseline = _peak_kb()
    run = await run_source(source_for(kind, url), settings)
    line = {
        "baseline_kb": baseline,
        "peak_kb": _peak_kb(),
        "outcomes": [[o.url, o.outcome.value, o.error] for o in run.outcomes],
        "error": None if run.error is None else f"{type(run.error).__name__}: {run.error}",
    }
    sys.stdout.write(orjson.dumps(line).decode() + "\n")


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
