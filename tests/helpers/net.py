"""Ports for local test servers."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any, Self

from aiohttp import web

__all__ = ["LocalHost", "free_port", "start_app"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it); whoever binds it next may race, so retry on failure."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def start_app(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]], ip: str = "127.0.0.1"
) -> tuple[web.AppRunner, int]:
    """``handle`` answering every path on a free port of ``ip``, in the test's loop: (runner to clean up, port)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, ip, 0).start()
    return runner, int(runner.addresses[0][1])


class LocalHost:
    """A local host whose :meth:`handle` answers every path (``async with``: served on a free port of ``ip``)."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.ip = ip
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._runner, self.port = await start_app(self.handle, self.ip)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
