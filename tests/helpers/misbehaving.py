"""Four misbehaving hosts on loopback, served from a thread (for tests that run `trawl` in subprocesses)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.helpers.net import free_port
from trawl.demo.site import ServerThread

__all__ = ["MisbehavingSite"]


class _Misbehaving:
    """Four hosts: ``ok`` (pages with an h1), ``err`` (every path 500), ``slow`` (pages after 6-8 s),
    ``throttle`` (each path's first request 429 + ``Retry-After: 1``, then the page)."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []
        self._throttled: set[str] = set()

    async def __aenter__(self) -> _Misbehaving:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text=f"<h1>page {request.match_info['n']}</h1>", content_type="text/html")

        async def err(request: web.Request) -> web.Response:
            return web.Response(status=500, text="boom")

        async def slow(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            await asyncio.sleep(6 + n % 3)
            return web.Response(text=f"<h1>slow {n}</h1>", content_type="text/html")

        async def throttle(request: web.Request) -> web.Response:
            if request.path not in self._throttled:
                self._throttled.add(request.path)
                return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
            return web.Response(text=f"<h1>throttled {request.match_info['n']}</h1>", content_type="text/html")

        for name, host, route, handler in (
            ("ok", "127.0.0.21", "/ok/{n}", ok),
            ("err", "127.0.0.22", "/{tail:.*}", err),
            ("slow", "127.0.0.23", "/slow/{n}", slow),
            ("throttle", "127.0.0.25", "/t/{n}", throttle),
        ):
            app = web.Application()
            app.router.add_get(route, handler)
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            await runner.setup()
            port = free_port(host)
            await web.TCPSite(runner, host, port).start()
            self._runners.append(runner)
            self.urls[name] = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for runner in self._runners:
            await runner.cleanup()


class MisbehavingSite(ServerThread[_Misbehaving]):
    what = "misbehaving site"

    def __init__(self) -> None:
        super().__init__(_Misbehaving())

    def url(self, name: str) -> str:
        return self.server.urls[name]
