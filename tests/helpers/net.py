"""Ports for local test servers."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["free_port", "start_app"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it); whoever binds it next may race, so retry on failure."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def start_app(handle: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, int]:
    """``handle`` answering every path on a free 127.0.0.1 port, in the test's loop: (runner to clean up, port)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])
