"""`browser` sources against local pages and real Chromium: rendering, adaptive mode, timeouts, crashes, guards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.hostile import FORBIDDEN_IP, SECRET, Hostile
from trawl.config import BrowserSource
from trawl.connectors import SourceContext, SourceStats
from trawl.connectors.browser import BrowserConnector, BrowserPool, find_chromium, url_pattern
from trawl.demo.site import JS_DEMO_COUNT, DemoSite, product
from trawl.fetch import Fetcher
from trawl.records import Outcome, Record
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

FIELDS = {
    "sku": {"selector": "span.sku", "required": True},
    "name": {"selector": "h1.name", "required": True},
    "price": {"selector": "p.price", "attr": "data-amount", "type": "float"},
}


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "allowed_networks": ["127.0.0.0/8"],
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "browser_wait_timeout": 5.0,
        "browser_navigation_timeout": 10.0,
    }
    return Settings(**(base | overrides))


def _source(**spec: Any) -> BrowserSource:
    return BrowserSource.model_validate({"kind": "browser", "name": "js", "key": "sku", "fields": FIELDS} | spec)


class Run:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.outcomes: list[Outcome] = []
        self.stats = SourceStats()
        self.pool: BrowserPool | None = None

    def kinds(self) -> Counter[str]:
        return Counter(o.outcome.value for o in self.outcomes)


async def _crawl(source: BrowserSource, settings: Settings, during: Any = None) -> Run:
    run = Run()

    async def emit(outcome: Outcome) -> None:
        run.outcomes.append(outcome)

    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("run-browser", settings, fetcher, emit, run.stats)
        connector = BrowserConnector(source, ctx)
        run.pool = connector.pool
        async for record in connector.fetch():
            run.records.append(record)
            if during is not None:
                await during(run)
    return run


def test_chromium_is_found() -> None:
    path = find_chromium(None)
    assert path is None or os.access(path, os.X_OK)
    with pytest.raises(FileNotFoundError, match="TRAWL_BROWSER_PATH=/nope"):
        find_chromium("/nope")


async def test_js_injected_content_is_extracted_and_the_pattern_remembered(demo_site: DemoSite) -> None:
    source = _source(
        start_urls=[f"{demo_site.url}/js/"],
        follow={"allow": [r"/js/products/\d+$"]},
        record_urls=r"/js/products/\d+$",
        wait_for={"selector": "span.sku"},
    )

    run = await _crawl(source, _settings())

    got = {r.data["sku"]: r.data for r in run.records}
    assert len(got) == JS_DEMO_COUNT
    for i in range(1, JS_DEMO_COUNT + 1):
        p = product(i)
        assert got[p.sku]["name"] == p.name and got[p.sku]["price"] == f"{p.price:.2f}"
    assert run.kinds() == {"fetched": JS_DEMO_COUNT + 1}
    assert run.stats.pages == JS_DEMO_COUNT + 1  # each page once, whichever path it took
    render = run.stats.render
    # The index is plain HTML; the first product pages tried HTTP, then the pattern went straight to the browser.
    assert render["http"] == 1
    assert render["http+browser"] >= 1 and render["http+browser"] + render["browser"] == JS_DEMO_COUNT
    assert render["browser"] >= JS_DEMO_COUNT - _settings().per_host_concurrency
    assert run.pool is not None and (demo_site.url.split("//")[1], "/js/products/{n}") in run.pool.needs_browser
    assert url_pattern(f"{demo_site.url}/js/products/12?x=1")[1] == "/js/products/{n}"


async def test_html_only_pages_are_never_rendered_in_auto_mode(demo_site: DemoSite) -> None:
    urls = [f"{demo_site.url}/products/{i}" for i in range(1, 31)]
    run = await _crawl(_source(urls=urls), _settings())

    assert len(run.records) == 30
    assert run.stats.render == {"http": 30}
    assert run.pool is not None and sum(run.pool.navigations.values()) == 0 and run.pool.launches == 0


async def test_render_always_and_robots_and_resource_blocking(demo_site: DemoSite) -> None:
    urls = [f"{demo_site.url}/products/{i}" for i in range(1, 4)]
    run = await _crawl(_source(urls=urls, render="always"), _settings())

    assert len(run.records) == 3 and run.stats.render == {"browser": 3}
    assert run.pool is not None and run.pool.navigations == Counter(urls)
    assert run.pool.blocked["type:image"] >= 3  # each product page's <img> was not loaded
    assert not [p for p in demo_site.requests if p.startswith("/img/")]


@pytest.fixture
async def odd_site() -> AsyncIterator[str]:
    """Pages that misbehave in a browser: no selector ever, a load that never ends, forbidden subresources."""

    async def never(request: web.Request) -> web.Response:
        return web.Response(text="<html><body><p>no sku here, ever</p></body></html>", content_type="text/html")

    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def leaky(request: web.Request) -> web.Response:
        body = (
            "<html><body><span class='sku'>LEAK-1</span><h1 class='name'>Leaky</h1>"
            "<img src='http://169.254.169.254/latest/meta-data/x.png'>"
            "<script src='http://10.0.0.1/x.js'></script>"
            "<script>fetch('http://10.0.0.2/beacon').catch(function () {});</script>"
            "</body></html>"
        )
        return web.Response(text=body, content_type="text/html")

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /private\n", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/never", never)
    app.router.add_get("/hang", hang)
    app.router.add_get("/leaky", leaky)
    app.router.add_get("/private/page", never)
    app.router.add_get("/robots.txt", robots)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_page_that_never_shows_its_selector_fails_cleanly(odd_site: str) -> None:
    source = _source(urls=[f"{odd_site}/never"], render="always", wait_for={"selector": "span.sku"})
    run = await _crawl(source, _settings(browser_wait_timeout=1.0))

    [outcome] = run.outcomes
    assert outcome.outcome.value == "failed" and outcome.attempts == 1  # a missing selector is not retried
    assert "selector 'span.sku' did not appear within 1.0s" in (outcome.error or "")
    assert not run.records


async def test_a_page_that_hangs_is_closed_and_fails(odd_site: str) -> None:
    source = _source(urls=[f"{odd_site}/hang"], render="always")
    run = await _crawl(source, _settings(browser_navigation_timeout=1.0, max_retries=1))

    [outcome] = run.outcomes
    assert outcome.outcome.value == "failed" and outcome.attempts == 2
    assert "Timeout" in (outcome.error or "")


async def test_page_requests_to_forbidden_networks_are_blocked(odd_site: str) -> None:
    source = _source(urls=[f"{odd_site}/leaky", f"{odd_site}/private/page"], render="always", block_resources=[])
    run = await _crawl(source, _settings())

    assert [r.data["sku"] for r in run.records] == ["LEAK-1"]
    assert run.pool is not None and run.pool.blocked["network"] >= 3  # metadata image, 10.0.0.1 script, beacon
    kinds = {o.url.rsplit("/", 1)[1]: o.outcome.value for o in run.outcomes}
    assert kinds == {"leaky": "fetched", "page": "skipped_robots"}
    assert f"{odd_site}/private/page" not in run.pool.navigations


@pytest.mark.skipif(os.geteuid() != 0, reason="Chromium's sandbox runs for a non-root user")
async def test_the_sandbox_asked_for_as_root_fails_clearly(odd_site: str) -> None:
    source = _source(urls=[f"{odd_site}/never"], render="always")
    run = await _crawl(source, _settings(browser_sandbox=True))

    [outcome] = run.outcomes
    assert outcome.outcome.value == "failed" and outcome.attempts == 1
    assert "TRAWL_BROWSER_SANDBOX=true, but trawl runs as root" in (outcome.error or "")
    assert run.pool is not None and run.pool.launches == 0


def _chromium_pids() -> list[int]:
    """This process's Chromium main processes (descendants, not renderers or helpers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    me = os.getpid()

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == me:
                return True
        return False

    found = []
    for pid in parents:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"chrom" in cmd[0] and not any(a.startswith(b"--type=") for a in cmd) and descends(pid):
            found.append(pid)
    return found


