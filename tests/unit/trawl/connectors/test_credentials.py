"""A source's headers (credentials) go only to the origins they were configured for, on every hop and page."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
import scrapy
from aiohttp import web

from trawl.config import ApiSource, HtmlSource, SpiderSource
from trawl.connectors import SourceContext
from trawl.connectors.spider import SpiderConnector
from trawl.errors import ConfigError
from trawl.fetch import Fetcher
from trawl.records import Outcome
from trawl.settings import Settings

if TYPE_CHECKING:
    from conftest import Harness  # tests/unit/trawl/connectors/conftest.py

CREDENTIALS = {
    "Authorization": "Bearer tok-4f9c1e77",
    "Cookie": "session=cookie-8a2d",
    "X-Api-Key": "key-51b0aa3c",
}
SECRET_BITS = ("tok-4f9c1e77", "cookie-8a2d", "key-51b0aa3c")


class Origin:
    """An aiohttp server on one loopback address that records the headers of every request it gets."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.app = web.Application()
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.base = ""
        self._runner: web.AppRunner | None = None

        @web.middleware
        async def record(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
            self.seen.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
            response: web.StreamResponse = await handler(request)
            return response

        self.app.middlewares.append(record)
        self.routes: dict[str, Callable[[web.Request], Any]] = {}

        async def dispatch(request: web.Request) -> web.StreamResponse:
            handler = self.routes.get(request.path)
            if handler is None:
                raise web.HTTPNotFound()
            response: web.StreamResponse = await handler(request)
            return response

        self.app.router.add_get("/{tail:.*}", dispatch)

    def route(self, path: str, handler: Callable[[web.Request], Any]) -> None:
        self.routes[path] = handler

    def leaked(self) -> list[str]:
        """Which credential bits reached this origin (names and values)."""
        found = []
        for _, headers in self.seen:
            text = repr(headers)
            found += [bit for bit in SECRET_BITS if bit in text]
            found += [name for name in ("authorization", "cookie", "x-api-key") if name in headers]
        return found

    def got_all(self, path: str) -> bool:
        return any(p == path and all(h.get(k.lower()) == v for k, v in CREDENTIALS.items()) for p, h in self.seen)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://{self.host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest_asyncio.fixture
async def origins() -> AsyncIterator[tuple[Origin, Origin]]:
    """Two origins: ``home`` (the source's) on 127.0.0.1 and ``other`` on 127.0.0.2."""
    home, other = Origin("127.0.0.1"), Origin("127.0.0.2")
    await home.start()
    await other.start()
    try:
        yield home, other
    finally:
        await home.close()
        await other.close()


def _json(body: object) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    return handler


def _redirect(to: Callable[[], str]) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(to())

    return handler


def _html(body: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="text/html")

    return handler


def _api(url: str, **kwargs: Any) -> ApiSource:
    return ApiSource.model_validate(
        {"kind": "api", "name": "creds", "url": url, "key": "id", "robots": False, "headers": CREDENTIALS, **kwargs}
    )


async def test_api_redirect_to_another_origin_drops_headers(harness: Harness, origins: tuple[Origin, Origin]) -> None:
    home, other = origins
    home.route("/items", _redirect(lambda: f"{other.base}/items"))
    other.route("/items", _json([{"id": 1}]))

    records = await harness.run(_api(f"{home.base}/items"))

    assert [r.data["id"] for r in records] == [1]
    assert home.got_all("/items")  # the configured origin gets its credentials
    assert [p for p, _ in other.seen] == ["/items"]
    assert other.leaked() == []


async def test_api_redirect_within_the_origin_keeps_headers(harness: Harness, origins: tuple[Origin, Origin]) -> None:
    home, _ = origins
    home.route("/old", _redirect(lambda: f"{home.base}/items"))
    home.route("/items", _json([{"id": 1}]))

    await harness.run(_api(f"{home.base}/old"))

    assert home.got_all("/old") and home.got_all("/items")


async def test_api_next_url_page_on_another_origin_goes_without_headers(
    harness: Harness, origins: tuple[Origin, Origin]
) -> None:
    home, other = origins
    home.route("/p1", lambda r: _json({"items": [{"id": 1}], "next": f"{home.base}/p2"})(r))
    home.route("/p2", lambda r: _json({"items": [{"id": 2}], "next": f"{other.base}/p3"})(r))
    other.route("/p3", _json({"items": [{"id": 3}], "next": None}))
    source = _api(f"{home.base}/p1", items_path="items", pagination={"type": "next_url", "next_path": "next"})

    records = await harness.run(source)

    assert [r.data["id"] for r in records] == [1, 2, 3]
    assert home.got_all("/p1") and home.got_all("/p2")  # same origin: still sent
    assert [p for p, _ in other.seen] == ["/p3"]
    assert other.leaked() == []


async def test_api_link_header_page_on_another_origin_goes_without_headers(
    harness: Harness, origins: tuple[Origin, Origin]
) -> None:
    home, other = origins

    async def first(request: web.Request) -> web.Response:
        return web.json_response([{"id": 1}], headers={"Link": f'<{other.base}/next>; rel="next"'})

    home.route("/first", first)
    other.route("/next", _json([{"id": 2}]))

    records = await harness.run(_api(f"{home.base}/first", pagination={"type": "link_header"}))

    assert [r.data["id"] for r in records] == [1, 2]
    assert home.got_all("/first")
    assert other.leaked() == []


async def test_listed_credentials_origin_gets_the_headers(harness: Harness, origins: tuple[Origin, Origin]) -> None:
    home, other = origins
    home.route("/items", _redirect(lambda: f"{other.base}/items"))
    other.route("/items", _json([{"id": 1}]))

    await harness.run(_api(f"{home.base}/items", credentials_origins=[other.base]))

    assert other.got_all("/items")


async def test_html_redirect_to_another_origin_drops_headers(harness: Harness, origins: tuple[Origin, Origin]) -> None:
    home, other = origins
    home.route("/page", _redirect(lambda: f"{other.base}/page"))
    home.route("/direct", _html("<h1>home</h1>"))
    other.route("/page", _html("<h1>elsewhere</h1>"))
    source = HtmlSource.model_validate(
        {
            "kind": "html",
            "name": "creds",
            "urls": [f"{home.base}/page", f"{home.base}/direct"],
            "robots": False,
            "headers": CREDENTIALS,
            "fields": {"title": {"selector": "h1"}},
        }
    )

    records = await harness.run(source)

    assert sorted(r.data["title"] for r in records) == ["elsewhere", "home"]
    assert home.got_all("/page") and home.got_all("/direct")
    assert [p for p, _ in other.seen] == ["/page"]
    assert other.leaked() == []


async def test_html_links_to_another_origin_go_without_headers(
    harness: Harness, origins: tuple[Origin, Origin]
) -> None:
    home, other = origins
    home.route("/", lambda r: _html(f"<h1>home</h1><a href='{other.base}/away'>away</a>")(r))
    other.route("/away", _html("<h1>away</h1>"))
    source = HtmlSource.model_validate(
        {
            "kind": "html",
            "name": "creds",
            "start_urls": [f"{home.base}/"],
            "follow": {"same_host": False, "max_depth": 1},
            "robots": False,
            "headers": CREDENTIALS,
            "fields": {"title": {"selector": "h1"}},
        }
    )

    records = await harness.run(source)

    assert sorted(r.data["title"] for r in records) == ["away", "home"]
    assert home.got_all("/")
    assert other.leaked() == []


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_fetcher_keeps_headers_on_the_first_urls_origin_by_default(
    settings: Settings, origins: tuple[Origin, Origin], transport: Any
) -> None:
    home, other = origins
    home.route("/a", _redirect(lambda: f"{other.base}/b"))
    other.route("/b", _redirect(lambda: f"{home.base}/c"))  # and back home: the headers come back too
    home.route("/c", _html("<h1>c</h1>"))

    async with Fetcher(settings) as fetcher:
        resp = await fetcher.get(f"{home.base}/a", headers=CREDENTIALS, transport=transport, robots=False)

    assert resp.url == f"{home.base}/c"
    assert home.got_all("/a") and home.got_all("/c")
    assert other.leaked() == []


class HeadersSpider(scrapy.Spider):
    """Requests ``base`` + each of ``paths``; one item per response."""

    name = "headers"

    def __init__(self, base: str, paths: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = [base + p for p in paths.split(",")]

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"url": response.url}


async def test_spider_headers_go_to_the_listed_origins_only(settings: Settings, origins: tuple[Origin, Origin]) -> None:
    home, other = origins
    home.route("/away", _redirect(lambda: f"{other.base}/there"))
    home.route("/here", _html("<h1>here</h1>"))
    other.route("/there", _html("<h1>there</h1>"))
    other.route("/direct", _html("<h1>direct</h1>"))
    source = SpiderSource.model_validate(
        {
            "kind": "spider",
            "name": "creds",
            "spider": f"{sys.modules[__name__].__name__}:HeadersSpider",
            "args": {"base": home.base, "paths": "/away,/here"},
            "robots": False,
            "headers": CREDENTIALS,
            "credentials_origins": [home.base],
        }
    )
    outcomes: list[Outcome] = []

    async def emit(outcome: Outcome) -> None:
        outcomes.append(outcome)

    async with Fetcher(settings) as fetcher:
        connector = SpiderConnector(source, SourceContext("run-creds", settings, fetcher, emit))
        items = [r async for r in connector.fetch()]

    assert sorted(r.url for r in items) == [f"{home.base}/here", f"{other.base}/there"]
    assert home.got_all("/away") and home.got_all("/here")
    assert [p for p, _ in other.seen] == ["/there"]
    assert other.leaked() == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"kind": "api", "url": "https://a.example/x", "credentials_origins": ["https://b.example/path"]}, "origin"),
        ({"kind": "api", "url": "https://a.example/x", "credentials_origins": ["ftp://b.example"]}, "origin"),
        (
            {
                "kind": "browser",
                "urls": ["https://a.example/"],
                "headers": {"A": "b"},
                "fields": {"t": {"selector": "h1"}},
            },
            "render: never",
        ),
        ({"kind": "spider", "spider": "spiders.x:Y", "headers": {"A": "b"}}, "credentials_origins"),
    ],
)
async def test_bad_credential_scopes_are_config_errors(tmp_path: Any, entry: dict[str, Any], message: str) -> None:
    import asyncio

    import yaml

    from trawl.config import load_sources

    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump({"sources": [{"name": "s", **entry}]}))
    with pytest.raises(ConfigError) as err:
        await asyncio.to_thread(load_sources, path)
    text = "\n".join(str(i) for i in err.value.issues)
    assert "sources[0] (s)" in text and message in text


def test_origins_are_normalised() -> None:
    source = ApiSource.model_validate(
        {"kind": "api", "name": "s", "url": "https://A.example/x", "credentials_origins": ["https://b.example:443/"]}
    )
    assert source.header_origins == {"https://a.example:443", "https://b.example:443"}
    spider = SpiderSource.model_validate(
        {"kind": "spider", "name": "s", "spider": "m:C", "headers": {"A": "b"}, "credentials_origins": ["http://c"]}
    )
    assert spider.header_origins == {"http://c:80"}
