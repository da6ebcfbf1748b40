"""The browser's guarded proxy, spoken to as Chromium does (CONNECT, absolute-URI requests), over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.helpers.hostile import FORBIDDEN_IP, SECRET, Hostile
from trawl.connectors.proxy import GuardedProxy
from trawl.netguard import NetworkGuard


async def _exchange(proxy: GuardedProxy, request: bytes) -> bytes:
    """Send ``request`` to the proxy and read until it closes."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.fixture
async def origin() -> AsyncIterator[int]:
    """An allowed server on 127.0.0.1 that says which path and Connection header it got."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=f"path={request.path_qs} connection={request.headers.get('Connection')}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def proxy(hostile: Hostile) -> AsyncIterator[GuardedProxy]:
    async with GuardedProxy(NetworkGuard(hostile.allowed), connect_timeout=2) as p:
        yield p


async def test_plain_http_is_forwarded_in_origin_form_one_request_per_connection(
    hostile: Hostile, proxy: GuardedProxy, origin: int
) -> None:
    reply = await _exchange(
        proxy,
        f"GET http://127.0.0.1:{origin}/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
        "Proxy-Connection: keep-alive\r\n\r\n".encode(),
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert body == b"path=/a?b=1 connection=close"
    assert (proxy.connections, proxy.refused) == (1, 0)
    assert hostile.forbidden.hits == 0


async def test_forbidden_targets_are_refused_before_any_connection(hostile: Hostile, proxy: GuardedProxy) -> None:
    port = hostile.forbidden.port
    hostile.dns.set("meta.test", [FORBIDDEN_IP])
    requests = [
        f"CONNECT {FORBIDDEN_IP}:{port} HTTP/1.1\r\nHost: {FORBIDDEN_IP}:{port}\r\n\r\n",
        f"CONNECT meta.test:{port} HTTP/1.1\r\n\r\n",
        f"GET http://{FORBIDDEN_IP}:{port}/latest/meta-data/ HTTP/1.1\r\nHost: {FORBIDDEN_IP}\r\n\r\n",
        f"GET http://[::ffff:{FORBIDDEN_IP}]:{port}/ HTTP/1.1\r\n\r\n",  # IPv4 inside IPv6 is the same address
        f"CONNECT {proxy.host}:{proxy.port} HTTP/1.1\r\n\r\n",  # the proxy itself (allowed network): a loop
    ]
    for request in requests:
        reply = await _exchange(proxy, request.encode())
        assert reply.startswith(b"HTTP/1.1 403 Forbidden"), request
        assert FORBIDDEN_IP.encode() not in reply and b"meta.test" not in reply  # the page learns nothing
    assert proxy.refused == len(requests) and proxy.connections == 0
    assert "a network the settings do not allow" in (proxy.refusal(f"https://meta.test:{port}/") or "")
    assert proxy.refusal(f"https://meta.test:{port}/", since=float("inf")) is None  # refusals older than asked
    assert hostile.forbidden.hits == 0


async def test_a_dns_answer_that_changes_is_connected_as_checked(hostile: Hostile, proxy: GuardedProxy) -> None:
    # Whatever an earlier check was told, the proxy connects to what its own guarded lookup returned.
    hostile.dns.rebind("rebind.test", "127.0.0.2")
    assert await NetworkGuard(hostile.allowed).addresses("rebind.test") == ["127.0.0.2"]
    reply = await _exchange(proxy, f"CONNECT rebind.test:{hostile.forbidden.port} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403") and SECRET.encode() not in reply
    assert hostile.forbidden.hits == 0


async def test_malformed_and_unresolvable_requests_get_clear_answers(hostile: Hostile, proxy: GuardedProxy) -> None:
    for request in [b"GARBAGE\r\n\r\n", b"GET /relative HTTP/1.1\r\n\r\n", b"CONNECT host:99999 HTTP/1.1\r\n\r\n"]:
        assert (await _exchange(proxy, request)).startswith(b"HTTP/1.1 400"), request
    hostile.dns.set("nowhere.test", [])
    assert (await _exchange(proxy, b"CONNECT nowhere.test:443 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 502")
    assert proxy.refused == 0 and hostile.forbidden.hits == 0
