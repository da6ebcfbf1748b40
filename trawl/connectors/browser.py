"""`browser` sources: the `html` crawl, with pages rendered by Chromium (Playwright) when they need it.

One browser per Fetcher (so per crawl run and process), started on first use and
closed with the Fetcher; a bounded number of pages render at once; a browser
context per host (cookies stay with their host), its pages reused, idle contexts
closed (least recently used past ``browser_contexts``, or idle past
``browser_context_idle``). Every navigation goes through
:meth:`trawl.fetch.Fetcher.slot` (network guard, robots.txt, per-host concurrency
and delay, the host's breaker), and every connection the browser makes (the
document, each redirect hop, subresources, ``fetch()``, WebSockets) goes through
:class:`~trawl.connectors.proxy.GuardedProxy`, which connects only to addresses
the network guard returned. Chromium resolves no name itself and sends no
WebRTC/STUN traffic outside the proxy. A document or redirect hop the proxy
refused makes the URL ``blocked_network``; blocked resource types are not
loaded at all (a route handler).

Each page has one deadline for everything (``browser_page_timeout``: navigation,
waits, scrolling, reading the DOM): past it the page is closed and the URL
``failed``. The rendered HTML is capped by ``max_body_bytes``, measured in the
page before it is sent over.

``render: auto`` fetches over plain HTTP first and renders only when the
declared required fields are missing; it then remembers that host and URL
pattern (digits folded: ``/js/products/{n}``) so the next pages like it go to
the browser directly. Pages per path are counted in the source's stats
(``render``: ``http``, ``browser``, ``http+browser``).

A browser that dies is relaunched and the page retried (transient, like a
connection reset); a page that does not load or show its selector in time is
closed and ends ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from trawl.config import BrowserSource
from trawl.connectors.base import SourceContext, make_record, url_hash
from trawl.connectors.html import HtmlConnector
from trawl.connectors.proxy import GuardedProxy
from trawl.errors import (
    BlockedNetworkError,
    BreakerOpen,
    ConfigError,
    FetchError,
    HostBusy,
    PermanentFetchError,
    TransientFetchError,
)
from trawl.extract import extract_items, extract_links, parse_html
from trawl.fetch import Fetcher, Response
from trawl.frontier.base import Frontier
from trawl.proxies import ProxyPool
from trawl.records import OutcomeKind, utcnow
from trawl.retry import retry_after, status_error
from trawl.settings import Settings
from trawl.urls import host_of

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page, Playwright, Request, Route

__all__ = ["BrowserConnector", "BrowserPool", "find_chromium"]

log = structlog.get_logger("trawl.connectors.browser")

_SYSTEM_CHROMIUM = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")
# Nothing phoning home. `--no-sandbox` comes from Playwright unless `browser_sandbox` is on (see the README).
_LAUNCH_ARGS = [
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
    # No QUIC (UDP) and no WebRTC UDP outside the proxy: every byte out is a TCP connection the proxy guards.
    "--disable-quic",
    "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--webrtc-ip-handling-policy=disable_non_proxied_udp",
]


def _proxy_args(proxy_host: str, proxy_url: str) -> list[str]:
    """Everything through the guarded proxy, loopback included (Chromium bypasses proxies for loopback unless
    told not to), and no name resolved by Chromium itself (the proxy resolves, through the guard)."""
    return [
        f"--proxy-server={proxy_url}",
        "--proxy-bypass-list=<-loopback>",
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {proxy_host}",
    ]


# The DOM as page.content() serializes it, or only its length when that alone passes the cap
# (UTF-16 units; each is at least one UTF-8 byte), so an oversize DOM never crosses over.
_SERIALIZE = """(limit) => {
  let html = document.doctype ? new XMLSerializer().serializeToString(document.doctype) : "";
  if (document.documentElement) html += document.documentElement.outerHTML;
  return html.length > limit ? html.length : html;
}"""
_CLOSE_TIMEOUT = 5.0
_DIGITS = re.compile(r"\d+")
_RENDER_KEY = "browser-pool"


def find_chromium(setting: str | None) -> str | None:
    """The Chromium to launch: the setting, else Playwright's own (None: let Playwright find it), else the system's.

    Raises FileNotFoundError when the setting names nothing executable, or nothing is found at all.
    """
    if setting:
        path = shutil.which(setting) or (setting if os.access(setting, os.X_OK) else None)
        if not path:
            raise FileNotFoundError(f"TRAWL_BROWSER_PATH={setting}: not an executable")
        return path
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH", Path.home() / ".cache" / "ms-playwright"))
    if any(cache.glob("chromium-*/chrome-linux*/chrome")):
        return None  # Playwright's own build
    for candidate in _SYSTEM_CHROMIUM:
        path = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if path:
            return path
    raise FileNotFoundError(
        "no Chromium for browser sources: set TRAWL_BROWSER_PATH, or `apt-get install chromium` (Debian)"
    )


def url_pattern(url: str) -> tuple[str, str]:
    """(host, path with every run of digits as ``{n}``): pages of one kind share it."""
    return host_of(url), _DIGITS.sub("{n}", urlsplit(url).path)


_ContextKey = tuple[str, bool, tuple[str, ...]]


@dataclass(slots=True)
class _Context:
    """A host's browser context, its idle pages, how many pages are out and when the last came back."""

    context: BrowserContext
    idle: list[Page] = field(default_factory=list)
    busy: int = 0
    last_used: float = field(default_factory=time.monotonic)


