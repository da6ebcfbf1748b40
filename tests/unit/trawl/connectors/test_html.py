"""`html` sources against the bundled demo site: records, one outcome per URL, crawl limits."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from trawl.config import HtmlSource, load_sources
from trawl.demo.site import PAGE_COUNT, PAGE_SIZE, PRODUCT_COUNT, DemoSite, product, product_urls
from trawl.records import OutcomeKind
from trawl.settings import Settings


def site_pages(counter: Counter[str]) -> Counter[str]:
    """The site's request counts without /robots.txt (the fetch layer asks for it once per host)."""
    return Counter({path: n for path, n in counter.items() if path != "/robots.txt"})


if TYPE_CHECKING:
    from conftest import Harness  # tests/unit/trawl/connectors/conftest.py

REPO = Path(__file__).resolve().parents[4]


async def demo_products(site: DemoSite) -> HtmlSource:
    """The `products` source of examples/demo.yaml, pointed at this test's demo site (read off the loop)."""
    spec = await asyncio.to_thread(load_sources, REPO / "examples" / "demo.yaml", env={"TRAWL_DEMO_URL": site.url})
    [source] = [s for s in spec.sources if s.name == "products"]
    assert isinstance(source, HtmlSource)
    return source


def html_source(**kwargs: Any) -> HtmlSource:
    return HtmlSource.model_validate({"kind": "html", "name": "shop", **kwargs})


def paths(urls: Any) -> Counter[str]:
    return Counter(urlsplit(u).path for u in urls)


async def test_crawl_yields_one_record_per_product(harness: Harness, demo_site: DemoSite) -> None:
    records = await harness.run(await demo_products(demo_site))

    assert len(records) == PRODUCT_COUNT
    assert {r.url for r in records} == set(product_urls(demo_site.url))
    assert {r.key for r in records} == {product(i).sku for i in range(1, PRODUCT_COUNT + 1)}
    by_url = {r.url: r for r in records}
    for i in (1, 5, 777, PRODUCT_COUNT):
        p = product(i)
        r = by_url[f"{demo_site.url}/products/{i}"]
        assert r.data == {
            "sku": p.sku,
            "name": p.name,
            "price": f"{p.price:.2f}",
            "category": p.category,
            "stock": "In stock" if p.in_stock else "Out of stock",
            "rating": str(p.rating),
            "tags": list(p.tags),
            "image": f"/img/{i}.png",
        }
        assert (r.source, r.key, r.run_id) == ("products", p.sku, "run-test-1")
        assert r.fetched_at.tzinfo is not None
        assert len(r.content_hash) == 64

    # Every fetched URL has exactly one outcome, and the server saw each page once.
    pages = PRODUCT_COUNT + PAGE_COUNT
    assert len(harness.outcomes) == pages
    assert set(harness.outcome_urls().values()) == {1}
    assert paths(harness.outcome_urls()) == site_pages(demo_site.requests)
    assert set(site_pages(demo_site.requests).values()) == {1}
    assert sum(site_pages(demo_site.requests).values()) == pages
    assert harness.outcome_kinds() == {"fetched": pages}
    assert all((o.http_status, o.attempts) == (200, 1) and o.bytes > 0 for o in harness.outcomes)
    assert (harness.stats.pages, harness.stats.records, harness.stats.discovered) == (pages, PRODUCT_COUNT, pages)
    assert harness.stats.failures == 0


@pytest.mark.parametrize(("max_depth", "pages", "records"), [(0, 1, 0), (1, 2 + PAGE_SIZE, PAGE_SIZE)])
async def test_max_depth_limits_the_crawl(
    harness: Harness, demo_site: DemoSite, max_depth: int, pages: int, records: int
) -> None:
    source = (await demo_products(demo_site)).model_copy(
        update={"follow": (await demo_products(demo_site)).follow.model_copy(update={"max_depth": max_depth})}
    )
    got = await harness.run(source)
    assert len(got) == records
    expected = {"/catalogue/page/1"}
    if max_depth:
        # Depth 1 is page 2 and the products page 1 lists; nothing they link to.
        expected |= {"/catalogue/page/2"} | {f"/products/{i}" for i in range(1, PAGE_SIZE + 1)}
    assert set(site_pages(demo_site.requests)) == expected
    assert sum(site_pages(demo_site.requests).values()) == pages
    assert paths(harness.outcome_urls()) == site_pages(demo_site.requests)


async def test_max_pages_caps_the_crawl(harness: Harness, demo_site: DemoSite, settings: Settings) -> None:
    await harness.run(await demo_products(demo_site), settings.model_copy(update={"max_pages": 5}))
    assert sum(site_pages(demo_site.requests).values()) == 5
    assert len(harness.outcomes) == 5
    assert harness.stats.pages == 5


