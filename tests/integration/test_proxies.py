"""Forward proxies: rotation, a proxy killed mid-run benched by its own breaker, credentials from the environment,
the network guard on the target and on the proxy, api sources through httpx."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import scrapy
from aiohttp import web

from tests.helpers.forward_proxy import ForwardProxy
from tests.helpers.hostile import Hostile
from tests.helpers.sitemap_site import SitemapSite
from trawl.config import ApiSource, BrowserSource, HtmlSource, SpiderSource, load_sources
from trawl.connectors import SourceContext, SourceStats, connector_for
from trawl.connectors.browser import find_chromium
from trawl.fetch import Fetcher
from trawl.records import Outcome, Record
from trawl.settings import Settings


async def crawl(
    src: HtmlSource | ApiSource | SpiderSource, settings: Settings
) -> tuple[list[Record], list[Outcome], Fetcher]:
    records: list[Record] = []
    outcomes: list[Outcome] = []

    async def emit(o: Outcome) -> None:
        outcomes.append(o)

    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("run-1", settings, fetcher, emit, SourceStats())
        async for item in connector_for(src, ctx).fetch():
            assert isinstance(item, Record)
            records.append(item)
    return records, outcomes, fetcher


def html(site: SitemapSite, n: int, **kw: Any) -> HtmlSource:
    return HtmlSource.model_validate(
        {
            "kind": "html",
            "name": "items",
            "urls": [f"{site.url}/item/{i}" for i in range(1, n + 1)],
            "fields": {"title": {"selector": "h1"}},
            "robots": False,
            "conditional": False,
            **kw,
        }
    )


def carried(proxy: ForwardProxy) -> Counter[str]:
    return Counter(target.rsplit("/", 2)[-2] + "/" + target.rsplit("/", 1)[-1] for _, target in proxy.log)


async def test_requests_rotate_over_the_proxies_and_outcomes_name_them(settings: Settings) -> None:
    async with SitemapSite(0) as site, ForwardProxy() as p1, ForwardProxy() as p2:
        src = html(site, 40, proxies=[p1.url, p2.url])
        records, outcomes, _ = await crawl(src, settings)
        assert len(records) == 40
        assert len(p1.log) == len(p2.log) == 20  # per request, in turn
        assert sum(site.requests.values()) == 40
        by_proxy = Counter(o.proxy for o in outcomes)
        assert by_proxy == {p1.label: 20, p2.label: 20}
        for o in outcomes:  # the row names the proxy that carried that very URL
            proxy = p1 if o.proxy == p1.label else p2
            assert ("GET", o.url) in proxy.log
        assert all("@" not in (o.envelope()["proxy"] or "") for o in outcomes)


async def test_sticky_keeps_each_host_on_one_proxy(settings: Settings) -> None:
    async with (
        SitemapSite(0) as a,
        SitemapSite(0, host="127.0.0.2") as b,
        ForwardProxy() as p1,
        ForwardProxy() as p2,
    ):
        urls = [f"{s.url}/item/{i}" for s in (a, b) for i in range(10)]
        src = html(a, 0, urls=urls, proxies=[p1.url, p2.url], proxy_rotation="sticky")
        _, outcomes, _ = await crawl(src, settings)
        per_host = {host: {o.proxy for o in outcomes if host in o.url} for host in ("127.0.0.1", "127.0.0.2")}
        assert all(len(v) == 1 for v in per_host.values()), per_host
        assert len(outcomes) == 20


async def test_a_proxy_killed_mid_run_is_benched_and_the_other_carries_on(settings: Settings) -> None:
    s = settings.model_copy(update={"breaker_fail_max": 3, "breaker_reset_timeout": 60, "max_retries": 1})
    async with SitemapSite(0) as site, ForwardProxy() as p1, ForwardProxy() as p2:
        site.delay = 0.01
        src = html(site, 300, proxies=[p1.url, p2.url])

        async def kill_later() -> None:
            while len(p1.log) < 40:  # noqa: ASYNC110 - polls the proxy's own log
                await asyncio.sleep(0.005)
            await p1.kill()

        killer = asyncio.create_task(kill_later())
        records, outcomes, fetcher = await crawl(src, s)
        await killer
        # Nothing lost: every URL fetched once, its record staged.
        assert len(records) == 300
        assert Counter(o.outcome.value for o in outcomes) == {"fetched": 300}
        assert {o.url for o in outcomes} == {f"{site.url}/item/{i}" for i in range(1, 301)}
        assert fetcher.proxy_breakers.get(f"proxy {p1.label}").state == "open"
        assert fetcher.proxy_breakers.get(f"proxy {p2.label}").state == "closed"
        # The target host is not blamed for the proxy's death.
        assert fetcher.breakers.trips() == 0
        assert Counter(o.proxy for o in outcomes)[p2.label] > 200


async def test_every_proxy_down_fails_the_urls_naming_the_proxies(settings: Settings) -> None:
    s = settings.model_copy(update={"breaker_fail_max": 2, "max_retries": 1})
    async with SitemapSite(0) as site, ForwardProxy() as p1:
        await p1.kill()
        _, outcomes, fetcher = await crawl(html(site, 5, proxies=[p1.url]), s)
        assert {o.outcome.value for o in outcomes} == {"failed"}
        assert any("every proxy is benched" in (o.error or "") for o in outcomes)
        assert fetcher.breakers.trips() == 0 and not site.requests


async def test_proxy_credentials_from_the_environment_are_sent_and_masked(settings: Settings, tmp_path: Path) -> None:
    async with SitemapSite(0) as site, ForwardProxy(auth="crawler:s3cret-pw") as good:
        spec = tmp_path / "sources.yaml"
        await asyncio.to_thread(
            spec.write_text,
            "sources:\n- kind: html\n  name: items\n  robots: false\n  conditional: false\n"
            f"  urls: ['{site.url}/item/1']\n  fields: {{title: {{selector: h1}}}}\n"
            f"  proxies: ['http://crawler:${{PROXY_PW}}@127.0.0.1:{good.port}']\n",
        )
        [src] = (await asyncio.to_thread(load_sources, spec, env={"PROXY_PW": "s3cret-pw"})).sources
        assert isinstance(src, HtmlSource)
        records, outcomes, _ = await crawl(src, settings)
        assert len(records) == 1 and good.log and good.refused == 0
        assert outcomes[0].proxy == good.label
        assert "s3cret-pw" not in str(outcomes[0].envelope())


async def test_a_proxy_refusing_our_credentials_is_a_proxy_failure(settings: Settings) -> None:
    s = settings.model_copy(update={"breaker_fail_max": 2, "max_retries": 0})
    async with SitemapSite(0) as site, ForwardProxy(auth="a:b") as p:
        bad = f"http://a:wrong@127.0.0.1:{p.port}"
        _, outcomes, fetcher = await crawl(html(site, 3, proxies=[bad]), s)
        assert {o.outcome.value for o in outcomes} == {"failed"}
        assert p.refused >= 2 and not site.requests
        assert fetcher.proxy_breakers.get(f"proxy http://127.0.0.1:{p.port}").state == "open"
        assert fetcher.breakers.trips() == 0


async def test_the_guard_checks_the_target_and_the_proxy(hostile: Hostile) -> None:
    settings = Settings(allowed_networks=hostile.allowed, max_retries=0, connect_timeout=2, total_timeout=5)
    async with SitemapSite(0) as site, ForwardProxy() as p:
        # A target on a forbidden address is refused before anything goes to the proxy.
        src = html(site, 0, urls=[hostile.forbidden.url("/x")], proxies=[p.url])
        _, outcomes, _ = await crawl(src, settings)
        assert [o.outcome.value for o in outcomes] == ["blocked_network"]
        assert p.log == []
        # A proxy on a forbidden address is not connected to: it must be allowed explicitly.
        src = html(site, 1, proxies=[f"http://127.0.1.1:{hostile.forbidden.port}"])
        _, outcomes, _ = await crawl(src, settings)
        assert [o.outcome.value for o in outcomes] == ["blocked_network"]
        assert "proxy http://127.0.1.1" in (outcomes[0].error or "")
        assert not site.requests
    assert hostile.forbidden.hits == 0


async def test_api_sources_go_through_the_proxies(settings: Settings) -> None:
    async def items(request: web.Request) -> web.Response:
        return web.json_response({"items": [{"id": 1}, {"id": 2}]})

    app = web.Application()
    app.router.add_get("/items", items)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with ForwardProxy() as p1, ForwardProxy() as p2:
            src = ApiSource.model_validate(
                {
                    "kind": "api",
                    "name": "things",
                    "url": f"http://127.0.0.1:{port}/items",
                    "items_path": "items",
                    "key": "id",
                    "fields": {"id": {"type": "int"}},
                    "robots": False,
                    "proxies": [p1.url, p2.url],
                }
            )
            records, outcomes, _ = await crawl(src, settings)
            assert len(records) == 2
            assert len(p1.log) + len(p2.log) == 1
            assert outcomes[0].proxy in (p1.label, p2.label)
    finally:
        await runner.cleanup()


def test_settings_proxies_and_bad_proxy_urls() -> None:
    assert Settings(proxies=["http://p.test:3128"]).proxies == ["http://p.test:3128"]
    for bad, why in [
        ("socks5://p.test:1080", "socks5:// is not supported"),
        ("http://p.test", "needs a port"),
        ("ftp://p.test:21", "not an http"),
        ("http://p.test:3128/path", "no path"),
    ]:
        with pytest.raises(ValueError, match=why):
            Settings(proxies=[bad])


class ItemsSpider(scrapy.Spider):
    """One request per ``/item/{i}`` of ``base`` (``n`` of them), one item each."""

    name = "items"

    def __init__(self, base: str, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base, self.n = base, int(n)

    async def start(self) -> AsyncIterator[Any]:
        for i in range(self.n):
            yield scrapy.Request(f"{self.base}/item/{i}")

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"url": response.url, "title": response.css("h1::text").get()}


async def test_spider_sources_go_through_the_proxies(settings: Settings) -> None:
    async with SitemapSite(0) as site, ForwardProxy() as p1, ForwardProxy() as p2:
        src = SpiderSource.model_validate(
            {
                "kind": "spider",
                "name": "crawled",
                "spider": f"{__name__}:ItemsSpider",
                "args": {"base": site.url, "n": 20},
                "robots": False,
                "proxies": [p1.url, p2.url],
            }
        )
        records, outcomes, _fetcher = await crawl(src, settings)
        assert len(records) == 20
        # Scrapy's requests, each through one of the proxies in turn; the outcome names it.
        assert len(p1.log) == len(p2.log) == 10
        assert Counter(o.proxy for o in outcomes) == {p1.label: 10, p2.label: 10}
        assert sum(site.requests.values()) == 20


async def test_a_spiders_proxy_killed_mid_run_is_benched(settings: Settings) -> None:
    s = settings.model_copy(update={"breaker_fail_max": 2, "breaker_reset_timeout": 60, "max_retries": 3})
    async with SitemapSite(0) as site, ForwardProxy() as p1, ForwardProxy() as p2:
        site.delay = 0.01
        await p1.kill()
        src = SpiderSource.model_validate(
            {
                "kind": "spider",
                "name": "crawled",
                "spider": f"{__name__}:ItemsSpider",
                "args": {"base": site.url, "n": 30},
                "robots": False,
                "proxies": [p1.url, p2.url],
            }
        )
        records, outcomes, fetcher = await crawl(src, s)
        assert len(records) == 30 and {o.outcome.value for o in outcomes} == {"fetched"}
        assert fetcher.proxy_breakers.get(f"proxy {p1.label}").state == "open"
        assert fetcher.breakers.trips() == 0  # the site is not blamed


@pytest.mark.skipif(find_chromium(None) is None, reason="no Chromium")
async def test_browser_sources_go_through_the_proxies(settings: Settings) -> None:
    s = settings.model_copy(update={"browser_wait_timeout": 5.0, "browser_navigation_timeout": 10.0})
    async with SitemapSite(0) as site, ForwardProxy() as p1, ForwardProxy() as p2:
        src = BrowserSource.model_validate(
            {
                "kind": "browser",
                "name": "rendered",
                "render": "always",
                "urls": [f"{site.url}/item/{i}" for i in range(6)],
                "fields": {"title": {"selector": "h1"}},
                "robots": False,
                "proxies": [p1.url, p2.url],
            }
        )
        records, outcomes, _fetcher = await crawl(src, s)
        assert sorted(r.data["title"] for r in records) == [f"item {i}" for i in range(6)]
        # Chromium's navigations left through trawl's guarded proxy and on through the forward proxies, in turn.
        carried = [t for p in (p1, p2) for _, t in p.log]
        assert sorted(carried) == sorted(f"{site.url}/item/{i}" for i in range(6))
        assert p1.log and p2.log
        assert {o.outcome.value for o in outcomes} == {"fetched"}
