"""A generated site for crawls of any size: page N links to pages ``N*F+1 … N*F+F``, spread over several hosts.

The frontier's tests and benchmark crawl it: it records every request (so a test
can tell which pages were fetched twice) and the most requests each host had in
flight at once (so a test can tell whether per-host politeness held across
processes). Page N is served by host ``N % len(hosts)``; every host answers every
page, so a crawler that ignores the layout still gets pages.

    async with TreeSite(["127.0.0.11", "127.0.0.12"], pages=5000) as site:
        site.url(0)  # http://127.0.0.11:PORT/p/0
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType
from typing import Self

from aiohttp import web

from tests.helpers.net import free_port

__all__ = ["TreeSite"]


class TreeSite:
    """``pages`` pages over ``hosts``, each linking to its ``fanout`` children; answers after ``delay`` seconds."""

    def __init__(
        self,
        hosts: list[str],
        *,
        pages: int,
        fanout: int = 2,
        delay: float = 0.0,
        port: int = 0,
        own_tree: bool = False,
    ) -> None:
        self.hosts = hosts
        self.own_tree = own_tree
        """Each host serves a tree of its own (``pages`` pages, links stay on the host) instead of a share of one."""
        self.pages = pages
        self.fanout = fanout
        self.delay = delay
        self.port = port
        self.requests: list[str] = []
        """Every page request as ``host:port/p/N``, in arrival order."""
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    def url(self, n: int) -> str:
        return f"http://{self.hosts[n % len(self.hosts)]}:{self.port}/p/{n}"

    def page_key(self, n: int) -> str:
        return self.url(n).removeprefix("http://")

    async def _page(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        host = request.host
        self.requests.append(f"{host}{request.path}")
        self.inflight[host] += 1
        self.max_inflight[host] = max(self.max_inflight[host], self.inflight[host])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if n >= self.pages:
                raise web.HTTPNotFound()
            children = range(n * self.fanout + 1, min(n * self.fanout + self.fanout, self.pages - 1) + 1)
            if self.own_tree:
                links = "".join(f'<a href="/p/{c}">{c}</a>' for c in children)
            else:
                links = "".join(f'<a href="{self.url(c)}">{c}</a>' for c in children)
            body = f'<html><body><h1 class="n">{n}</h1><p class="host">{host}</p>{links}</body></html>'
            return web.Response(text=body, content_type="text/html")
        finally:
            self.inflight[host] -= 1

    async def _robots(self, request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nAllow: /\n", content_type="text/plain")

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/p/{n:\\d+}", self._page)
        app.router.add_get("/robots.txt", self._robots)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = self.port or free_port(self.hosts[0])
        for host in self.hosts:
            await web.TCPSite(self._runner, host, self.port).start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