@pytest.mark.slow
async def test_a_killed_browser_is_restarted_and_every_page_loads(demo_site: DemoSite) -> None:
    urls = [f"{demo_site.url}/js/products/{i}" for i in range(1, 41)]
    source = _source(urls=urls, render="always", wait_for={"selector": "span.sku"})
    killed: list[int] = []

    async def kill_once(run: Run) -> None:
        if not killed and len(run.records) >= 8:
            for pid in await asyncio.to_thread(_chromium_pids):  # reads /proc
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    run = await _crawl(source, _settings(browser_pages=4, max_retries=3), during=kill_once)

    assert killed, "no Chromium process found to kill"
    assert run.pool is not None and run.pool.launches >= 2
    assert sorted(r.data["sku"] for r in run.records) == sorted(product(i).sku for i in range(1, 41))
    assert run.kinds() == {"fetched": 40}


# --- The browser behind the guard (issue 18): the hostile fleet, allowed networks 127.0.0.0/24 -------------------

GUARD_FIELDS = {"sku": {"selector": "span.sku", "required": True}, "result": {"selector": "#out"}}


def _guarded(hostile: Hostile, **overrides: Any) -> Settings:
    return _settings(allowed_networks=hostile.allowed, max_retries=0, **overrides)


def _guarded_source(**spec: Any) -> BrowserSource:
    base = {"kind": "browser", "name": "js", "key": "sku", "fields": GUARD_FIELDS, "render": "always", "robots": False}
    return BrowserSource.model_validate(base | spec)


