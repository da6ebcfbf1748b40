"""A deterministic demo shop and JSON API, served by aiohttp, for the crawler to scrape.

Every product and item is derived from SHA-256 of its id, so the content is identical on
every machine and run; :func:`product_urls` and :func:`catalogue_urls` give the ground truth
a crawl can be checked against, and :class:`DemoSite` counts every request it serves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import struct
import threading
import zlib
from collections import Counter
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from trawl.demo.account import add_account_routes

__all__ = [
    "CATEGORIES",
    "ITEM_COUNT",
    "JS_DEMO_COUNT",
    "LINKED_PER_PAGE",
    "MAX_LIMIT",
    "PAGE_COUNT",
    "PAGE_SIZE",
    "PRODUCT_COUNT",
    "DemoSite",
    "DemoSiteThread",
    "Item",
    "Product",
    "ServerThread",
    "catalogue_page_of",
    "catalogue_urls",
    "decode_cursor",
    "encode_cursor",
    "item",
    "item_json",
    "make_app",
    "product",
    "product_urls",
    "related_ids",
]

ServerT = TypeVar("ServerT", bound=AbstractAsyncContextManager[Any])

PRODUCT_COUNT = 1200
PAGE_SIZE = 20
PAGE_COUNT = -(-PRODUCT_COUNT // PAGE_SIZE)
ITEM_COUNT = 2500
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
LINKED_PER_PAGE = 100

CATEGORIES: tuple[str, ...] = (
    "Books",
    "Electronics",
    "Home & Garden",
    "Toys",
    "Sports",
    "Clothing",
    "Kitchen",
    "Office",
)
_ADJECTIVES = (
    "Classic",
    "Compact",
    "Deluxe",
    "Rustic",
    "Modern",
    "Vintage",
    "Rugged",
    "Silent",
    "Smart",
    "Gentle",
    "Bold",
    "Tiny",
    "Grand",
    "Swift",
    "Sturdy",
    "Bright",
)
_NOUNS = (
    "Lamp",
    "Kettle",
    "Backpack",
    "Notebook",
    "Speaker",
    "Chair",
    "Puzzle",
    "Racket",
    "Jacket",
    "Blender",
    "Stapler",
    "Planter",
    "Drone",
    "Novel",
    "Mug",
    "Clock",
)
_TAGS = (
    "new",
    "sale",
    "eco",
    "bestseller",
    "gift",
    "limited",
    "handmade",
    "imported",
    "refurbished",
    "bundle",
    "premium",
    "classic",
)
_WORDS = (
    "alpha",
    "bravo",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "glade",
    "harbor",
    "iris",
    "juniper",
    "kestrel",
    "lumen",
    "meadow",
    "nimbus",
    "orbit",
    "prism",
)
_COLORS = ("red", "green", "blue", "black", "white", "yellow", "purple", "orange")
_SIZES = ("XS", "S", "M", "L", "XL")
_RELATED_STEPS = (7, 13, 31, 37, 41, 43, 47, 53)
_EPOCH = date(2020, 1, 1)
_CURSOR_PREFIX = "v1:"
_HTML = "text/html"


def _digest(kind: str, i: int) -> bytes:
    """SHA-256 of ``kind:i``: the one source of every generated value (stable everywhere)."""
    return hashlib.sha256(f"{kind}:{i}".encode("ascii")).digest()


def _u16(h: bytes, at: int) -> int:
    return int.from_bytes(h[at : at + 2], "big")


def _u32(h: bytes, at: int) -> int:
    return int.from_bytes(h[at : at + 4], "big")


def _check(kind: str, i: int, count: int) -> None:
    if not 1 <= i <= count:
        raise ValueError(f"{kind} id {i} out of range 1..{count}")


@dataclass(frozen=True, slots=True)
class Product:
    """One shop product, as its page shows it."""

    id: int
    sku: str
    name: str
    price: float
    category: str
    in_stock: bool
    rating: int
    tags: tuple[str, ...]
    description: str


def product(i: int) -> Product:
    """The product with id ``i`` (1..PRODUCT_COUNT), derived from SHA-256 of the id."""
    _check("product", i, PRODUCT_COUNT)
    h = _digest("product", i)
    name = f"{_ADJECTIVES[h[0] % len(_ADJECTIVES)]} {_NOUNS[h[1] % len(_NOUNS)]}"
    # About one product in eight costs 1,000 or more, so prices show a thousands separator.
    cents = 100_000 + _u32(h, 2) % 400_000 if h[6] < 32 else 100 + _u32(h, 2) % 99_900
    category = CATEGORIES[h[7] % len(CATEGORIES)]
    rating = 1 + h[8] % 5
    tags: list[str] = []
    for b in h[10 : 10 + 1 + h[9] % 3]:
        tag = _TAGS[b % len(_TAGS)]
        if tag not in tags:
            tags.append(tag)
    width, height = 5 + h[13] % 60, 5 + h[14] % 60
    description = (
        f"The {name} is a dependable pick for {category.lower()} fans. "
        f"Measures {width} x {height} cm; customers rate it {rating}/5."
    )
    return Product(
        id=i,
        sku=f"SKU-{i:05d}",
        name=name,
        price=round(cents / 100, 2),
        category=category,
        in_stock=h[15] % 5 != 0,
        rating=rating,
        tags=tuple(tags),
        description=description,
    )


@dataclass(frozen=True, slots=True)
class Item:
    """One record of the JSON API."""

    id: int
    title: str
    score: float
    active: bool
    created: str
    updated_at: str
    attrs: dict[str, Any]


def item(i: int) -> Item:
    """The API item with id ``i`` (1..ITEM_COUNT), derived from SHA-256 of the id."""
    _check("item", i, ITEM_COUNT)
    h = _digest("item", i)
    created = _EPOCH + timedelta(days=_u16(h, 2) % 1800)
    updated = datetime(created.year, created.month, created.day) + timedelta(
        days=h[4] % 60, seconds=_u32(h, 5) % 86_400
    )
    return Item(
        id=i,
        title=f"{_WORDS[h[0] % len(_WORDS)].title()} {_WORDS[h[1] % len(_WORDS)]} #{i}",
        score=round(_u32(h, 9) / 2**32 * 100, 2),
        active=h[13] % 4 != 0,
        created=created.isoformat(),
        updated_at=updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
        attrs={
            "color": _COLORS[h[14] % len(_COLORS)],
            "size": _SIZES[h[15] % len(_SIZES)],
            "dims": {"w": 1 + h[16] % 100, "h": 1 + h[17] % 100},
        },
    )


def item_json(i: int) -> dict[str, Any]:
    """The exact JSON object every API endpoint serves for item ``i`` (a fresh copy)."""
    it = item(i)
    return {
        "id": it.id,
        "title": it.title,
        "score": it.score,
        "active": it.active,
        "created": it.created,
        "updated_at": it.updated_at,
        "attrs": {**it.attrs, "dims": dict(it.attrs["dims"])},
    }


def related_ids(i: int) -> tuple[int, int, int]:
    """Three distinct products, other than ``i``, that product ``i``'s page links to."""
    _check("product", i, PRODUCT_COUNT)
    out: list[int] = []
    for step in _RELATED_STEPS:
        c = (i * step) % PRODUCT_COUNT + 1
        if c != i and c not in out:
            out.append(c)
        if len(out) == 3:
            return out[0], out[1], out[2]
    c = i
    while len(out) < 3:  # unreachable for PRODUCT_COUNT=1200; keeps the contract regardless
        c = c % PRODUCT_COUNT + 1
        if c != i and c not in out:
            out.append(c)
    return out[0], out[1], out[2]