class BrowserPool:
    """One Chromium behind a guarded proxy, a context per (host, JavaScript on/off), at most ``size`` pages
    rendering at once."""

    def __init__(self, settings: Settings, fetcher: Fetcher, upstream: ProxyPool | None = None) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.upstream = upstream
        """The forward proxies the guarded proxy sends this browser's requests on through (None: direct)."""
        self.size = settings.browser_pages
        self._slots = asyncio.Semaphore(self.size)
        self._lock = asyncio.Lock()
        self._context_lock = asyncio.Lock()
        self._pw: Playwright | None = None
        self._browser: Browser | None = None
        self._proxy: GuardedProxy | None = None
        self._contexts: OrderedDict[_ContextKey, _Context] = OrderedDict()
        """Least recently used first."""
        self.evicted = 0
        """Contexts closed for being idle or past ``browser_contexts``."""
        self.needs_browser: set[tuple[str, str]] = set()
        """(host, URL pattern) pairs whose pages needed rendering (adaptive mode)."""
        self.navigations: Counter[str] = Counter()
        """Navigations per URL (what the browser was asked to load)."""
        self.blocked: Counter[str] = Counter()
        """Page requests refused, by reason (``network``: by the guarded proxy, ``type:image``, ...)."""
        self.launches = 0
        self.generation = 0
        """Bumped at every launch: a page knows which browser it came from."""

    @classmethod
    def of(cls, fetcher: Fetcher, upstream: ProxyPool | None = None) -> BrowserPool:
        """The Fetcher's pool for these forward proxies (one browser per proxy list), created on first use and
        closed with the Fetcher."""
        key = _RENDER_KEY if upstream is None else f"{_RENDER_KEY} {upstream.rotation} {upstream.proxies}"
        pool = fetcher.resources.get(key)
        if pool is None:
            pool = fetcher.resources[key] = cls(fetcher.settings, fetcher, upstream)
            fetcher.on_close(pool.close)
        assert isinstance(pool, BrowserPool)
        return pool

    @property
    def contexts(self) -> int:
        """Browser contexts open now."""
        return len(self._contexts)

    def refusal(self, url: str, since: float) -> str | None:
        """Why the guarded proxy refused this URL's host and port at or after ``since``, or None."""
        return self._proxy.refusal(url, since) if self._proxy is not None else None

    def _refused(self, host: str, port: int, reason: str) -> None:
        self.blocked["network"] += 1

    async def _ensure_browser(self) -> Browser:
        async with self._lock:
            if self._browser is not None and self._browser.is_connected():
                return self._browser
            if self._browser is not None:  # died: forget its contexts and pages
                log.warning("browser restarted", launches=self.launches)
                self._contexts.clear()
            from playwright.async_api import async_playwright

            sandbox = self.settings.browser_sandbox
            if sandbox and os.geteuid() == 0:
                raise ConfigError(
                    "TRAWL_BROWSER_SANDBOX=true, but trawl runs as root and Chromium's sandbox does not: run trawl "
                    "as another user (README: Browser sources), or leave the setting off"
                )
            if self._proxy is None:
                proxy = GuardedProxy(
                    self.fetcher.guard,
                    connect_timeout=self.settings.connect_timeout,
                    on_refused=self._refused,
                    upstream=self.upstream,
                )
                self._proxy = await proxy.__aenter__()
            if self._pw is None:
                self._pw = await async_playwright().start()
            path = await asyncio.to_thread(find_chromium, self.settings.browser_path)  # globs and stats the disk
            t0 = time.monotonic()
            args = [*_LAUNCH_ARGS, *_proxy_args(self._proxy.host, self._proxy.url)]
            self._browser = await self._pw.chromium.launch(
                executable_path=path, headless=True, args=args, chromium_sandbox=sandbox
            )
            self.launches += 1
            self.generation += 1
            log.info(
                "browser launched",
                executable=path or "playwright",
                sandbox=sandbox,
                seconds=round(time.monotonic() - t0, 3),
            )
            return self._browser

    async def _context(self, key: _ContextKey) -> _Context:
        """The key's context (created on first use), marked most recently used."""
        async with self._context_lock:  # two first pages of a host share one context
            entry = self._contexts.get(key)
            if entry is None:
                browser = await self._ensure_browser()
                _, javascript, blocked = key
                context = await browser.new_context(
                    java_script_enabled=javascript, user_agent=self.settings.user_agent, service_workers="block"
                )
                if blocked:  # the network is the proxy's business; this only skips resource types
                    blocked_types = frozenset(blocked)

                    async def skip(route: Route) -> None:
                        kind = route.request.resource_type
                        if kind in blocked_types:
                            self.blocked[f"type:{kind}"] += 1
                            await route.abort("blockedbyclient")
                        else:
                            await route.continue_()

                    await context.route("**/*", skip)
                entry = self._contexts[key] = _Context(context)
            self._contexts.move_to_end(key)
            return entry

    async def _evict(self, keep: _ContextKey) -> None:
        """Close contexts idle past ``browser_context_idle``, and the least recently used idle ones while more
        than ``browser_contexts`` are open (a context with a page out is never closed)."""
        now = time.monotonic()
        over = len(self._contexts) - self.settings.browser_contexts
        doomed = []
        for key, entry in list(self._contexts.items()):  # least recently used first
            if key == keep or entry.busy:
                continue
            if over > 0 or now - entry.last_used > self.settings.browser_context_idle:
                del self._contexts[key]
                doomed.append(entry.context)
                over -= 1
        for context in doomed:
            self.evicted += 1
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await context.close()

    @contextlib.asynccontextmanager
    async def page(self, host: str, javascript: bool, blocked: tuple[str, ...]) -> AsyncIterator[Page]:
        """A page of the host's context for one render; reused after a clean render, closed after a failed one."""
        async with self._slots:
            key = (host, javascript, blocked)
            entry = await self._context(key)
            entry.busy += 1
            page: Page | None = None
            ok = False
            try:
                await self._evict(keep=key)
                page = entry.idle.pop() if entry.idle else await entry.context.new_page()
                yield page
                ok = True
            finally:
                entry.busy -= 1
                entry.last_used = time.monotonic()
                if page is not None and ok and not page.is_closed():
                    entry.idle.append(page)
                elif page is not None:
                    try:  # a page busy in a script loop still closes (Chromium ends its renderer)
                        async with asyncio.timeout(_CLOSE_TIMEOUT):
                            await page.close()
                    except Exception as exc:
                        await self._drop(key, entry, exc)

    async def _drop(self, key: _ContextKey, entry: _Context, exc: Exception) -> None:
        """A page that would not close: close its whole context, unless other pages are still using it."""
        log.warning("browser page did not close", host=key[0], error=f"{type(exc).__name__}: {exc}")
        if entry.busy or self._contexts.get(key) is not entry:
            return
        del self._contexts[key]
        self.evicted += 1
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await entry.context.close()

    async def reset(self, generation: int) -> None:
        """Forget a dead browser (once, however many pages noticed it); the next page relaunches it."""
        async with self._lock:
            if generation != self.generation or self._browser is None:
                return
            browser, self._browser = self._browser, None
            self._contexts.clear()
            log.warning("browser died; relaunching on the next page", launches=self.launches)
        with contextlib.suppress(Exception):
            await browser.close()

    async def close(self) -> None:
        """Close the browser, Playwright and the proxy (idempotent)."""
        browser, self._browser = self._browser, None
        pw, self._pw = self._pw, None
        proxy, self._proxy = self._proxy, None
        self._contexts.clear()
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.close()
        if pw is not None:
            with contextlib.suppress(Exception):
                await pw.stop()
        if proxy is not None:
            await proxy.close()