def _probe_page(script: str) -> str:
    """A page that runs ``script`` (which fills ``results`` and calls ``done()``), then shows what it saw."""
    return (
        "<html><body><span class='sku'>P-1</span><pre id='out'></pre><script>"
        "const results = {}; function done() { document.getElementById('out').textContent = JSON.stringify(results);"
        " const d = document.createElement('span'); d.className = 'done'; d.textContent = 'done'; document.body.appendChild(d); }"
        f"{script}</script></body></html>"
    )


@pytest.fixture
async def hostile_site(hostile: Hostile) -> AsyncIterator[str]:
    """Pages on 127.0.0.1 (allowed) that try every way a browser has to reach the forbidden listener."""
    forbidden = hostile.forbidden.base
    port = hostile.forbidden.port

    def page(body: str) -> web.Response:
        return web.Response(text=body, content_type="text/html")

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPFound(forbidden + "/latest/meta-data/")

    async def bounce_tls(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://{FORBIDDEN_IP}:{port}/latest/meta-data/")

    async def links(request: web.Request) -> web.Response:
        return page(
            f"<html><body><span class='sku'>L-1</span><a href='{forbidden}/more'>more</a>"
            f"<a href='http://link.test:{port}/more'>more</a></body></html>"
        )

    async def subresources(request: web.Request) -> web.Response:
        return page(
            "<html><body><span class='sku'>S-1</span>"
            f"<img src='{forbidden}/direct.png'><img src='/bounce'>"
            f"<script src='{forbidden}/direct.js'></script><script src='/bounce'></script>"
            "</body></html>"
        )

    async def websocket(request: web.Request) -> web.Response:
        return page(
            _probe_page(
                "const finish = () => { if (results.ws && results.allowed) done(); };"
                f"const ws = new WebSocket('ws://{FORBIDDEN_IP}:{port}/');"
                "ws.onopen = () => { results.ws = 'open'; finish(); };"
                "ws.onerror = () => { results.ws = 'error'; finish(); };"
                "const ok = new WebSocket('ws://' + location.host + '/echo');"  # allowed: through the proxy too
                "ok.onopen = () => ok.send('hi');"
                "ok.onmessage = (e) => { results.allowed = e.data; finish(); };"
                "ok.onerror = () => { results.allowed = 'error'; finish(); };"
            )
        )

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo:{message.data}")
        return ws

    async def fetches(request: web.Request) -> web.Response:
        return page(
            _probe_page(
                "const seen = (k) => [(r) => { results[k] = 'status ' + r.status; },"
                " (e) => { results[k] = 'failed'; }];"
                f"Promise.all([fetch('{forbidden}/direct').then(...seen('direct')),"
                " fetch('/bounce').then(...seen('redirect')), fetch('/plain').then(...seen('allowed')),"
                f" fetch('{forbidden}/nocors', {{mode: 'no-cors'}}).then(...seen('no-cors'))]).then(done);"
            )
        )

    async def webrtc(request: web.Request) -> web.Response:
        return page(
            _probe_page(
                f"const pc = new RTCPeerConnection({{iceServers: [{{urls: 'stun:{FORBIDDEN_IP}:{port}'}}]}});"
                "results.candidates = [];"
                "pc.onicecandidate = (e) => { if (e.candidate) results.candidates.push(e.candidate.candidate); };"
                "pc.onicegatheringstatechange = () => {"
                " if (pc.iceGatheringState === 'complete') { results.state = 'complete'; done(); } };"
                "pc.createDataChannel('x'); pc.createOffer().then((o) => pc.setLocalDescription(o));"
                "setTimeout(() => { results.state = results.state || 'timeout'; done(); }, 3000);"
            )
        )

    async def busy_loading(request: web.Request) -> web.Response:
        return page("<html><body><span class='sku'>B-1</span><script>while (true) {}</script></body></html>")

    async def busy_loaded(request: web.Request) -> web.Response:
        return page(
            "<html><body><span class='sku'>B-2</span><script>"
            "window.addEventListener('load', () => setTimeout(() => { while (true) {} }, 0));"
            "</script></body></html>"
        )

    async def huge(request: web.Request) -> web.Response:
        return page(
            "<html><body><span class='sku'>H-1</span><p id='big'></p><script>"
            "document.getElementById('big').textContent = 'x'.repeat(3 * 1024 * 1024);</script></body></html>"
        )

    async def plain(request: web.Request) -> web.Response:
        return page(f"<html><body><span class='sku'>{request.host}</span></body></html>")

    app = web.Application()
    for path, handler in {
        "/bounce": bounce,
        "/bounce-tls": bounce_tls,
        "/links": links,
        "/subresources": subresources,
        "/websocket": websocket,
        "/echo": echo,
        "/fetch": fetches,
        "/webrtc": webrtc,
        "/busy-loading": busy_loading,
        "/busy-loaded": busy_loaded,
        "/huge": huge,
        "/plain": plain,
    }.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _outcomes(run: Run) -> dict[str, tuple[str, str]]:
    return {o.url: (o.outcome.value, o.error or "") for o in run.outcomes}


async def test_a_redirect_to_a_forbidden_network_is_blocked(hostile: Hostile, hostile_site: str) -> None:
    urls = [f"{hostile_site}/bounce", f"{hostile_site}/bounce-tls"]  # plain http, and a CONNECT for https
    run = await _crawl(_guarded_source(urls=urls), _guarded(hostile))

    got = _outcomes(run)
    assert got[urls[0]][0] == "blocked_network", got
    assert got[urls[1]][0] == "blocked_network", got
    assert f"redirect to {hostile.forbidden.url()}" in got[urls[0]][1]
    assert "a network the settings do not allow" in got[urls[1]][1]
    assert not run.records
    assert hostile.forbidden.hits == 0


async def test_a_dns_answer_that_changes_after_the_check_is_blocked(hostile: Hostile, hostile_site: str) -> None:
    # The navigation's check sees 127.0.0.2; every later lookup (the one a connection would use) 127.0.1.1.
    hostile.dns.rebind("rebind.test", "127.0.0.2")
    url = f"http://rebind.test:{hostile.forbidden.port}/latest/meta-data/"
    run = await _crawl(_guarded_source(urls=[url]), _guarded(hostile))

    assert _outcomes(run) == {
        url: ("blocked_network", f"rebind.test resolves to {FORBIDDEN_IP}, a network the settings do not allow")
    }
    assert hostile.forbidden.hits == 0


async def test_a_link_to_a_forbidden_network_is_blocked(hostile: Hostile, hostile_site: str) -> None:
    hostile.dns.rebind("link.test", "127.0.0.2")  # allowed when the link is checked, forbidden when connected
    source = _guarded_source(start_urls=[f"{hostile_site}/links"], follow={"same_host": False})
    run = await _crawl(source, _guarded(hostile))

    got = _outcomes(run)
    assert got[f"{hostile_site}/links"][0] == "fetched"
    assert got[hostile.forbidden.url("/more")][0] == "blocked_network"
    assert got[f"http://link.test:{hostile.forbidden.port}/more"][0] == "blocked_network"
    assert [r.data["sku"] for r in run.records] == ["L-1"]
    assert hostile.forbidden.hits == 0


async def test_subresources_on_a_forbidden_network_are_refused(hostile: Hostile, hostile_site: str) -> None:
    url = f"{hostile_site}/subresources"
    run = await _crawl(_guarded_source(urls=[url], block_resources=[]), _guarded(hostile))

    assert _outcomes(run)[url][0] == "fetched" and [r.data["sku"] for r in run.records] == ["S-1"]
    assert run.pool is not None and run.pool.blocked["network"] >= 4  # 2 images, 2 scripts (direct and redirected)
    assert hostile.forbidden.hits == 0


async def test_a_websocket_to_a_forbidden_network_is_refused(hostile: Hostile, hostile_site: str) -> None:
    url = f"{hostile_site}/websocket"
    run = await _crawl(_guarded_source(urls=[url], wait_for={"selector": "span.done"}), _guarded(hostile))

    [record] = run.records
    assert json.loads(record.data["result"]) == {"ws": "error", "allowed": "echo:hi"}
    assert run.pool is not None and run.pool.blocked["network"] >= 1
    assert hostile.forbidden.hits == 0


async def test_fetch_from_page_script_to_a_forbidden_network_is_refused(hostile: Hostile, hostile_site: str) -> None:
    url = f"{hostile_site}/fetch"
    run = await _crawl(_guarded_source(urls=[url], wait_for={"selector": "span.done"}), _guarded(hostile))

    [record] = run.records
    results = json.loads(record.data["result"])
    assert results["direct"] == results["redirect"] == "failed" and results["allowed"] == "status 200"
    assert results["no-cors"] != "status 200"  # an opaque answer at most: the proxy's refusal, never the secret
    assert SECRET not in record.data["result"]
    assert run.pool is not None and run.pool.blocked["network"] >= 3
    assert hostile.forbidden.hits == 0


async def test_webrtc_sends_no_stun_to_a_forbidden_network(hostile: Hostile, hostile_site: str) -> None:
    url = f"{hostile_site}/webrtc"
    run = await _crawl(_guarded_source(urls=[url], wait_for={"selector": "span.done"}), _guarded(hostile))

    [record] = run.records
    assert json.loads(record.data["result"])["state"] in ("complete", "timeout")
    await asyncio.sleep(0.2)  # a datagram in flight would be counted by now
    assert hostile.forbidden.hits == 0


async def test_a_busy_looping_page_fails_within_the_page_deadline(hostile: Hostile, hostile_site: str) -> None:
    urls = [f"{hostile_site}/busy-loading", f"{hostile_site}/busy-loaded"]
    source = _guarded_source(urls=urls, javascript=True)
    t0 = time.monotonic()
    async with asyncio.timeout(30):  # before the deadline existed, the second page held its slot for ever
        run = await _crawl(source, _guarded(hostile, browser_page_timeout=2.0, browser_navigation_timeout=20.0))
    took = time.monotonic() - t0

    for url in urls:
        kind, error = _outcomes(run)[url]
        assert kind == "failed" and "page did not finish within 2.0s (browser_page_timeout)" in error
    # Not retried (it would loop again); the time over the deadline is the browser's launch on a busy machine.
    assert all(o.attempts == 1 and o.elapsed_ms < 9000 for o in run.outcomes)
    assert took < 12 and not run.records  # the navigation timeout alone would take 20s
    assert hostile.forbidden.hits == 0


async def test_a_rendered_dom_larger_than_max_body_bytes_fails(hostile: Hostile, hostile_site: str) -> None:
    url = f"{hostile_site}/huge"  # ~300 bytes served, 3 MiB once its script ran
    run = await _crawl(_guarded_source(urls=[url]), _guarded(hostile, max_body_bytes=1024 * 1024))

    assert _outcomes(run) == {url: ("failed", "rendered HTML larger than 1048576 bytes (max_body_bytes)")}
    assert not run.records

    # Without its scripts the same page is small: the cap applies to what was rendered (and is read with JS off).
    run = await _crawl(_guarded_source(urls=[url], javascript=False), _guarded(hostile, max_body_bytes=1024 * 1024))
    assert _outcomes(run) == {url: ("fetched", "")} and [r.data["sku"] for r in run.records] == ["H-1"]
    assert hostile.forbidden.hits == 0


async def test_idle_and_surplus_browser_contexts_are_closed(hostile: Hostile, hostile_site: str) -> None:
    port = hostile_site.rsplit(":", 1)[1]
    hosts = ["a.test", "b.test", "c.test", "d.test"]
    for host in hosts:
        hostile.dns.set(host, ["127.0.0.1"])  # names only the proxy resolves: Chromium never does
    urls = [f"http://{host}:{port}/plain" for host in hosts]
    settings = _guarded(hostile, browser_pages=1, browser_contexts=2, browser_context_idle=60.0)
    open_contexts: list[int] = []

    async def count(run: Run) -> None:
        assert run.pool is not None and run.pool._browser is not None
        open_contexts.append(len(run.pool._browser.contexts))  # what Chromium holds, not the pool's bookkeeping

    run = await _crawl(_guarded_source(urls=urls), settings, during=count)

    assert sorted(r.data["sku"] for r in run.records) == [f"{host}:{port}" for host in hosts]
    assert run.pool is not None and run.pool.evicted == 2 and max(open_contexts) <= 2

    # Idle past browser_context_idle: closed when the next page is taken, whatever the cap.
    settings = _guarded(hostile, browser_contexts=10, browser_context_idle=0.3)
    async with Fetcher(settings) as fetcher:
        pool = BrowserPool.of(fetcher)
        async with pool.page("a.test", True, ()):
            pass
        await asyncio.sleep(0.5)
        async with pool.page("b.test", True, ()):
            assert pool.evicted == 1 and pool.contexts == 1
    assert hostile.forbidden.hits == 0
