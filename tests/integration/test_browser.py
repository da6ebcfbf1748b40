"""`browser` sources against local pages and real Chromium: rendering, adaptive mode, timeouts, crashes, guards."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

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

    throttled: Counter[str] = Counter()

    async def busy(request: web.Request) -> web.Response:
        throttled[request.path] += 1
        if throttled[request.path] <= 2:  # twice per page: 429 with Retry-After, then the page
            return web.Response(status=429, headers={"Retry-After": "0.05"}, text="slow down")
        n = request.match_info["n"]
        body = f"<html><body><span class='sku'>BUSY-{n}</span><h1 class='name'>Busy {n}</h1></body></html>"
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get(r"/busy/{n:\d+}", busy)
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


async def test_a_throttled_navigation_waits_without_using_retries(odd_site: str) -> None:
    source = _source(urls=[f"{odd_site}/busy/{n}" for n in (1, 2, 3)], render="always")
    run = await _crawl(source, _settings(max_retries=0, breaker_fail_max=2))

    # max_retries 0 and fail_max 2: two 429s per page used no retry and opened no breaker; attempts count them.
    assert run.kinds() == {"fetched": 3}
    assert sorted(o.attempts for o in run.outcomes) == [3, 3, 3]
    assert sorted(r.key or "" for r in run.records) == ["BUSY-1", "BUSY-2", "BUSY-3"]


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
