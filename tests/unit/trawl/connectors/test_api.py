"""`api` sources: every pagination type against the demo API, failures against a broken one."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from trawl.config import ApiSource
from trawl.connectors import ApiConnector, SourceContext, connector_for
from trawl.connectors.api import next_link
from trawl.demo.site import ITEM_COUNT, DemoSite, item_json
from trawl.errors import FetchError, PermanentFetchError
from trawl.fetch import Fetcher
from trawl.records import OutcomeKind
from trawl.settings import Settings


def site_pages(counter: Counter[str]) -> Counter[str]:
    """The site's request counts without /robots.txt (the fetch layer asks for it once per host)."""
    return Counter({path: n for path, n in counter.items() if path != "/robots.txt"})


if TYPE_CHECKING:
    from conftest import Harness  # tests/unit/trawl/connectors/conftest.py


def api_source(url: str, **kwargs: Any) -> ApiSource:
    return ApiSource.model_validate({"kind": "api", "name": "items", "url": url, "key": "id", **kwargs})


# (path, source options, pages the walk must fetch)
PAGINATIONS: dict[str, tuple[str, dict[str, Any], int]] = {
    "cursor": (
        "/api/items",
        {
            "params": {"limit": 300},
            "items_path": "items",
            "pagination": {"type": "cursor", "param": "cursor", "cursor_path": "next_cursor"},
        },
        -(-ITEM_COUNT // 300),
    ),
    "page": (
        "/api/pages",
        {"items_path": "data", "pagination": {"type": "page", "param": "page", "size_param": "per_page", "size": 250}},
        ITEM_COUNT // 250 + 1,  # the walk ends on the first empty page
    ),
    "link_header": ("/api/linked", {"pagination": {"type": "link_header"}}, ITEM_COUNT // 100),
    "offset": (
        "/api/offset",
        {"items_path": "results", "pagination": {"type": "offset", "param": "offset", "size": 500}},
        ITEM_COUNT // 500 + 1,  # a full last page does not tell the end: one empty page does
    ),
}


@pytest.mark.parametrize("kind", list(PAGINATIONS))
async def test_pagination_yields_every_item_once(harness: Harness, demo_site: DemoSite, kind: str) -> None:
    path, options, pages = PAGINATIONS[kind]
    source = api_source(
        demo_site.url + path, fields={"id": {"type": "int"}, "color": {"path": "attrs.color"}}, **options
    )
    assert isinstance(connector_for(source, None), ApiConnector)  # type: ignore[arg-type]
    records = await harness.run(source)

    assert len(records) == ITEM_COUNT
    assert sorted(r.data["id"] for r in records) == list(range(1, ITEM_COUNT + 1))
    for r in records:
        i = r.data["id"]
        assert r.key == str(i)
        assert r.data == {**item_json(i), "color": item_json(i)["attrs"]["color"]}
        assert r.url.startswith(demo_site.url + path)
        assert r.source == "items"
    assert len(harness.outcomes) == pages
    assert harness.outcome_kinds() == {"fetched": pages}
    assert set(harness.outcome_urls().values()) == {1}
    assert sum(site_pages(demo_site.requests_qs).values()) == pages
    assert set(site_pages(demo_site.requests_qs).values()) == {1}  # no page fetched twice
    assert (harness.stats.pages, harness.stats.records) == (pages, ITEM_COUNT)


async def test_settings_max_pages_caps_pages(harness: Harness, demo_site: DemoSite, settings: Settings) -> None:
    path, options, _ = PAGINATIONS["cursor"]
    records = await harness.run(
        api_source(demo_site.url + path, **options), settings.model_copy(update={"max_pages": 3})
    )
    assert sorted(int(r.key or 0) for r in records) == list(range(1, 3 * 300 + 1))
    assert sum(site_pages(demo_site.requests).values()) == 3
    assert harness.outcome_kinds() == {"fetched": 3}


async def test_source_max_pages_caps_pages(harness: Harness, demo_site: DemoSite) -> None:
    source = api_source(demo_site.url + "/api/linked", pagination={"type": "link_header", "max_pages": 2})
    records = await harness.run(source)
    assert len(records) == 200
    assert sum(site_pages(demo_site.requests).values()) == 2


@pytest.fixture
async def broken_api() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A JSON API that fails on purpose; the dict collects request headers and hit counts."""
    seen: dict[str, Any] = {"hits": 0, "headers": []}

    async def error(request: web.Request) -> web.Response:
        seen["hits"] += 1
        return web.json_response({"error": "boom"}, status=500)

    async def second_page_fails(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        if page == 1:
            return web.json_response([{"id": 1}, {"id": 2}])
        seen["hits"] += 1
        return web.json_response({"error": "boom"}, status=503)

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", content_type="text/html")

    async def next_url(request: web.Request) -> web.Response:
        seen["headers"].append(request.headers.get("Authorization"))
        page = int(request.query.get("page", "1"))
        body = {
            "data": {"rows": [{"id": page * 10 + k, "meta": {"n": k}} for k in range(2)]},
            "links": {"next": f"/next?page={page + 1}" if page < 3 else None},
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/error", error)
    app.router.add_get("/second", second_page_fails)
    app.router.add_get("/notjson", not_json)
    app.router.add_get("/next", next_url)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


async def test_persistent_500_fails_the_source(harness: Harness, broken_api: tuple[str, dict[str, Any]]) -> None:
    base, seen = broken_api
    with pytest.raises(FetchError) as info:
        await harness.run(api_source(base + "/error"))
    assert info.value.url == base + "/error"
    assert harness.records == []
    [outcome] = harness.outcomes
    retries = harness.settings.max_retries
    assert (outcome.outcome, outcome.http_status, outcome.attempts) == (OutcomeKind.FAILED, 500, retries + 1)
    assert outcome.url == base + "/error"
    assert seen["hits"] == retries + 1


async def test_failed_page_ends_pagination(
    harness: Harness, broken_api: tuple[str, dict[str, Any]], settings: Settings
) -> None:
    base, seen = broken_api
    source = api_source(base + "/second", pagination={"type": "page", "param": "page"})
    with pytest.raises(FetchError):
        await harness.run(source, settings.model_copy(update={"max_retries": 1}))
    assert [r.key for r in harness.records] == ["1", "2"]  # the first page's items got out
    assert [(o.outcome, o.http_status) for o in harness.outcomes] == [
        (OutcomeKind.FETCHED, 200),
        (OutcomeKind.FAILED, 503),
    ]
    assert seen["hits"] == 2


async def test_invalid_json_is_a_failed_outcome(harness: Harness, broken_api: tuple[str, dict[str, Any]]) -> None:
    base, _ = broken_api
    with pytest.raises(PermanentFetchError, match="invalid JSON"):
        await harness.run(api_source(base + "/notjson"))
    [outcome] = harness.outcomes
    assert (outcome.outcome, outcome.http_status, outcome.attempts) == (OutcomeKind.FAILED, 200, 1)
    assert outcome.error is not None
    assert "invalid JSON" in outcome.error


async def test_items_path_must_be_a_list(harness: Harness, broken_api: tuple[str, dict[str, Any]]) -> None:
    base, _ = broken_api
    with pytest.raises(PermanentFetchError, match="not a list"):
        await harness.run(api_source(base + "/next", items_path="links"))
    assert harness.outcome_kinds() == {"failed": 1}


async def test_next_url_pagination_headers_and_paths(harness: Harness, broken_api: tuple[str, dict[str, Any]]) -> None:
    base, seen = broken_api
    source = api_source(
        base + "/next",
        headers={"Authorization": "Bearer t0ken"},
        items_path="data.rows",
        pagination={"type": "next_url", "next_path": "links.next"},
        fields={"id": {"type": "int"}, "n": {"path": "meta.n"}},
    )
    records = await harness.run(source)
    assert [(r.key, r.data["n"]) for r in records] == [
        ("10", 0),
        ("11", 1),
        ("20", 0),
        ("21", 1),
        ("30", 0),
        ("31", 1),
    ]
    assert [r.url for r in records][::2] == [base + "/next", base + "/next?page=2", base + "/next?page=3"]
    assert seen["headers"] == ["Bearer t0ken"] * 3
    assert harness.outcome_kinds() == {"fetched": 3}


async def test_context_records_blocked_network(settings: Settings, demo_site: DemoSite) -> None:
    outcomes: list[Any] = []

    async def emit(o: Any) -> None:
        outcomes.append(o)

    blocked = settings.model_copy(update={"allowed_networks": []})
    async with Fetcher(blocked) as fetcher:
        ctx = SourceContext("r", blocked, fetcher, emit)
        with pytest.raises(FetchError):
            async for _ in connector_for(api_source(demo_site.url + "/api/items"), ctx).fetch():
                pass
    assert [o.outcome for o in outcomes] == [OutcomeKind.BLOCKED_NETWORK]
    assert ctx.stats.outcomes == {"blocked_network": 1}
    assert site_pages(demo_site.requests) == {}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ('<https://api.test/items?page=2>; rel="next"', "https://api.test/items?page=2"),
        ('</items?page=1>; rel="prev", </items?page=3>; rel="next"', "https://api.test/items?page=3"),
        ('<?page=4>; rel="last next"', "https://api.test/v1/items?page=4"),
        ('<https://api.test/items?page=1>; rel="prev"', None),
        ("<https://api.test/x>; rel=NEXT", "https://api.test/x"),
    ],
)
def test_next_link(header: str | None, expected: str | None) -> None:
    assert next_link(header, "https://api.test/v1/items?page=3") == expected