async def test_fixed_urls_with_image_and_missing_page(harness: Harness, demo_site: DemoSite) -> None:
    base = demo_site.url
    source = html_source(
        urls=[f"{base}/img/5.png", f"{base}/products/5", f"{base}/products/99999"],
        fields={"name": {"selector": "h1.name"}, "price": {"selector": "p.price"}},
    )
    records = await harness.run(source)

    assert [(r.key, r.url, r.data) for r in records] == [
        (f"{base}/products/5", f"{base}/products/5", {"name": "Bright Blender", "price": "$4,070.09"})
    ]
    by_url = {o.url: o for o in harness.outcomes}
    assert len(by_url) == len(harness.outcomes) == 3
    image = by_url[f"{base}/img/5.png"]
    assert (image.outcome, image.http_status) == (OutcomeKind.FILTERED, 200)
    assert image.error is not None
    assert "image/png" in image.error
    assert by_url[f"{base}/products/5"].outcome == OutcomeKind.FETCHED
    missing = by_url[f"{base}/products/99999"]
    assert (missing.outcome, missing.http_status, missing.attempts) == (OutcomeKind.FAILED, 404, 1)
    # A fixed list is not a crawl: no links followed.
    assert set(site_pages(demo_site.requests)) == {"/img/5.png", "/products/5", "/products/99999"}
    assert harness.stats.failures == 2


async def test_item_selector_gives_one_record_per_item(harness: Harness, demo_site: DemoSite) -> None:
    source = html_source(
        urls=[f"{demo_site.url}/catalogue/page/1", f"{demo_site.url}/catalogue/page/3"],
        item_selector="li.product",
        key="href",
        fields={"name": {"selector": "a"}, "href": {"selector": "a", "attr": "href"}},
    )
    records = await harness.run(source)
    ids = list(range(1, PAGE_SIZE + 1)) + list(range(2 * PAGE_SIZE + 1, 3 * PAGE_SIZE + 1))
    assert sorted(r.key or "" for r in records) == sorted(f"/products/{i}" for i in ids)
    assert {r.data["href"]: r.data["name"] for r in records} == {f"/products/{i}": product(i).name for i in ids}
    assert harness.outcome_kinds() == {"fetched": 2}


async def test_follow_rules_deny_and_same_host(harness: Harness, demo_site: DemoSite) -> None:
    source = html_source(
        start_urls=[f"{demo_site.url}/catalogue/page/1"],
        follow={"deny": [r"/products/"], "max_depth": 100},  # same_host keeps example.com out
        record_urls=r"/products/\d+$",
        fields={"h1": {"selector": "h1"}},
    )
    assert await harness.run(source) == []
    # The home page (linked from every page) and the 60 catalogue pages, nothing else.
    assert set(site_pages(demo_site.requests)) == {"/"} | {f"/catalogue/page/{n}" for n in range(1, PAGE_COUNT + 1)}
    assert set(site_pages(demo_site.requests).values()) == {1}
    assert harness.outcome_kinds() == {"fetched": PAGE_COUNT + 1}


async def test_blocked_network_outcome(harness: Harness, demo_site: DemoSite, settings: Settings) -> None:
    blocked = settings.model_copy(update={"allowed_networks": []})
    records = await harness.run(await demo_products(demo_site), blocked)
    assert records == []
    [outcome] = harness.outcomes
    assert (outcome.outcome, outcome.url) == (OutcomeKind.BLOCKED_NETWORK, f"{demo_site.url}/catalogue/page/1")
    assert site_pages(demo_site.requests) == {}


async def test_conditional_requests_turn_unchanged_record_pages_into_not_modified(
    harness: Harness, demo_site: DemoSite
) -> None:
    source = (await demo_products(demo_site)).model_copy(update={"start_urls": [f"{demo_site.url}/catalogue/page/1"]})
    source = source.model_copy(update={"follow": source.follow.model_copy(update={"max_depth": 1})})
    await harness.run(source)
    first = {o.url: o for o in harness.outcomes}
    product_urls = [u for u in first if "/products/" in u]
    assert product_urls and all(first[u].etag and first[u].last_modified for u in product_urls)
    catalogue = f"{demo_site.url}/catalogue/page/1"
    # Validators as a later run reads them from PostgreSQL: every fetched page's, the catalogue's too.
    validators = {u: (o.etag, o.last_modified) for u, o in first.items()} | {catalogue: ('"x"', None)}

    harness.outcomes.clear()
    harness.records.clear()
    await harness.run(source, validators=validators)

    kinds = {o.url: o.outcome.value for o in harness.outcomes}
    assert {kinds[u] for u in product_urls} == {"not_modified"}
    assert kinds[catalogue] == "fetched"  # a page the crawl needs links from is never asked conditionally
    assert harness.records == []
    # A 304 carries the validators forward for the run after.
    assert all(o.etag == first[o.url].etag for o in harness.outcomes if o.outcome.value == "not_modified")
