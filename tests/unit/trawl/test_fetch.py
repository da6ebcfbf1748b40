"""The fetch layer against a local aiohttp server that misbehaves on purpose, over both transports."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.net import free_port
from trawl.errors import BlockedNetworkError, FetchError, PermanentFetchError, TransientFetchError
from trawl.fetch import Fetcher, Response, TransportName
from trawl.netguard import NetworkGuard
from trawl.settings import Settings

TRANSPORTS: list[TransportName] = ["aiohttp", "httpx"]


@dataclass
class Hit:
    path_qs: str
    at: float  # time.monotonic() when the handler started


@dataclass
class Misbehaving:
    """A local server whose routes fail, stall, redirect and overflow on request; it records every hit."""

    host: str = "127.0.0.1"
    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    robots_hits: int = 0
    redirect_target: str = ""
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def count(self, path: str) -> int:
        return sum(n for p, n in self.counts.items() if p.split("?")[0] == path)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/robots.txt":  # the fetch layer asks once per origin; counted separately
            self.robots_hits += 1
            return web.Response(status=404)
        self.hits.append(Hit(request.path_qs, time.monotonic()))
        self.counts[request.path_qs] += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text="<p>ok</p>", content_type="text/html")

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def flaky(self, request: web.Request) -> web.Response:
        """Fails with ``status`` for the first ``fail`` hits (Retry-After ``after`` if given), then 200."""
        fail = int(request.query.get("fail", "2"))
        if self.counts[request.path_qs] <= fail:
            headers = {"Retry-After": request.query["after"]} if "after" in request.query else {}
            return web.Response(status=int(request.query.get("status", "503")), headers=headers)
        return web.Response(text="recovered")

    async def stall(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(text="too late")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """A byte every 50 ms: the read timeout never fires, the total timeout must."""
        resp = web.StreamResponse()
        resp.content_type = "text/plain"
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b".")
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query["n"])
        if request.query.get("mode") == "chunked":  # no Content-Length: only streaming can tell
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(n // 100):
                await resp.write(b"x" * 100)
            await resp.write_eof()
            return resp
        if request.query.get("mode") == "gzip":  # small on the wire, large once decompressed
            return web.Response(
                body=gzip.compress(b"0" * n), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
            )
        return web.Response(body=b"x" * n, content_type="text/plain")

    async def redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="landed")
        # Relative and absolute Locations, and every redirect status, along one chain.
        location = f"{n - 1}" if n % 2 else f"{self.url}/redirect/{n - 1}"
        status = (301, 302, 303, 307, 308)[n % 5]
        return web.Response(status=status, headers={"Location": location})

    async def away(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": self.redirect_target})

    async def busy(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.03)
        finally:
            self.in_flight -= 1
        return web.Response(text="done")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/ok", self.ok)
        app.router.add_get(r"/status/{code:\d+}", self.status)
        app.router.add_get("/flaky", self.flaky)
        app.router.add_get("/stall", self.stall)
        app.router.add_get("/trickle", self.trickle)
        app.router.add_get("/big", self.big)
        app.router.add_get(r"/redirect/{n:\d+}", self.redirect)
        app.router.add_get("/away", self.away)
        app.router.add_get("/busy", self.busy)
        # Cancel a handler when its client goes away, so stalled handlers do not hold up teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Misbehaving]:
    srv = Misbehaving()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> TransportName:
    name: TransportName = request.param
    return name


def tuned(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update=update)


async def get(settings: Settings, url: str, transport: TransportName, **kwargs: Any) -> Response:
    async with Fetcher(settings) as fetcher:
        return await fetcher.get(url, transport=transport, **kwargs)


async def fail(settings: Settings, url: str, transport: TransportName) -> FetchError:
    with pytest.raises(FetchError) as info:
        await get(settings, url, transport)
    return info.value


async def test_success(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    resp = await get(settings, f"{server.url}/ok", transport)
    assert (resp.status, resp.body, resp.attempts) == (200, b"<p>ok</p>", 1)
    assert resp.url == f"{server.url}/ok"
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.text() == "<p>ok</p>"
    assert resp.elapsed_ms >= 0
    assert server.count("/ok") == 1


async def test_503_twice_then_success(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    resp = await get(settings, f"{server.url}/flaky?fail=2&status=503", transport)
    assert (resp.status, resp.body, resp.attempts) == (200, b"recovered", 3)
    assert server.count("/flaky") == 3


async def test_retry_after_is_honoured_up_to_backoff_max(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    # Jitter alone would sleep at most 1 ms; Retry-After: 1 is capped at backoff_max = 0.25 s.
    s = tuned(settings, backoff_base=0.001, backoff_max=0.25)
    resp = await get(s, f"{server.url}/flaky?fail=1&status=429&after=1", transport)
    assert (resp.status, resp.attempts) == (200, 2)
    first, second = (h.at for h in server.hits)
    assert 0.24 <= second - first < 0.9


async def test_404_is_not_retried(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    exc = await fail(settings, f"{server.url}/status/404", transport)
    assert type(exc) is PermanentFetchError
    assert not exc.transient
    assert (exc.status, exc.attempts) == (404, 1)
    assert exc.url == f"{server.url}/status/404"
    assert server.count("/status/404") == 1


async def test_persistent_500_gives_up(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    s = tuned(settings, max_retries=2)
    exc = await fail(s, f"{server.url}/status/500", transport)
    assert type(exc) is TransientFetchError
    assert exc.transient
    assert (exc.status, exc.attempts) == (500, 3)
    assert exc.elapsed_ms >= 0
    assert server.count("/status/500") == 3


async def test_no_retries_when_max_retries_is_zero(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    exc = await fail(tuned(settings, max_retries=0), f"{server.url}/status/503", transport)
    assert (type(exc), exc.attempts) == (TransientFetchError, 1)
    assert server.count("/status/503") == 1


async def test_read_timeout_is_transient_and_retried(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    s = tuned(settings, read_timeout=0.1, total_timeout=3, max_retries=1)
    started = time.monotonic()
    exc = await fail(s, f"{server.url}/stall?s=5", transport)
    assert type(exc) is TransientFetchError
    assert exc.attempts == 2
    assert server.count("/stall") == 2
    assert time.monotonic() - started < 2


async def test_total_timeout_cuts_a_trickling_body(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    s = tuned(settings, read_timeout=1, total_timeout=0.2, max_retries=0)
    started = time.monotonic()
    exc = await fail(s, f"{server.url}/trickle", transport)
    assert type(exc) is TransientFetchError
    assert "timed out after 0.2s" in str(exc)
    assert exc.attempts == 1
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("mode", ["length", "chunked", "gzip"])
async def test_body_larger_than_limit(
    settings: Settings, server: Misbehaving, transport: TransportName, mode: str
) -> None:
    s = tuned(settings, max_body_bytes=2048)
    ok = await get(s, f"{server.url}/big?n=2000&mode={mode}", transport)
    assert len(ok.body) == 2000
    exc = await fail(s, f"{server.url}/big?n=50000&mode={mode}", transport)
    assert type(exc) is PermanentFetchError
    assert "larger than 2048 bytes" in str(exc)
    assert exc.attempts == 1
    assert server.counts[f"/big?n=50000&mode={mode}"] == 1


async def test_redirects_followed(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    resp = await get(tuned(settings, max_redirects=5), f"{server.url}/redirect/5", transport)
    assert (resp.status, resp.body, resp.attempts) == (200, b"landed", 1)
    assert resp.url == f"{server.url}/redirect/0"
    assert [h.path_qs for h in server.hits] == [f"/redirect/{n}" for n in range(5, -1, -1)]


async def test_too_many_redirects(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    exc = await fail(tuned(settings, max_redirects=2), f"{server.url}/redirect/5", transport)
    assert type(exc) is PermanentFetchError
    assert "more than 2 redirects" in str(exc)
    assert exc.attempts == 1
    assert [h.path_qs for h in server.hits] == ["/redirect/5", "/redirect/4", "/redirect/3"]


async def test_loopback_blocked_without_allowed_networks(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    s = tuned(settings, allowed_networks=[])
    for url in (f"{server.url}/ok", f"http://localhost:{server.port}/ok"):
        exc = await fail(s, url, transport)
        assert type(exc) is BlockedNetworkError
        assert exc.attempts == 1
        assert exc.url == url
        assert "a network the settings do not allow" in str(exc)
    assert server.hits == []


async def test_redirect_into_a_blocked_network_is_refused(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    other = Misbehaving(host="127.0.0.2")
    await other.start()
    try:
        server.redirect_target = f"{other.url}/ok"
        s = tuned(settings, allowed_networks=["127.0.0.1/32"])
        exc = await fail(s, f"{server.url}/away", transport)
        assert type(exc) is BlockedNetworkError
        assert exc.url == f"{other.url}/ok"
        assert server.count("/away") == 1
        assert other.hits == []
        # The same hop is fine once its network is allowed.
        resp = await get(tuned(settings, allowed_networks=["127.0.0.0/30"]), f"{server.url}/away", transport)
        assert (resp.url, resp.body) == (f"{other.url}/ok", b"<p>ok</p>")
        assert other.count("/ok") == 1
    finally:
        await other.stop()


async def test_per_host_concurrency_cap(settings: Settings, server: Misbehaving, transport: TransportName) -> None:
    async with Fetcher(tuned(settings, per_host_concurrency=2)) as fetcher:
        results = await asyncio.gather(
            *(fetcher.get(f"{server.url}/busy?i={i}", transport=transport) for i in range(8))
        )
    assert [r.body for r in results] == [b"done"] * 8
    assert server.count("/busy") == 8
    assert server.max_in_flight == 2


async def test_source_concurrency_overrides_settings(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    async with Fetcher(tuned(settings, per_host_concurrency=8)) as fetcher:
        await asyncio.gather(
            *(fetcher.get(f"{server.url}/busy?i={i}", transport=transport, concurrency=1) for i in range(4))
        )
    assert server.count("/busy") == 4
    assert server.max_in_flight == 1


async def test_per_host_delay_spaces_request_starts(
    settings: Settings, server: Misbehaving, transport: TransportName
) -> None:
    async with Fetcher(tuned(settings, per_host_delay=0.1)) as fetcher:
        # Warm up first: a client's first request pays one-off costs that would blur the server's clock.
        await fetcher.get(f"{server.url}/ok?warm-up", transport=transport)
        server.hits.clear()
        await asyncio.gather(*(fetcher.get(f"{server.url}/ok?i={i}", transport=transport) for i in range(4)))
    starts = sorted(h.at for h in server.hits)
    assert len(starts) == 4
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Seen from the server each gap is 0.1 s give or take a connection set-up; without the gate, ~0.
    assert min(gaps) >= 0.05, gaps
    assert starts[-1] - starts[0] >= 0.27, gaps


async def test_connection_refused_is_transient(settings: Settings, transport: TransportName) -> None:
    port = free_port()  # a port nobody listens on
    # robots_unavailable=allow: by default an unreachable robots.txt stops the URL before its own attempts.
    exc = await fail(tuned(settings, max_retries=1, robots_unavailable="allow"), f"http://127.0.0.1:{port}/", transport)
    assert type(exc) is TransientFetchError
    assert exc.attempts == 2


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/file", "http:///nohost"])
async def test_not_http_is_permanent(settings: Settings, url: str) -> None:
    exc = await fail(settings, url, "aiohttp")  # refused before any transport is involved
    assert type(exc) is PermanentFetchError
    assert exc.attempts == 1


def test_response_text_and_json() -> None:
    latin = Response(
        "http://x.test/", 200, {"content-type": 'text/html; charset="latin-1"'}, "é".encode("latin-1"), 1, 0
    )
    assert latin.text() == "é"
    unknown = Response("http://x.test/", 200, {"content-type": "text/html; charset=nope"}, b"ok \xff", 1, 0)
    assert unknown.text() == "ok \ufffd"
    assert Response("http://x.test/", 200, {}, b'{"a": [1]}', 1, 0).json() == {"a": [1]}
    with pytest.raises(PermanentFetchError, match="invalid JSON"):
        Response("http://x.test/", 200, {}, b"<html>", 1, 0).json()


@pytest.mark.parametrize(
    ("host", "allowed", "blocked"),
    [
        ("127.0.0.1", [], True),
        ("127.0.0.1", ["127.0.0.0/8"], False),
        ("10.1.2.3", [], True),
        ("192.168.0.1", ["10.0.0.0/8"], True),
        ("172.16.5.5", [], True),
        ("169.254.169.254", [], True),  # cloud metadata
        ("100.64.0.1", [], True),  # CGNAT
        ("224.0.0.1", [], True),
        ("0.0.0.0", [], True),
        ("[::1]", [], True),
        ("[::ffff:127.0.0.1]", [], True),
        ("[::ffff:127.0.0.1]", ["127.0.0.0/8"], False),
        ("[fe80::1]", [], True),
        ("8.8.8.8", [], False),
        ("[2001:4860:4860::8888]", [], False),
        ("localhost", [], True),
    ],
)
async def test_network_guard(host: str, allowed: list[str], blocked: bool) -> None:
    guard = NetworkGuard(allowed)
    url = f"http://{host}:8080/x"
    if blocked:
        with pytest.raises(BlockedNetworkError) as info:
            await guard.check(url)
        assert info.value.url == url
    else:
        await guard.check(url)


async def test_a_failed_lookup_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # DNS that fails once and then answers with a loopback address: the second check must see it.
    loop = asyncio.get_running_loop()
    answers: list[Any] = [OSError("temporary failure in name resolution"), "127.0.0.1"]

    async def getaddrinfo(host: str, port: Any, **kwargs: Any) -> list[Any]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, 0))]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    guard = NetworkGuard([])
    with pytest.raises(TransientFetchError, match=r"cannot resolve flaky\.example"):
        await guard.check("http://flaky.example/")  # unresolvable: fails closed, retried as a transient error
    with pytest.raises(BlockedNetworkError, match=r"flaky\.example resolves to 127\.0\.0\.1"):
        await guard.check("http://flaky.example/")


async def test_verdicts_expire() -> None:
    answers = ["93.184.216.34", "127.0.0.1"]

    async def resolver(host: str, port: int) -> list[str]:
        return [answers.pop(0)]

    guard = NetworkGuard([], resolver=resolver, ttl=0.05)
    await guard.check("http://rebind.example/")
    await guard.check("http://rebind.example/")  # within the TTL: the verdict is kept, no second lookup
    await asyncio.sleep(0.06)
    with pytest.raises(BlockedNetworkError, match=r"rebind\.example resolves to 127\.0\.0\.1"):
        await guard.check("http://rebind.example/")