def catalogue_page_of(i: int) -> int:
    """The catalogue page that lists product ``i``."""
    _check("product", i, PRODUCT_COUNT)
    return (i - 1) // PAGE_SIZE + 1


def product_urls(base: str) -> list[str]:
    """Every product page URL under ``base`` (e.g. ``http://127.0.0.1:8080``), in id order."""
    root = base.rstrip("/")
    return [f"{root}/products/{i}" for i in range(1, PRODUCT_COUNT + 1)]


def catalogue_urls(base: str) -> list[str]:
    """Every catalogue page URL under ``base``, in page order."""
    root = base.rstrip("/")
    return [f"{root}/catalogue/page/{n}" for n in range(1, PAGE_COUNT + 1)]


def encode_cursor(offset: int) -> str:
    """The opaque cursor ``/api/items`` hands out for the item at ``offset``."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{offset}".encode("ascii")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The offset inside a cursor from :func:`encode_cursor`; ``ValueError`` if it is not one."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        text = raw.decode("ascii")
    except (binascii.Error, UnicodeError) as exc:
        raise ValueError(f"bad cursor {cursor!r}") from exc
    digits = text.removeprefix(_CURSOR_PREFIX)
    if digits == text or not digits.isdigit() or not 0 <= int(digits) <= ITEM_COUNT:
        raise ValueError(f"bad cursor {cursor!r}")
    return int(digits)


# --- HTML ---------------------------------------------------------------------------------


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)} | Trawl Demo Shop</title>\n</head>\n<body>\n"
        '<header><a class="home" href="/">Trawl Demo Shop</a></header>\n'
        f"<main>\n{body}\n</main>\n"
        '<footer><a href="mailto:shop@example.com">Contact us</a> · '
        '<a href="https://example.com/elsewhere">Our friends elsewhere</a></footer>\n'
        "</body>\n</html>\n"
    )


def _html(text: str) -> web.Response:
    return web.Response(text=text, content_type=_HTML, charset="utf-8")


def _home_html() -> str:
    return _page(
        "Home",
        "<h1>Trawl Demo Shop</h1>\n"
        f"<p>{PRODUCT_COUNT} products across {len(CATEGORIES)} categories.</p>\n"
        '<p><a class="catalogue" href="/catalogue/page/1">Browse the catalogue</a></p>',
    )


def _catalogue_html(n: int) -> str:
    first = (n - 1) * PAGE_SIZE + 1
    last = min(n * PAGE_SIZE, PRODUCT_COUNT)
    lines = [f"<h1>Catalogue, page {n} of {PAGE_COUNT}</h1>", '<ul class="products">']
    for i in range(first, last + 1):
        lines.append(f'<li class="product"><a href="/products/{i}">{escape(product(i).name)}</a></li>')
    lines.append("</ul>")
    nav = ['<nav class="pager">']
    if n > 1:
        nav.append(f'<a rel="prev" class="prev" href="/catalogue/page/{n - 1}">Previous</a>')
    if n < PAGE_COUNT:
        nav.append(f'<a rel="next" class="next" href="/catalogue/page/{n + 1}">Next</a>')
    nav.append("</nav>")
    return _page(f"Catalogue page {n}", "\n".join(lines + nav))


def _product_html(p: Product) -> str:
    stars = "★" * p.rating + "☆" * (5 - p.rating)
    tags = "".join(f'<li class="tag">{escape(t)}</li>' for t in p.tags)
    related = "".join(
        f'<li><a class="related" href="/products/{r}">{escape(product(r).name)}</a></li>' for r in related_ids(p.id)
    )
    page = catalogue_page_of(p.id)
    body = f"""<article class="product" data-id="{p.id}">