class _BrowserDied(Exception):
    """The browser (not the host) failed: neutral for the host's breaker, retried after a relaunch."""


def _crashed(exc: BaseException) -> bool:
    """Whether the page, its context or the browser went away (Playwright says so by type, on every call)."""
    from playwright._impl._errors import TargetClosedError

    return isinstance(exc, TargetClosedError)


def _browser_error(exc: BaseException, url: str) -> FetchError:
    """A Playwright failure as trawl's error, by type: a load timeout may pass, the rest will not."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, PlaywrightTimeout):
        return TransientFetchError(f"browser: {text}", url=url)
    return PermanentFetchError(f"browser: {type(exc).__name__}: {text}", url=url)


class BrowserConnector(HtmlConnector):
    """The `html` connector's crawl (frontier, follow rules, parking, outcomes) with a browser where needed."""

    source: BrowserSource

    def __init__(self, source: BrowserSource, ctx: SourceContext, frontier: Frontier | None = None) -> None:
        super().__init__(source, ctx, frontier)
        self.pool = BrowserPool.of(ctx.fetcher, ctx.fetcher.proxy_pool(source.proxies, source.proxy_rotation))
        self._required = [n for n, f in source.fields.items() if f.required] or list(source.fields)
        self._blocked = tuple(
            sorted(
                source.block_resources if source.block_resources is not None else ctx.settings.browser_block_resources
            )
        )

    def _complete(self, items: list[dict[str, Any]]) -> bool:
        return bool(items) and all(all(item.get(n) not in (None, "", []) for n in self._required) for item in items)

    async def _page(self, url: str, depth: int, out: asyncio.Queue[object]) -> None:
        src = self.source
        is_record_page = self._record_re is None or bool(self._record_re.search(url))
        mode = src.render
        tried_http = False
        if mode == "never" or (mode == "auto" and url_pattern(url) not in self.pool.needs_browser):
            resp = await self._get(url)
            if resp is None:
                return
            if resp.url != url:
                self._seen.add(url_hash(resp.url))
            ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype and ctype not in self._types:
                await self.ctx.fetched(
                    src.name, url, resp, OutcomeKind.FILTERED, f"content-type {ctype} is not allowed"
                )
                return
            tree = parse_html(resp.text())
            items = list(extract_items(tree, src.item_selector, src.fields)) if is_record_page else []
            if mode == "never" or not is_record_page or self._complete(items):
                self.ctx.stats.render["http"] += 1
                await self._emit(url, resp, tree, items, depth, out)
                return
            # The page needs its scripts: this pattern goes to the browser from now on.
            tried_http = True
            self.pool.needs_browser.add(url_pattern(url))
            self.ctx.stats.render["http+browser"] += 1
            log.info("page needs the browser", url=url, pattern=url_pattern(url)[1], missing=self._required)
        else:
            self.ctx.stats.render["browser"] += 1
        direct = not tried_http
        resp = await self._render(url)
        if resp is None:
            return
        resp = self.ctx.archive(resp)  # the document as served, and its rendered DOM as a conversion
        if direct:  # a page that went over HTTP first was counted then
            self.ctx.stats.pages += 1
        self.ctx.stats.bytes += len(resp.body)
        tree = parse_html(resp.text())
        items = list(extract_items(tree, src.item_selector, src.fields)) if is_record_page else []
        await self._emit(url, resp, tree, items, depth, out)

    async def _emit(
        self, url: str, resp: Response, tree: Any, items: list[dict[str, Any]], depth: int, out: asyncio.Queue[object]
    ) -> None:
        src = self.source
        fetched_at = resp.archived_at or utcnow()
        archived = await resp.where_archived() if items else None
        for data in items:
            await out.put(make_record(src.name, self.ctx.run_id, resp.url, fetched_at, data, src.key_fields, archived))
            self.ctx.stats.records += 1
        if self._crawl and depth < src.follow.max_depth:
            for link in extract_links(tree, resp.url):
                h = url_hash(link)
                if h not in self._seen and self._follow(link):
                    self._schedule(link, depth + 1, h)
        await self.ctx.fetched(src.name, url, resp)

    async def _render(self, url: str) -> Response | None:
        """Render one page (retrying transient failures); None after recording its outcome when it failed.

        BreakerOpen and HostBusy propagate, so the crawl parks the URL like any other.
        """
        attempts, started = self._resume.pop(url, (0, time.monotonic()))
        try:
            return await self.ctx.fetcher.retrying(
                lambda attempt: self._render_once(url, attempt, started),
                url=url,
                source=self.source.name,
                started=started,
                attempts=attempts,
            )
        except (BreakerOpen, HostBusy):
            raise
        except FetchError as exc:
            await self.ctx.failed(self.source.name, url, exc)
            return None

    async def _render_once(self, url: str, attempts: int, started: float) -> Response:
        host = host_of(url)
        generation = self.pool.generation  # the page's browser is this one, or one launched since
        try:
            return await self._navigate(url, host, attempts, started)
        except _BrowserDied as exc:
            await self.pool.reset(generation)  # a no-op when another page already did it
            raise TransientFetchError(f"browser died: {exc}", url=url) from exc

    async def _navigate(self, url: str, host: str, attempts: int, started: float) -> Response:
        src, s = self.source, self.ctx.settings
        async with self.ctx.fetcher.slot(
            url,
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
            robots=src.robots,
            source=src.name,
            adaptive=src.politeness.adaptive,
            park=True,
        ):
            try:
                async with self.pool.page(host, src.javascript, self._blocked) as page:
                    self.pool.navigations[url] += 1
                    deadline = asyncio.timeout(s.browser_page_timeout)
                    try:
                        async with deadline:
                            final_url, status, headers, body, served, sent = await self._load(page, url)
                    except TimeoutError:
                        if not deadline.expired():
                            raise
                        raise PermanentFetchError(
                            f"page did not finish within {s.browser_page_timeout}s (browser_page_timeout)", url=url
                        ) from None
            except FetchError:
                raise
            except Exception as exc:
                if _crashed(exc):
                    raise _BrowserDied(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
                raise _browser_error(exc, url) from exc
        headers["content-type"] = "text/html; charset=utf-8"  # the rendered DOM, whatever was served
        elapsed = int((time.monotonic() - started) * 1000)
        return Response(final_url, status, headers, body, attempts, elapsed, request_headers=sent, served=served)

    async def _load(self, page: Page, url: str) -> tuple[str, int, dict[str, str], bytes, bytes | None, dict[str, str]]:
        """Navigate, wait, scroll and read the DOM: (final URL, status, headers, rendered HTML as UTF-8, the
        document as served, the navigation's request headers) — the last two for the page archive.

        A document or redirect hop the guarded proxy refused raises BlockedNetworkError.
        """
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        src, s = self.source, self.ctx.settings
        since = time.monotonic()
        failed_hops: list[str] = []

        def on_failed(request: Request) -> None:
            with contextlib.suppress(PlaywrightError):  # a service worker's request has no frame
                if request.is_navigation_request() and request.frame.parent_frame is None:
                    failed_hops.append(request.url)

        page.on("requestfailed", on_failed)
        try:
            try:
                nav = await page.goto(
                    url,
                    wait_until="networkidle" if src.wait_for.network_idle else "load",
                    timeout=s.browser_navigation_timeout * 1000,
                )
            except PlaywrightError:
                for hop in failed_hops:  # a CONNECT (https) the proxy refused fails the navigation
                    self._check_refused(url, hop, since)
                raise
        finally:
            page.remove_listener("requestfailed", on_failed)
        status = nav.status if nav is not None else 200
        if nav is not None and status == 403:  # the proxy's refusal of a plain-http document or hop
            self._check_refused(url, nav.url, since)
        if status >= 400:
            raise status_error(status, url, retry_after(await nav.all_headers()) if nav is not None else None)
        if src.wait_for.selector:
            try:
                await page.wait_for_selector(src.wait_for.selector, timeout=s.browser_wait_timeout * 1000)
            except PlaywrightTimeout as exc:
                raise PermanentFetchError(
                    f"selector {src.wait_for.selector!r} did not appear within {s.browser_wait_timeout}s", url=url
                ) from exc
        if src.scroll_to_bottom:
            await _scroll_to_bottom(page, s.browser_wait_timeout)
        if src.wait_for.delay:
            await asyncio.sleep(src.wait_for.delay)
        limit = s.max_body_bytes
        html = await page.evaluate(_SERIALIZE, limit)
        body = html.encode("utf-8") if isinstance(html, str) else b""
        if not isinstance(html, str) or len(body) > limit:
            raise PermanentFetchError(f"rendered HTML larger than {limit} bytes (max_body_bytes)", url=url)
        headers = await nav.all_headers() if nav is not None else {}
        served: bytes | None = None
        sent: dict[str, str] = {}
        if nav is not None and self.ctx.archiver is not None:
            with contextlib.suppress(PlaywrightError):  # a body Chromium no longer holds: the DOM alone is kept
                served = await nav.body()
                sent = await nav.request.all_headers()
        return page.url, status, {k.lower(): v for k, v in headers.items()}, body, served, sent

    def _check_refused(self, url: str, hop: str, since: float) -> None:
        """Raise BlockedNetworkError when the guarded proxy refused ``hop`` (the URL or a redirect) since ``since``."""
        reason = self.pool.refusal(hop, since)
        if reason is not None:
            raise BlockedNetworkError(reason if hop == url else f"redirect to {hop}: {reason}", url=url)


async def _scroll_to_bottom(page: Page, limit_s: float) -> None:
    """Scroll until the page stops growing (infinite lists), at most ``limit_s`` seconds."""
    deadline = time.monotonic() + limit_s
    height = -1
    while time.monotonic() < deadline:
        now = await page.evaluate("document.body ? document.body.scrollHeight : 0")
        if now == height:
            return
        height = now
        await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        await asyncio.sleep(0.25)
