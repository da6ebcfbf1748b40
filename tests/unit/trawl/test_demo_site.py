"""The bundled demo site: deterministic content, complete pagination, request counting."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from selectolax.lexbor import LexborHTMLParser

from trawl.demo import ITEM_COUNT, PRODUCT_COUNT, DemoSite, DemoSiteThread, item, item_json, product
from trawl.demo.site import (
    MAX_LIMIT,
    PAGE_COUNT,
    PAGE_SIZE,
    catalogue_urls,
    decode_cursor,
    encode_cursor,
    product_urls,
    related_ids,
)

ALL_ITEM_IDS = set(range(1, ITEM_COUNT + 1))


@pytest.fixture
async def site() -> AsyncIterator[DemoSite]:
    async with DemoSite() as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_text(http: aiohttp.ClientSession, url: str) -> tuple[int, str, aiohttp.ClientResponse]:
    async with http.get(url) as resp:
        return resp.status, await resp.text(), resp


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(), resp


def test_content_is_deterministic() -> None:
    assert product(5) == product(5)
    p = product(5)
    assert p.sku == "SKU-00005"
    assert (p.name, p.price, p.category, p.rating) == ("Bright Blender", 4070.09, "Office", 4)
    assert item(5) == item(5)
    assert item_json(5)["created"] == "2021-01-04"
    assert item_json(5)["updated_at"] == "2021-02-09T07:11:23Z"
    assert any(product(i).price >= 1000 for i in range(1, PRODUCT_COUNT + 1))
    assert all(1 <= len(product(i).tags) <= 3 for i in range(1, 50))
    for bad in (0, PRODUCT_COUNT + 1):
        with pytest.raises(ValueError, match="out of range"):
            product(bad)
    with pytest.raises(ValueError, match="out of range"):
        item(ITEM_COUNT + 1)
    assert decode_cursor(encode_cursor(1234)) == 1234
    for bad_cursor in ("!!!", encode_cursor(ITEM_COUNT + 1), "aGVsbG8"):
        with pytest.raises(ValueError, match="bad cursor"):
            decode_cursor(bad_cursor)


def test_ground_truth_urls() -> None:
    assert PAGE_COUNT == 60
    assert catalogue_urls("http://h:1/")[0] == "http://h:1/catalogue/page/1"
    assert len(catalogue_urls("http://h:1")) == PAGE_COUNT
    urls = product_urls("http://h:1")
    assert len(set(urls)) == PRODUCT_COUNT
    assert urls[-1] == f"http://h:1/products/{PRODUCT_COUNT}"


async def test_home_and_robots(site: DemoSite, http: aiohttp.ClientSession) -> None:
    status, text, _ = await get_text(http, site.url + "/robots.txt")
    assert (status, text) == (200, "User-agent: *\nAllow: /\n")
    status, text, resp = await get_text(http, site.url + "/")
    assert status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    hrefs = {a.attributes.get("href") for a in LexborHTMLParser(text).css("a")}
    assert "/catalogue/page/1" in hrefs


async def test_catalogue_lists_every_product_once(site: DemoSite, http: aiohttp.ClientSession) -> None:
    pages = await asyncio.gather(*(get_text(http, u) for u in catalogue_urls(site.url)))
    seen: list[int] = []
    for n, (status, text, _) in enumerate(pages, start=1):
        assert status == 200
        tree = LexborHTMLParser(text)
        links = tree.css("li.product > a")
        assert len(links) == PAGE_SIZE
        seen.extend(int(str(a.attributes["href"]).rsplit("/", 1)[1]) for a in links)
        assert links[0].text() == product((n - 1) * PAGE_SIZE + 1).name
        nxt = tree.css_first('a[rel="next"].next')
        prev = tree.css_first('a[rel="prev"]')
        assert (nxt.attributes["href"] if nxt else None) == (f"/catalogue/page/{n + 1}" if n < PAGE_COUNT else None)
        assert (prev.attributes["href"] if prev else None) == (f"/catalogue/page/{n - 1}" if n > 1 else None)
        hrefs = [a.attributes.get("href") for a in tree.css("a")]
        assert "mailto:shop@example.com" in hrefs
        assert "https://example.com/elsewhere" in hrefs
    assert len(seen) == PRODUCT_COUNT
    assert set(seen) == set(range(1, PRODUCT_COUNT + 1))
    assert all(site.requests[f"/catalogue/page/{n}"] == 1 for n in range(1, PAGE_COUNT + 1))


@pytest.mark.parametrize("pid", [1, 5, 777, PRODUCT_COUNT])
async def test_product_page_fields(site: DemoSite, http: aiohttp.ClientSession, pid: int) -> None:
    status, text, resp = await get_text(http, f"{site.url}/products/{pid}")
    assert status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    p = product(pid)
    tree = LexborHTMLParser(text)

    def one(selector: str) -> str:
        node = tree.css_first(selector)
        assert node is not None, selector
        return node.text(strip=True)

    assert one("h1.name") == p.name
    assert one("span.sku") == p.sku
    assert one("p.price") == f"${p.price:,.2f}"
    assert one("span.category") == p.category
    assert one("span.stock") == ("In stock" if p.in_stock else "Out of stock")
    rating = tree.css_first("span.rating")
    assert rating is not None
    assert rating.attributes["data-stars"] == str(p.rating)
    assert tuple(li.text() for li in tree.css("ul.tags > li.tag")) == p.tags
    img = tree.css_first("img.main")
    assert img is not None
    assert img.attributes["src"] == f"/img/{pid}.png"
    assert one("div.description") == p.description
    related = [a.attributes["href"] for a in tree.css("a.related")]
    assert related == [f"/products/{r}" for r in related_ids(pid)]
    assert len(set(related)) == 3
    assert f"/products/{pid}" not in related
    back = tree.css_first("a.back")
    assert back is not None
    assert back.attributes["href"] == f"/catalogue/page/{(pid - 1) // PAGE_SIZE + 1}"


async def test_price_has_thousands_separator(site: DemoSite, http: aiohttp.ClientSession) -> None:
    _, text, _ = await get_text(http, f"{site.url}/products/5")
    # The text has the separator; data-amount is the machine-readable price the demo sources use.
    assert '<p class="price" data-amount="4070.09">$4,070.09</p>' in text
    async with http.get(f"{site.url}/img/5.png") as resp:
        assert resp.status == 200
        assert (await resp.read()).startswith(b"\x89PNG")


async def test_cursor_pagination(site: DemoSite, http: aiohttp.ClientSession) -> None:
    ids: list[int] = []
    url: str | None = f"{site.url}/api/items?limit=300"
    calls = 0
    while url is not None:
        status, body, _ = await get_json(http, url)
        assert status == 200
        assert set(body) == {"items", "next_cursor"}
        ids.extend(it["id"] for it in body["items"])
        calls += 1
        cursor = body["next_cursor"]
        url = f"{site.url}/api/items?limit=300&cursor={cursor}" if cursor else None
    assert calls == -(-ITEM_COUNT // 300)
    assert len(ids) == ITEM_COUNT
    assert set(ids) == ALL_ITEM_IDS
    _, body, _ = await get_json(http, f"{site.url}/api/items")
    assert len(body["items"]) == 100
    assert body["items"][0] == item_json(1)
    _, body, _ = await get_json(http, f"{site.url}/api/items?limit=100000")
    assert len(body["items"]) == MAX_LIMIT


async def test_page_number_pagination(site: DemoSite, http: aiohttp.ClientSession) -> None:
    ids: list[int] = []
    page = 1
    while True:
        status, body, _ = await get_json(http, f"{site.url}/api/pages?page={page}&per_page=250")
        assert status == 200
        assert body["page"] == page
        if not body["data"]:
            break
        ids.extend(it["id"] for it in body["data"])
        page += 1
    assert page == ITEM_COUNT // 250 + 1
    assert len(ids) == ITEM_COUNT
    assert set(ids) == ALL_ITEM_IDS
    _, body, _ = await get_json(http, f"{site.url}/api/pages?page=999")
    assert body == {"data": [], "page": 999}


async def test_offset_pagination(site: DemoSite, http: aiohttp.ClientSession) -> None:
    ids: list[int] = []
    offset = 0
    while True:
        status, body, _ = await get_json(http, f"{site.url}/api/offset?offset={offset}&limit=500")
        assert status == 200
        assert body["total"] == ITEM_COUNT
        if not body["results"]:
            break
        ids.extend(it["id"] for it in body["results"])
        offset += len(body["results"])
    assert len(ids) == ITEM_COUNT
    assert set(ids) == ALL_ITEM_IDS


async def test_link_header_pagination(site: DemoSite, http: aiohttp.ClientSession) -> None:
    ids: list[int] = []
    url: str | None = f"{site.url}/api/linked"
    while url is not None:
        status, body, resp = await get_json(http, url)
        assert status == 200
        assert isinstance(body, list)
        ids.extend(it["id"] for it in body)
        link = resp.headers.get("Link")
        if link is None:
            url = None
        else:
            target, _, rel = link.partition(";")
            assert rel.strip() == 'rel="next"'
            url = target.strip().strip("<>")
            assert url.startswith(site.url + "/api/linked?")
    assert len(ids) == ITEM_COUNT
    assert set(ids) == ALL_ITEM_IDS
    assert site.requests["/api/linked"] == ITEM_COUNT // 100
    assert site.requests_qs[f"/api/linked?page={ITEM_COUNT // 100}"] == 1


@pytest.mark.parametrize(
    "path",
    [
        "/catalogue/page/0",
        "/catalogue/page/61",
        "/catalogue/page/x",
        "/products/0",
        "/products/1201",
        "/products/abc",
        "/nope",
        "/img/0.png",
    ],
)
async def test_not_found(site: DemoSite, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(site.url + path) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/items?cursor=%21%21%21",
        "/api/items?cursor=aGVsbG8",
        "/api/items?limit=0",
        "/api/pages?page=0",
        "/api/pages?page=one",
        "/api/offset?offset=-1",
        "/api/linked?page=0",
    ],
)
async def test_bad_requests(site: DemoSite, http: aiohttp.ClientSession, path: str) -> None:
    status, body, resp = await get_json(http, site.url + path)
    assert status == 400
    assert resp.content_type == "application/json"
    assert isinstance(body["error"], str)


async def test_request_counter(site: DemoSite, http: aiohttp.ClientSession) -> None:
    for _ in range(3):
        await get_text(http, f"{site.url}/products/7")
    await get_text(http, f"{site.url}/products/8")
    await get_text(http, f"{site.url}/missing")
    await get_json(http, f"{site.url}/api/items?limit=5")
    assert site.requests["/products/7"] == 3
    assert site.requests["/products/8"] == 1
    assert site.requests["/missing"] == 1
    assert site.requests_qs["/api/items?limit=5"] == 1
    assert sum(site.requests.values()) == 6


def test_demo_site_thread_from_sync_code() -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with DemoSiteThread() as site:
        assert site.url.startswith("http://127.0.0.1:")
        with opener.open(site.url + "/products/5", timeout=5) as resp:
            assert resp.status == 200
            assert "$4,070.09" in resp.read().decode("utf-8")
        with opener.open(site.url + "/api/items?limit=2", timeout=5) as resp:
            body = json.loads(resp.read())
        assert [it["id"] for it in body["items"]] == [1, 2]
        assert site.requests["/products/5"] == 1
        url = site.url
    with pytest.raises(urllib.error.URLError):
        opener.open(url + "/", timeout=2)


async def test_site_url_requires_running() -> None:
    s = DemoSite()
    with pytest.raises(RuntimeError):
        _ = s.url
    async with s:
        assert s.port != 0
    with pytest.raises(RuntimeError):
        _ = s.url


async def test_account_login_needs_the_csrf_token_and_guards_the_orders(demo_site: DemoSite) -> None:
    from trawl.demo.account import DEMO_PASSWORD, DEMO_USER, ORDER_COUNT, order

    base = demo_site.url
    async with aiohttp.ClientSession() as anon, anon.get(f"{base}/account/orders", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/account/login"
    # unsafe: keep cookies from an IP-address host (the demo's 127.0.0.1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(f"{base}/account/login") as resp:
            form = LexborHTMLParser(await resp.text())
        token_node = form.css_first("form#login input[name=csrf_token]")
        assert token_node is not None
        token = token_node.attributes["value"]
        creds = {"username": DEMO_USER, "password": DEMO_PASSWORD}
        async with http.post(f"{base}/account/login", data={**creds, "csrf_token": "forged"}) as resp:
            assert resp.status == 403
        async with http.post(f"{base}/account/login", data={**creds, "csrf_token": token}) as resp:
            assert resp.status == 200 and str(resp.url).endswith("/account/orders")  # after the redirect
            page = LexborHTMLParser(await resp.text())
        numbers = [n.text() for n in page.css("tr.order td.number")]
        assert numbers[0] == order(1).number and len(numbers) == 20
        async with http.get(f"{base}/account/orders?page=3") as resp:
            last = LexborHTMLParser(await resp.text())
        assert [n.text() for n in last.css("td.number")][-1] == order(ORDER_COUNT).number