<h1 class="name">{escape(p.name)}</h1>
<p>SKU: <span class="sku">{p.sku}</span></p>
<p class="price" data-amount="{p.price:.2f}">${p.price:,.2f}</p>
<p>Category: <span class="category">{escape(p.category)}</span></p>
<p><span class="stock">{"In stock" if p.in_stock else "Out of stock"}</span></p>
<p>Rating: <span class="rating" data-stars="{p.rating}">{stars}</span></p>
<ul class="tags">{tags}</ul>
<img class="main" src="/img/{p.id}.png" alt="{escape(p.name)}">
<div class="description"><p>{escape(p.description)}</p></div>
</article>
<section class="related"><h2>Related products</h2><ul>{related}</ul></section>
<p><a class="back" href="/catalogue/page/{page}">Back to catalogue page {page}</a></p>"""
    return _page(p.name, body)


JS_DEMO_COUNT = 24
"""Product pages the JS section's index links to (``/js/products/1..24``); any id up to PRODUCT_COUNT exists."""


def _js_index_html() -> str:
    links = "".join(
        f'<li><a class="product" href="/js/products/{i}">{escape(product(i).name)}</a></li>'
        for i in range(1, JS_DEMO_COUNT + 1)
    )
    return _page(
        "Rendered in the browser", f'<h1>Products rendered by JavaScript</h1>\n<ul class="products">{links}</ul>'
    )


