"""`spider` sources against real local servers: Scrapy in the test's loop, under the fetch layer's rules."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import scrapy
from aiohttp import web

from sinks.stage import LocalStager
from tests.helpers.hostile import FORBIDDEN_IP, Hostile
from trawl.config import ApiSource, SpiderSource
from trawl.connectors import SourceContext, SourceStats
from trawl.connectors.spider import SpiderConnector
from trawl.crawler import crawl_source
from trawl.demo.account import ORDER_COUNT, order
from trawl.demo.site import PAGE_COUNT, PRODUCT_COUNT, DemoSite, DemoSiteThread, product
from trawl.errors import ConfigError
from trawl.fetch import Fetcher
from trawl.logs import bind, configure_logging
from trawl.metrics import METRICS
from trawl.records import Outcome, Record
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

HERE = sys.modules[__name__].__name__  # test spiders below are loaded as `HERE:Class`
SCRAPY_HEADER = "X-Via"


# --- spiders used by these tests only ----------------------------------------------------------------------------


class PathsSpider(scrapy.Spider):
    """Requests ``base`` + each of ``paths`` (comma-separated), with an ``X-Via: scrapy`` header; one item each."""

    name = "paths"

    def __init__(self, base: str, paths: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base, self.paths = base, paths.split(",")

    async def start(self) -> AsyncIterator[Any]:
        for p in self.paths:
            yield scrapy.Request(self.base + p, headers={SCRAPY_HEADER: "scrapy"}, dont_filter=True)

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"url": response.url, "status": response.status}


class ManyItemsSpider(scrapy.Spider):
    """``per_page`` items from each of the demo catalogue's pages: many items from few requests."""

    name = "many"

    def __init__(self, base: str, per_page: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = [f"{base}/catalogue/page/{n}" for n in range(1, 11)]
        self.per_page = int(per_page)

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for i in range(self.per_page):
            yield {"id": f"{response.url}#{i}", "n": i}


# --- helpers -------------------------------------------------------------------------------------------------------


class Run:
    """One spider source through its connector with a real Fetcher; records and outcomes kept."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[Record] = []
        self.outcomes: list[Outcome] = []
        self.stats = SourceStats()
        self.connector: SpiderConnector | None = None

    async def emit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def ctx(self, fetcher: Fetcher) -> SourceContext:
        return SourceContext("run-spider-1", self.settings, fetcher, self.emit, self.stats)

    async def spider(self, source: SpiderSource, fetcher: Fetcher | None = None) -> list[Record]:
        if fetcher is None:
            async with Fetcher(self.settings) as own:
                return await self.spider(source, own)
        self.connector = SpiderConnector(source, self.ctx(fetcher))
        async for record in self.connector.fetch():
            self.records.append(record)
        return self.records

    def kinds(self) -> Counter[str]:
        return Counter(o.outcome.value for o in self.outcomes)


def spider_source(spider: str, **args: Any) -> SpiderSource:
    return SpiderSource.model_validate({"kind": "spider", "name": "spidered", "spider": spider, "args": args})


def _metric(name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(
        sample.value
        for family in METRICS.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class LocalApp:
    """An aiohttp app on a free loopback port (the test's loop), counting requests by path and header."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.seen: Counter[str] = Counter()
        self.seen_by: Counter[tuple[str, str]] = Counter()
        app.middlewares.append(self._count)
        self._runner: web.AppRunner | None = None
        self.url = ""

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen[request.path] += 1
        self.seen_by[(request.path, request.headers.get(SCRAPY_HEADER, "trawl"))] += 1
        return await handler(request)

    async def __aenter__(self) -> LocalApp:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _ok(text: str = "ok") -> web.Response:
    return web.Response(text=f"<html><body>{text}</body></html>", content_type="text/html")


# --- the example spiders -------------------------------------------------------------------------------------------


async def test_books_spider_crawls_every_product_with_one_outcome_per_url(
    settings: Settings, demo_site: DemoSite
) -> None:
    run = Run(settings)
    records = await run.spider(spider_source("spiders.books:BooksSpider", base_url=demo_site.url))

    assert len(records) == PRODUCT_COUNT
    by_sku = {r.data["sku"]: r for r in records}
    assert len(by_sku) == PRODUCT_COUNT
    p = product(5)
    assert by_sku[p.sku].data["price"] == p.price and by_sku[p.sku].url == f"{demo_site.url}/products/5"
    urls = Counter(o.url for o in run.outcomes)
    assert max(urls.values()) == 1  # the start URL is fetched twice by Scrapy, but has one outcome
    assert run.kinds() == {"fetched": PRODUCT_COUNT + PAGE_COUNT}
    assert run.stats.records == PRODUCT_COUNT
    assert run.stats.scrapy["item_scraped_count"] == PRODUCT_COUNT
    assert run.stats.scrapy["finish_reason"] == "finished"
    assert max(n for path, n in demo_site.requests.items() if path.startswith("/products/")) == 1


async def test_orders_spider_logs_in_with_the_csrf_token(settings: Settings, demo_site: DemoSite) -> None:
    run = Run(settings)
    records = await run.spider(
        spider_source("spiders.orders:OrdersSpider", base_url=demo_site.url, password="trawl-demo")
    )

    assert sorted(r.data["number"] for r in records) == [order(i).number for i in range(1, ORDER_COUNT + 1)]
    first = next(r for r in records if r.data["number"] == order(1).number)
    assert first.data["total"] == order(1).total and first.data["placed"] == order(1).placed.isoformat()
    assert run.kinds() == {"fetched": 3}  # the login form, order pages 2 and 3 (page 1 is the POST's redirect)


async def test_orders_spider_without_the_password_gets_nothing(settings: Settings, demo_site: DemoSite) -> None:
    run = Run(settings)
    records = await run.spider(spider_source("spiders.orders:OrdersSpider", base_url=demo_site.url, password="no"))

    assert records == []
    assert run.stats.scrapy["finish_reason"] == "login failed"
    assert not any(path.startswith("/account/orders") and n for path, n in demo_site.requests.items())


# --- Scrapy in the loop, more than once ----------------------------------------------------------------------------


async def test_runs_twice_in_one_loop_with_identical_results(settings: Settings, demo_site: DemoSite) -> None:
    source = spider_source("spiders.books:BooksSpider", base_url=demo_site.url)
    first, second = Run(settings), Run(settings)
    await first.spider(source)
    await second.spider(source)

    assert len(first.records) == PRODUCT_COUNT
    assert sorted((r.key, r.content_hash) for r in first.records) == sorted(
        (r.key, r.content_hash) for r in second.records
    )
    assert sorted(o.url for o in first.outcomes) == sorted(o.url for o in second.outcomes)


def test_runs_in_two_event_loops_of_one_process(settings: Settings) -> None:
    """Two ``asyncio.run()`` calls, each a fresh loop: no reactor to restart."""
    with DemoSiteThread() as site:
        source = spider_source("spiders.orders:OrdersSpider", base_url=site.url, password="trawl-demo")
        counts = []
        for _ in range(2):
            run = Run(settings)
            asyncio.run(run.spider(source))
            counts.append((len(run.records), dict(run.kinds())))
    assert counts == [(ORDER_COUNT, {"fetched": 3})] * 2


async def test_slow_staging_pauses_the_engine_and_bounds_the_queue(tmp_path: Path, demo_site: DemoSite) -> None:
    settings = Settings(allowed_networks=["127.0.0.0/8"], queue_size=5)
    run = Run(settings)
    source = spider_source(f"{HERE}:ManyItemsSpider", base=demo_site.url, per_page=100)
    seen = 0
    largest = 0
    async with Fetcher(settings) as fetcher:
        run.connector = SpiderConnector(source, run.ctx(fetcher))
        async for _ in run.connector.fetch():
            seen += 1
            largest = max(largest, run.connector._queue.qsize())
            if seen <= 200:
                await asyncio.sleep(0.002)  # a slow consumer
    assert seen == 1000
    assert largest <= 5
    assert run.connector.pauses >= 1
    assert run.kinds() == {"fetched": 10}


# --- the fetch layer's guarantees ----------------------------------------------------------------------------------


async def test_redirect_to_the_metadata_address_is_refused_without_a_connection(settings: Settings) -> None:
    app = web.Application()

    async def to_metadata(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    async def fine(request: web.Request) -> web.Response:
        return _ok()

    app.router.add_get("/go", to_metadata)
    app.router.add_get("/fine", fine)
    async with LocalApp(app) as local:
        run = Run(settings)
        t0 = time.monotonic()
        await run.spider(spider_source(f"{HERE}:PathsSpider", base=local.url, paths="/go,/fine"))
        elapsed = time.monotonic() - t0

    by_url = {o.url: o for o in run.outcomes}
    assert by_url[f"{local.url}/go"].outcome.value == "blocked_network"
    assert "169.254.169.254" in (by_url[f"{local.url}/go"].error or "")
    assert by_url[f"{local.url}/fine"].outcome.value == "fetched"
    assert [r.url for r in run.records] == [f"{local.url}/fine"]
    # The hop was refused next to the download handler, before any connection: no response, no connect wait.
    assert run.stats.scrapy["downloader/response_count"] == 2
    assert elapsed < settings.connect_timeout


async def test_robots_txt_is_obeyed_through_trawls_cache(settings: Settings) -> None:
    app = web.Application()

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /private\n", content_type="text/plain")

    async def page(request: web.Request) -> web.Response:
        return _ok(request.path)

    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/public", page)
    app.router.add_get("/private", page)
    sent = _metric("trawl_requests_total", source="spidered", status_class="2xx")
    ended = _metric("trawl_outcomes_total", source="spidered", outcome="skipped_robots")
    async with LocalApp(app) as local:
        run = Run(settings)
        await run.spider(spider_source(f"{HERE}:PathsSpider", base=local.url, paths="/public,/private"))

    assert {o.url.rsplit("/", 1)[1]: o.outcome.value for o in run.outcomes} == {
        "public": "fetched",
        "private": "skipped_robots",
    }
    assert local.seen["/private"] == 0
    assert local.seen["/robots.txt"] == 1  # fetched once, by trawl's robots cache
    # Scrapy's requests and outcomes are in trawl's metrics like any other source's.
    assert _metric("trawl_requests_total", source="spidered", status_class="2xx") == sent + 1
    assert _metric("trawl_outcomes_total", source="spidered", outcome="skipped_robots") == ended + 1


def _picky_app(fail_for: str) -> web.Application:
    """Every /p/N answers 503 to requests from ``fail_for`` (``scrapy``: with the X-Via header; ``trawl``: without)."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        who = "scrapy" if request.headers.get(SCRAPY_HEADER) == "scrapy" else "trawl"
        if who == fail_for:
            return web.Response(status=503, text="unavailable")
        return web.json_response([{"id": int(request.match_info["n"])}])

    app.router.add_get(r"/p/{n:\d+}", page)
    return app


def _breaker_settings() -> Settings:
    return Settings(
        allowed_networks=["127.0.0.0/8"],
        max_retries=0,
        breaker_fail_max=3,
        breaker_reset_timeout=60,
        per_host_concurrency=1,
    )


def _api(url: str) -> ApiSource:
    return ApiSource.model_validate({"kind": "api", "name": "feed", "url": url, "robots": False, "key": "url"})


async def test_host_failing_for_scrapy_opens_the_breaker_for_the_asyncio_workers() -> None:
    settings = _breaker_settings()
    async with LocalApp(_picky_app(fail_for="scrapy")) as local:
        host = local.url.removeprefix("http://")
        async with Fetcher(settings) as fetcher:
            spider = Run(settings)
            source = spider_source(f"{HERE}:PathsSpider", base=local.url, paths=",".join(f"/p/{i}" for i in range(6)))
            source = source.model_copy(update={"robots": False})
            await spider.spider(source, fetcher)
            assert fetcher.breakers.get(host).state == "open"

            worker = Run(settings)
            ctx = worker.ctx(fetcher)
            resp = await ctx.fetch("feed", f"{local.url}/p/100", transport="httpx", robots=False)

    assert resp is None
    assert spider.kinds() == {"failed": 3, "skipped_breaker": 3}
    assert worker.kinds() == {"skipped_breaker": 1}
    assert local.seen_by[("/p/100", "trawl")] == 0  # the asyncio worker never sent it
    assert sum(n for (_, who), n in local.seen_by.items() if who == "scrapy") == 3


async def test_host_failing_for_the_asyncio_workers_opens_the_breaker_for_scrapy() -> None:
    settings = _breaker_settings()
    async with LocalApp(_picky_app(fail_for="trawl")) as local:
        host = local.url.removeprefix("http://")
        async with Fetcher(settings) as fetcher:
            worker = Run(settings)
            ctx = worker.ctx(fetcher)
            for i in range(3):
                assert await ctx.fetch("feed", f"{local.url}/p/{i}", transport="aiohttp", robots=False) is None
            assert fetcher.breakers.get(host).state == "open"

            spider = Run(settings)
            source = spider_source(f"{HERE}:PathsSpider", base=local.url, paths="/p/10,/p/11")
            await spider.spider(source.model_copy(update={"robots": False}), fetcher)

    assert worker.kinds() == {"failed": 3}
    assert spider.kinds() == {"skipped_breaker": 2}
    assert spider.records == []
    assert sum(n for (_, who), n in local.seen_by.items() if who == "scrapy") == 0


# --- logs and the run summary --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
async def test_scrapy_logs_are_json_lines_with_source_and_run_id(
    settings: Settings, demo_site: DemoSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    bind(run_id="run-logs-1")  # as the crawl flow does
    source = spider_source("spiders.orders:OrdersSpider", base_url=demo_site.url, password="trawl-demo")
    async with Fetcher(settings) as fetcher:
        result = await crawl_source(
            source,
            run_id="run-logs-1",
            settings=settings,
            fetcher=fetcher,
            stager=await asyncio.to_thread(LocalStager, tmp_path),
        )

    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    scrapy_lines = [line for line in lines if str(line.get("logger", "")).startswith("scrapy")]
    assert any(line["event"] == "Spider opened" for line in scrapy_lines)
    assert all(line.get("source") == "spidered" and line.get("run_id") == "run-logs-1" for line in scrapy_lines)
    assert "trawl-demo" not in "".join(str(line) for line in lines)  # the password argument is masked
    assert result.stats["records"] == ORDER_COUNT
    assert result.stats["scrapy"]["item_scraped_count"] == ORDER_COUNT
    finished = next(line for line in lines if line["event"] == "source finished")
    assert finished["scrapy"]["finish_reason"] == "finished"


async def test_an_address_that_changes_after_the_check_is_refused_at_connect(tmp_path: Path) -> None:
    """DNS rebinding: the guard's own lookup said the host was fine, the connection's resolver says otherwise."""
    settings = Settings(allowed_networks=[], connect_timeout=2, total_timeout=5)  # loopback is forbidden

    async def page(request: web.Request) -> web.Response:
        return _ok()

    app = web.Application()
    app.router.add_get("/x", page)
    async with LocalApp(app) as local, Fetcher(settings) as fetcher:
        fetcher.guard._verdicts["localhost"] = (
            float("inf"),
            None,
        )  # as if "localhost" had resolved to a public address when checked
        port = local.url.rsplit(":", 1)[1]
        run = Run(settings)
        source = spider_source(f"{HERE}:PathsSpider", base=f"http://localhost:{port}", paths="/x")
        await run.spider(source.model_copy(update={"robots": False}), fetcher)

    assert [(o.outcome.value, o.url) for o in run.outcomes] == [("blocked_network", f"http://localhost:{port}/x")]
    assert "a network the settings do not allow" in (run.outcomes[0].error or "")
    assert local.seen["/x"] == 0


GATE = "trawl.connectors.spider.GateMiddleware"


class UngatedSpider(PathsSpider):
    """A spider whose own ``custom_settings`` take trawl's gate (and with it the guard) out."""

    name = "ungated"
    custom_settings = {"DOWNLOADER_MIDDLEWARES": {GATE: None}}  # Scrapy's own shape


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("source removes the gate", "DOWNLOADER_MIDDLEWARES sets trawl.connectors.spider.GateMiddleware to None"),
        ("source moves the gate", "DOWNLOADER_MIDDLEWARES sets trawl.connectors.spider.GateMiddleware to 5"),
        ("source swaps the handlers", "DOWNLOAD_HANDLERS_BASE cannot be set"),
        ("spider's custom_settings", r"UngatedSpider \(custom_settings\): DOWNLOADER_MIDDLEWARES sets"),
    ],
)
async def test_a_source_cannot_take_trawls_gate_middleware_out(hostile: Hostile, how: str, match: str) -> None:
    settings = Settings(allowed_networks=hostile.allowed, max_retries=0, connect_timeout=2, total_timeout=5)
    base = f"http://{FORBIDDEN_IP}:{hostile.forbidden.port}"
    scrapy_settings = {
        "source removes the gate": {"DOWNLOADER_MIDDLEWARES": {GATE: None}},
        "source moves the gate": {"DOWNLOADER_MIDDLEWARES": {GATE: 5}},
        "source swaps the handlers": {
            "DOWNLOAD_HANDLERS_BASE": {"http": "scrapy.core.downloader.handlers.http11.HTTP11DownloadHandler"}
        },
    }.get(how, {})
    spider = f"{HERE}:UngatedSpider" if how == "spider's custom_settings" else f"{HERE}:PathsSpider"
    source = SpiderSource.model_validate(
        {
            "kind": "spider",
            "name": "spidered",
            "spider": spider,
            "args": {"base": base, "paths": "/x"},
            "settings": scrapy_settings,
            "robots": False,
        }
    )
    run = Run(settings)
    with pytest.raises(ConfigError, match=match):
        await run.spider(source)
    assert run.records == []
    assert hostile.forbidden.hits == 0