def _js_product_html(p: Product) -> str:
    """A shell whose product fields only exist after its script ran (a short while after load)."""
    data = json.dumps(
        {
            "id": p.id,
            "name": p.name,
            "sku": p.sku,
            "price": f"{p.price:.2f}",
            "category": p.category,
            "rating": p.rating,
        }
    ).replace("</", "<\\/")
    body = f"""<article id="app" class="loading"><p>Loading…</p></article>
<script id="data" type="application/json">{data}</script>
<script>
setTimeout(function () {{
  var d = JSON.parse(document.getElementById("data").textContent);
  var app = document.getElementById("app");
  app.className = "product";
  app.innerHTML = "";
  function add(tag, cls, text, attr, value) {{
    var el = document.createElement(tag);
    el.className = cls;
    el.textContent = text;
    if (attr) el.setAttribute(attr, value);
    app.appendChild(el);
  }}
  add("h1", "name", d.name);
  add("span", "sku", d.sku);
  add("p", "price", "$" + d.price, "data-amount", d.price);
  add("span", "category", d.category);
  add("span", "rating", "", "data-stars", String(d.rating));
}}, 30);
</script>
<p><a class="back" href="/js/">Back to the rendered products</a></p>"""
    return _page(p.name, body)


def _png_1x1() -> bytes:
    """A valid 1x1 grey PNG, so product images resolve instead of 404ing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    )


_PNG = _png_1x1()


# --- JSON API -----------------------------------------------------------------------------


def _bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 whose body is a JSON ``{"error": message}``."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, minimum: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise _bad_request(f"{name} must be >= {minimum}, got {value}")
    return value


def _limit(request: web.Request, name: str = "limit") -> int:
    return min(_int_param(request, name, DEFAULT_LIMIT, 1), MAX_LIMIT)


def _items(offset: int, count: int) -> list[dict[str, Any]]:
    """Items ``offset+1 .. offset+count``, clipped to the ones that exist."""
    return [item_json(i) for i in range(offset + 1, min(offset + count, ITEM_COUNT) + 1)]


_LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


async def _robots(request: web.Request) -> web.Response:
    return web.Response(text="User-agent: *\nAllow: /\n", content_type="text/plain", charset="utf-8")


async def _home(request: web.Request) -> web.Response:
    return _html(_home_html())


async def _catalogue(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    if not 1 <= n <= PAGE_COUNT:
        raise web.HTTPNotFound(text=_page("Not found", "<h1>No such catalogue page</h1>"), content_type=_HTML)
    return _html(_catalogue_html(n))


async def _product(request: web.Request) -> web.Response:
    i = int(request.match_info["id"])
    if not 1 <= i <= PRODUCT_COUNT:
        raise web.HTTPNotFound(text=_page("Not found", "<h1>No such product</h1>"), content_type=_HTML)
    page = _product_html(product(i))
    # Validators, so conditional requests can be shown: the same page always has the same ETag.
    validators = {"ETag": f'"{hashlib.sha256(page.encode()).hexdigest()[:20]}"', "Last-Modified": _LAST_MODIFIED}
    if request.headers.get("If-None-Match") == validators["ETag"]:
        return web.Response(status=304, headers=validators)
    response = _html(page)
    response.headers.update(validators)
    return response


async def _js_index(request: web.Request) -> web.Response:
    return _html(_js_index_html())


async def _js_product(request: web.Request) -> web.Response:
    i = int(request.match_info["id"])
    if not 1 <= i <= PRODUCT_COUNT:
        raise web.HTTPNotFound(text=_page("Not found", "<h1>No such product</h1>"), content_type=_HTML)
    return _html(_js_product_html(product(i)))


async def _image(request: web.Request) -> web.Response:
    i = int(request.match_info["id"])
    if not 1 <= i <= PRODUCT_COUNT:
        raise web.HTTPNotFound()
    return web.Response(body=_PNG, content_type="image/png")


async def _api_items(request: web.Request) -> web.Response:
    """Cursor pagination: ``{"items": [...], "next_cursor": str | null}``."""
    limit = _limit(request)
    cursor = request.query.get("cursor", "")
    try:
        offset = decode_cursor(cursor) if cursor else 0
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    end = min(offset + limit, ITEM_COUNT)
    nxt = encode_cursor(end) if end < ITEM_COUNT else None
    return web.json_response({"items": _items(offset, limit), "next_cursor": nxt})


async def _api_pages(request: web.Request) -> web.Response:
    """Page-number pagination from 1; a page past the end has empty ``data``."""
    page = _int_param(request, "page", 1, 1)
    per_page = _limit(request, "per_page")
    return web.json_response({"data": _items((page - 1) * per_page, per_page), "page": page})


async def _api_linked(request: web.Request) -> web.Response:
    """A bare JSON array per page, with an RFC 8288 ``rel="next"`` Link while more remain."""
    page = _int_param(request, "page", 1, 1)
    resp = web.json_response(_items((page - 1) * LINKED_PER_PAGE, LINKED_PER_PAGE))
    if page * LINKED_PER_PAGE < ITEM_COUNT:
        nxt = request.url.update_query(page=str(page + 1))
        resp.headers["Link"] = f'<{nxt}>; rel="next"'
    return resp


async def _api_offset(request: web.Request) -> web.Response:
    """Offset/limit pagination: ``{"results": [...], "total": ITEM_COUNT}``."""
    offset = _int_param(request, "offset", 0, 0)
    limit = _limit(request)
    return web.json_response({"results": _items(offset, limit), "total": ITEM_COUNT})


def _counting_middleware(paths: Counter[str], paths_qs: Counter[str]) -> Middleware:
    """A middleware recording every request's path (and path with query) before handling it."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        paths[request.path] += 1
        paths_qs[request.path_qs] += 1
        return await handler(request)

    return count


def make_app(requests: Counter[str] | None = None, requests_qs: Counter[str] | None = None) -> web.Application:
    """The demo site's application; given counters, every request's path is tallied in them."""
    app = web.Application()
    if requests is not None or requests_qs is not None:
        app.middlewares.append(
            _counting_middleware(
                requests if requests is not None else Counter(),
                requests_qs if requests_qs is not None else Counter(),
            )
        )
    app.router.add_get("/robots.txt", _robots)
    app.router.add_get("/", _home)
    app.router.add_get(r"/catalogue/page/{n:\d+}", _catalogue)
    app.router.add_get(r"/products/{id:\d+}", _product)
    app.router.add_get(r"/img/{id:\d+}.png", _image)
    app.router.add_get("/js/", _js_index)
    app.router.add_get(r"/js/products/{id:\d+}", _js_product)
    app.router.add_get("/api/items", _api_items)
    app.router.add_get("/api/pages", _api_pages)
    app.router.add_get("/api/linked", _api_linked)
    app.router.add_get("/api/offset", _api_offset)
    add_account_routes(app)
    return app


# --- Serving ------------------------------------------------------------------------------


class DemoSite:
    """Serves :func:`make_app` on a local port for the life of an ``async with`` block.

    ``requests`` counts request paths and ``requests_qs`` paths with query strings, so
    tests can check that no page was fetched twice.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: Counter[str] = Counter()
        self.requests_qs: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; only while serving."""
        if self._runner is None:
            raise RuntimeError("DemoSite is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start listening; with port 0 the OS picks a free port, read back into ``port``."""
        if self._runner is not None:
            raise RuntimeError("DemoSite already running")
        runner = web.AppRunner(make_app(self.requests, self.requests_qs), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving and close open connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class ServerThread(Generic[ServerT]):
    """Runs an async server (serving while entered as an async context manager) on its own loop in a thread.

    For sync code, benchmarks and tests that drive the crawler from a subprocess.
    Subclasses name what they serve in ``what`` (the thread's name and error messages).
    """

    what = "server"

    def __init__(self, server: ServerT, start_timeout: float = 10.0) -> None:
        self.server = server
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self.server:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    def _run(self) -> None:
        with contextlib.suppress(BaseException):  # reported to start() through self._error
            asyncio.run(self._serve())

    def start(self) -> None:
        """Start the thread and block until the server listens (or re-raise why it could not)."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"trawl-{self.what.replace(' ', '-')}", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.stop(timeout=1.0)
            raise TimeoutError(f"{self.what} did not start within {self.start_timeout}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server's loop to shut down and wait for the thread to finish."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile: already stopping
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        self._loop = self._stop = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class DemoSiteThread(ServerThread[DemoSite]):
    """Runs a :class:`DemoSite` on its own event loop in a background thread.

    For sync code and tests that drive the crawler from a subprocess.
    """

    what = "demo site"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0) -> None:
        super().__init__(DemoSite(host, port), start_timeout)
        self.site = self.server

    @property
    def url(self) -> str:
        """Base URL of the running site."""
        return self.site.url

    @property
    def requests(self) -> Counter[str]:
        """Request paths counted so far (written by the server thread)."""
        return self.site.requests

    @property
    def requests_qs(self) -> Counter[str]:
        """Request paths with query strings counted so far."""
        return self.site.requests_qs
