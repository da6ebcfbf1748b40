"""`spider` sources: a Scrapy spider run in the crawl's own event loop, under the fetch layer's rules.

Scrapy runs without a Twisted reactor (``TWISTED_REACTOR_ENABLED=False``, an
:class:`~scrapy.crawler.AsyncCrawlerRunner` awaited from asyncio), so a spider
interleaves with the ``api``/``html``/``browser`` sources in one loop, and a
process may run it any number of times (no ``ReactorNotRestartable``).

Two downloader middlewares tie Scrapy to :class:`trawl.fetch.Fetcher`:

* :class:`GateMiddleware`, innermost (next to the download handler), wraps
  every attempt and redirect hop in :meth:`Fetcher.slot`: the network guard,
  robots.txt (trawl's cache, not Scrapy's), the host's gate (per-host
  concurrency and delay, ``Crawl-delay``) and its circuit breaker — the one the
  asyncio workers use, so failures on either side open it for both. 5xx and
  connection errors count as failures, like a failed attempt of the Fetcher; a
  throttle signal (429, 503 with ``Retry-After``) slows the host's shared gate
  down and the request is scheduled again without using one of Scrapy's
  retries (the gate holds it until the host's pause is over).
* :class:`CredentialsMiddleware`, just outside it, adds the source's ``headers``
  to requests (and redirect hops) to the source's ``credentials_origins`` and
  strips them from requests to any other origin.
* :class:`OutcomeMiddleware`, outermost, sees each URL's end (after Scrapy's
  retries and redirects) and records exactly one outcome for it, under the
  URL first asked for.

With ``frontier: postgres`` (or the ``frontier`` setting) the spider's pending
requests live in PostgreSQL: :class:`~trawl.frontier.scheduler.PgScheduler`
is Scrapy's scheduler, on the run's rows in :mod:`trawl.frontier`.

Items stream out through the ``item_scraped`` signal into a bounded queue;
when the consumer (staging) falls behind, the engine is paused until it
catches up, so memory stays bounded. Scrapy's stats are folded into the
source's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import scrapy
import structlog
from itemadapter import ItemAdapter
from scrapy import signals
from scrapy.core.downloader.handlers._aiohttp import AiohttpDownloadHandler, _ClientResponse
from scrapy.core.downloader.handlers._base_streaming import BaseStreamingDownloadHandler
from scrapy.crawler import AsyncCrawlerRunner, Crawler
from scrapy.downloadermiddlewares.cookies import CookiesMiddleware
from scrapy.downloadermiddlewares.redirect import MetaRefreshMiddleware as _MetaRefreshMiddleware
from scrapy.downloadermiddlewares.redirect import RedirectMiddleware as _RedirectMiddleware
from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    DownloadFailedError,
    IgnoreRequest,
)
from scrapy.http import Headers
from scrapy.settings import Settings as ScrapySettings
from scrapy.utils.ssl import _make_ssl_context

from trawl.archive import Exchange
from trawl.config import SpiderSource
from trawl.connectors.base import OUTCOME_OF, SourceContext, make_record, url_hash
from trawl.decode import BodyDecoder, body_too_large
from trawl.errors import (
    BreakerOpen,
    ConfigError,
    FetchError,
    PermanentFetchError,
    ProxyFailed,
    ProxyUnavailable,
    SpiderFailed,
    Throttled,
    TransientFetchError,
)
from trawl.extract import get_path
from trawl.frontier import DurableFrontier, Frontier, PgFrontier, Settled, durable, open_store
from trawl.frontier.scheduler import PgScheduler
from trawl.netguard import GuardedResolver, RefusedAddress
from trawl.records import Outcome, OutcomeKind, Record, utcnow
from trawl.retry import TRANSIENT_STATUS, retry_after, status_error
from trawl.settings import Settings
from trawl.urls import origin_of

if TYPE_CHECKING:
    from scrapy.http import Request, Response

__all__ = [
    "CredentialsMiddleware",
    "GateMiddleware",
    "GuardedAiohttpDownloadHandler",
    "MetaRefreshMiddleware",
    "OfflineCookiesMiddleware",
    "OutcomeMiddleware",
    "RedirectMiddleware",
    "SpiderConnector",
    "load_spider",
    "scrapy_settings",
]

log = structlog.get_logger("trawl.connectors.spider")

_SLOT = "_trawl_slot"
_STARTED = "_trawl_started"
_THROTTLED = "_trawl_throttled"  # throttle signals met so far: attempts, not Scrapy retries
_PROXY = "_trawl_proxy"  # (Proxy, probe) of the attempt, with the source's forward proxies
_PROXY_LABEL = "_trawl_proxy_label"  # the proxy that carried the URL's last attempt (for its outcome row)
_MW = "trawl.connectors.spider"


class _Refused(IgnoreRequest):
    """A request the fetch layer would not send: carries the outcome it ends with."""

    def __init__(self, kind: OutcomeKind, error: str, status: int | None = None) -> None:
        super().__init__(error)
        self.kind = kind
        self.error = error
        self.status = status


def load_spider(path: str) -> type[scrapy.Spider]:
    """The spider class named ``package.module:Class``; a ConfigError saying what is wrong otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"spider {path}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, scrapy.Spider)):
        raise ConfigError(f"spider {path}: {module_name} has no Scrapy spider class {attr}")
    return cls


_ARCHIVED = "trawl_archived"  # request.meta: (where the archive holds the response, its time)
_TRAWL_MIDDLEWARES = {
    f"{_MW}.OutcomeMiddleware": 10,
    f"{_MW}.MetaRefreshMiddleware": 580,  # where Scrapy's own stand
    f"{_MW}.RedirectMiddleware": 600,
    f"{_MW}.OfflineCookiesMiddleware": 700,
    f"{_MW}.CredentialsMiddleware": 980,  # after every middleware that adds or copies headers
    f"{_MW}.GateMiddleware": 990,
}
# Scrapy's middlewares that trawl's take the place of (a source may not put them back).
_REPLACED = (
    "scrapy.downloadermiddlewares.cookies.CookiesMiddleware",
    "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware",
    "scrapy.downloadermiddlewares.redirect.RedirectMiddleware",
    "scrapy.downloadermiddlewares.redirect.MetaRefreshMiddleware",
)
# Settings that decide which middlewares, handlers and add-ons run at all: trawl's own, never a source's.
_RESERVED = ("DOWNLOADER_MIDDLEWARES_BASE", "DOWNLOAD_HANDLERS", "DOWNLOAD_HANDLERS_BASE", "DOWNLOADER", "ADDONS")


def _component_path(component: Any) -> str:
    return component if isinstance(component, str) else f"{component.__module__}.{component.__qualname__}"


def _check_middlewares(middlewares: Any, where: str) -> None:
    """A ConfigError if ``DOWNLOADER_MIDDLEWARES`` removes, disables or moves one of trawl's middlewares."""
    if not isinstance(middlewares, Mapping):
        return
    for component, order in middlewares.items():
        path = _component_path(component)
        if path in _REPLACED and order is not None:
            raise ConfigError(
                f"{where}: DOWNLOADER_MIDDLEWARES enables {path}: trawl's own middleware does its job "
                "(robots.txt, cookies and redirects pass the network guard and outcomes there)"
            )
        if path in _TRAWL_MIDDLEWARES and order != _TRAWL_MIDDLEWARES[path]:
            raise ConfigError(
                f"{where}: DOWNLOADER_MIDDLEWARES sets {path} to {order!r}: trawl's middlewares (the network "
                "guard, robots.txt, per-host limits and outcomes) cannot be removed or moved"
            )


def enforce_trawl_components(crawler_settings: ScrapySettings, where: str) -> None:
    """After a spider's ``custom_settings`` are merged: trawl's middlewares and handlers still in place, or a
    ConfigError naming who changed them."""
    _check_middlewares(crawler_settings.getdict("DOWNLOADER_MIDDLEWARES"), where)
    merged = crawler_settings.getwithbase("DOWNLOADER_MIDDLEWARES")
    for path, order in _TRAWL_MIDDLEWARES.items():
        if merged.get(path) != order:
            raise ConfigError(f"{where}: trawl's {path} is not in DOWNLOADER_MIDDLEWARES at {order}")
    handlers = crawler_settings.getwithbase("DOWNLOAD_HANDLERS")
    for scheme in ("http", "https"):
        if _component_path(handlers.get(scheme)) != f"{_MW}.GuardedAiohttpDownloadHandler":
            raise ConfigError(f"{where}: the {scheme} download handler is not trawl's guarded one")


def scrapy_settings(source: SpiderSource, settings: Settings) -> ScrapySettings:
    """Scrapy settings for one spider source: its own ``settings``, then trawl's fetch rules on top.

    trawl's rules are set at ``cmdline`` priority, above a spider's ``custom_settings``:
    robots.txt, politeness, retries, timeouts and size limits are the fetch layer's,
    whatever the spider says. The spider's ``DOWNLOADER_MIDDLEWARES`` still merge with
    the base list that carries trawl's middlewares, but may not name them: a source
    whose settings remove, disable or move one (or set which handlers, add-ons or
    base middlewares run) is a ConfigError, and the connector checks again once the
    spider's ``custom_settings`` are in (:func:`enforce_trawl_components`). Only
    http(s) and ``data:`` URLs have a download handler.
    """
    where = f"source {source.name!r}: settings"
    reserved = [k for k in _RESERVED if k in source.settings]
    if reserved:
        raise ConfigError(f"{where}: {', '.join(reserved)} cannot be set (trawl decides what downloads)")
    _check_middlewares(source.settings.get("DOWNLOADER_MIDDLEWARES"), where)
    concurrency = source.politeness.concurrency or settings.per_host_concurrency
    base = dict(ScrapySettings().getdict("DOWNLOADER_MIDDLEWARES_BASE"))
    for replaced in _REPLACED:
        base.pop(replaced, None)
    base.update(_TRAWL_MIDDLEWARES)
    out = ScrapySettings()
    out.setdict(source.settings, priority="project")
    out.setdict(
        {
            "TWISTED_REACTOR_ENABLED": False,  # Scrapy in the running asyncio loop, no reactor
            "REMOTE_CONTROL_ENABLED": False,
            "TELNETCONSOLE_ENABLED": False,
            "DOWNLOADER_MIDDLEWARES_BASE": base,
            "DOWNLOAD_HANDLERS": {
                "http": f"{_MW}.GuardedAiohttpDownloadHandler",
                "https": f"{_MW}.GuardedAiohttpDownloadHandler",
                # No other way out: file://, s3://, ftp:// would read where the guard does not look.
                "file": None,
                "s3": None,
                "ftp": None,
            },
            # No proxy from HTTP(S)_PROXY/ALL_PROXY: a proxy connects to the target itself, past the network guard.
            "HTTPPROXY_ENABLED": False,
            "ADDONS": {},  # an add-on may rewrite any setting after these
            "ROBOTSTXT_OBEY": False,  # GateMiddleware obeys robots.txt through trawl's shared cache
            "USER_AGENT": settings.user_agent,
            "CONCURRENT_REQUESTS": settings.total_concurrency,
            "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,  # the host's gate is the real cap, shared with the rest
            "DOWNLOAD_DELAY": 0,  # the host's gate spaces requests (and honours Crawl-delay)
            "AUTOTHROTTLE_ENABLED": False,
            "RETRY_ENABLED": True,
            "RETRY_TIMES": settings.max_retries,
            "RETRY_HTTP_CODES": sorted(TRANSIENT_STATUS),
            "REDIRECT_MAX_TIMES": settings.max_redirects,
            "DOWNLOAD_TIMEOUT": settings.total_timeout,
            "DOWNLOAD_MAXSIZE": settings.max_body_bytes,  # raw; inflated bodies are capped by trawl.decode
            "DOWNLOAD_WARNSIZE": 0,  # no warning half-way: a body over the limit fails its URL, said once
            "STATS_DUMP": False,  # the stats go into the source's summary line instead
            # FIELD-NOTES: a seen-set is cheap, 100 concurrent item tasks per response are not.
            "CONCURRENT_ITEMS": 10,
        },
        priority="cmdline",
    )
    if durable(source, settings):
        out.set("SCHEDULER", f"{PgScheduler.__module__}.{PgScheduler.__qualname__}", priority="cmdline")
        out.set("TRAWL_FRONTIER_BATCH", settings.frontier_batch, priority="cmdline")
    return out


def _bridge(crawler: Crawler) -> SpiderConnector:
    connector = getattr(crawler, "trawl_connector", None)
    if not isinstance(connector, SpiderConnector):
        raise SpiderFailed("trawl's Scrapy middlewares run only under a spider source")
    return connector


class OfflineCookiesMiddleware(CookiesMiddleware):
    """Scrapy's cookies middleware with the public suffix list bundled with tldextract.

    Scrapy asks tldextract whether a cookie's domain is a public suffix, and
    tldextract downloads the current list on first use; a crawler must not phone
    home for it (nor hang where there is no internet). The bundled snapshot is
    what the download would fall back to anyway.
    """

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> OfflineCookiesMiddleware:
        import scrapy.downloadermiddlewares.cookies as cookies
        from tldextract import TLDExtract

        if not getattr(cookies._split_domain, "trawl_offline", False):
            offline = TLDExtract(suffix_list_urls=(), include_psl_private_domains=True, cache_dir=None)
            offline.trawl_offline = True  # type: ignore[attr-defined]
            cookies._split_domain = offline
        mw = super().from_crawler(crawler)
        assert isinstance(mw, OfflineCookiesMiddleware)
        return mw


class GuardedAiohttpDownloadHandler(AiohttpDownloadHandler):
    """Scrapy's aiohttp download handler, connecting only to addresses the network guard allows.

    GateMiddleware checks a host's DNS answer before the request; this resolver
    checks the addresses the connection actually uses, so a DNS answer that
    changes in between (rebinding) cannot reach a forbidden network either. A
    refused address ends the URL ``blocked_network``, without a connection.
    """

    def __init__(self, crawler: Crawler) -> None:
        # AiohttpDownloadHandler.__init__ builds the same session without a resolver: skip it, not its base.
        BaseStreamingDownloadHandler.__init__(self, crawler)
        self._ssl_context = _make_ssl_context(crawler.settings)
        connector = aiohttp.TCPConnector(
            local_addr=self._bind_address,
            limit=self._pool_size_total,
            limit_per_host=self._pool_size_per_host,
            resolver=GuardedResolver(_bridge(crawler).ctx.fetcher.guard),
        )
        self._max_bytes = _bridge(crawler).ctx.settings.max_body_bytes
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            response_class=_ClientResponse,
            skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
        )

    @contextlib.asynccontextmanager
    async def _make_request(self, request: Request, timeout: float) -> AsyncIterator[_ClientResponse]:  # noqa: ASYNC109 (Scrapy's signature)
        try:
            async with super()._make_request(request, timeout) as response:
                yield response
        except (CannotResolveHostError, DownloadConnectionRefusedError) as exc:
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ClientConnectorError) and isinstance(cause.os_error, RefusedAddress):
                raise _Refused(OutcomeKind.BLOCKED_NETWORK, str(cause.os_error)) from None
            raise

    def _extract_headers(self, response: _ClientResponse) -> Headers:  # type: ignore[override]  # a staticmethod there
        # The body below comes out inflated: its Content-Encoding names only what is left (nothing, as a rule), so
        # Scrapy's HttpCompressionMiddleware finds nothing to do.
        headers = Headers(list(response.headers.items()))
        decoder = BodyDecoder(response.headers.get("Content-Encoding"), 0, str(response.url))
        if not decoder.identity:
            if decoder.remaining:
                headers["Content-Encoding"] = ", ".join(decoder.remaining)
            else:
                del headers["Content-Encoding"]
        return headers

    async def _iter_body_chunks(self, response: _ClientResponse) -> AsyncIterator[bytes]:  # type: ignore[override]
        # Raw bytes through trawl's bounded decoder, with trawl's limit (not a request's download_maxsize).
        url = str(response.url)
        decoder = BodyDecoder(response.headers.get("Content-Encoding"), self._max_bytes, url)
        try:
            async for chunk in response.content.iter_any():
                if out := decoder.decode(chunk):
                    yield out
            if out := decoder.flush():
                yield out
        except PermanentFetchError as exc:
            raise _Refused(OutcomeKind.FAILED, str(exc)) from None

    @staticmethod
    def _cancel_maxsize(size: int, limit: int, request: Request, *, expected: bool) -> NoReturn:
        raise _Refused(OutcomeKind.FAILED, str(body_too_large(request.url, limit)))


class _HopFailsItsUrl:
    """A redirect middleware whose errors fail the URL: a Location (or meta refresh) it cannot follow ends the URL
    ``failed`` with its outcome recorded. Scrapy sends an error raised in ``process_response`` to no
    ``process_exception`` (OutcomeMiddleware would never hear of it) and only logs it: the URL would vanish."""

    connector: SpiderConnector

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Any:
        mw = super().from_crawler(crawler)  # type: ignore[misc]
        mw.connector = _bridge(crawler)
        return mw

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        try:
            return super().process_response(request=request, response=response)  # type: ignore[misc,no-any-return]
        except IgnoreRequest:
            raise
        except Exception as exc:
            location = response.headers.get("Location") or b""
            error = f"redirect to a bad Location {location.decode('latin-1')!r}: {type(exc).__name__}: {exc}"
            await self.connector.outcome(request, OutcomeKind.FAILED, response.status, 0, error)
            raise IgnoreRequest(error) from None


class RedirectMiddleware(_HopFailsItsUrl, _RedirectMiddleware):  # type: ignore[misc]  # process_response: async
    """Scrapy's RedirectMiddleware; a Location it cannot follow fails the URL."""


class MetaRefreshMiddleware(_HopFailsItsUrl, _MetaRefreshMiddleware):  # type: ignore[misc]  # process_response: async
    """Scrapy's MetaRefreshMiddleware; a refresh URL it cannot follow fails the URL."""


class CredentialsMiddleware:
    """The source's ``headers`` on requests to its ``credentials_origins``, and on no other request.

    Runs on every request Scrapy sends, redirect hops and retries included (each
    goes through the downloader middlewares again), so a header copied onto a
    hop that leaves those origins is taken off before it goes out. Scrapy's own
    redirect middleware already drops ``Authorization`` and ``Cookie`` across
    origins; this covers every header the source adds.
    """

    def __init__(self, headers: dict[str, str], origins: frozenset[str]) -> None:
        self.headers = headers
        self.origins = origins

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> CredentialsMiddleware:
        src = _bridge(crawler).source
        return cls(dict(src.headers), src.header_origins)

    def process_request(self, request: Request) -> None:
        if not self.headers:
            return
        if origin_of(request.url) in self.origins:
            for name, value in self.headers.items():
                request.headers.setdefault(name, value)
        else:
            for name in self.headers:
                request.headers.pop(name, None)


class GateMiddleware:
    """Every attempt and redirect hop through :meth:`trawl.fetch.Fetcher.slot` (guard, robots, gate, breaker)."""

    def __init__(self, connector: SpiderConnector) -> None:
        self.connector = connector

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> GateMiddleware:
        return cls(_bridge(crawler))

    async def process_request(self, request: Request) -> None:
        c = self.connector
        src = c.source
        slot = c.ctx.fetcher.slot(
            request.url,
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
            robots=src.robots,
            source=src.name,
            adaptive=src.politeness.adaptive,
        )
        try:
            await slot.__aenter__()
        except BreakerOpen as exc:
            raise _Refused(OutcomeKind.SKIPPED_BREAKER, str(exc)) from None
        except FetchError as exc:
            raise _Refused(OUTCOME_OF.get(type(exc), OutcomeKind.FAILED), str(exc), exc.status) from None
        request.meta[_SLOT] = slot
        c.open_slots.add(slot)
        pool = c.proxies
        if pool is not None:  # through one of the source's forward proxies (the target host was guarded above)
            try:
                proxy, probe = pool.pick(urlsplit(request.url).hostname or "", request.url)
                await c.ctx.fetcher.check_proxy(proxy, request.url)
            except FetchError as exc:
                if isinstance(exc, ProxyUnavailable | ProxyFailed) or exc.transient:
                    await c.close_slot(slot, exc)
                    request.meta.pop(_SLOT, None)
                    raise _Refused(OutcomeKind.FAILED, str(exc)) from None
                await c.close_slot(slot, exc)
                request.meta.pop(_SLOT, None)
                raise _Refused(OUTCOME_OF.get(type(exc), OutcomeKind.FAILED), str(exc)) from None
            request.meta["proxy"] = proxy.url
            request.meta[_PROXY] = (proxy, probe)
            request.meta[_PROXY_LABEL] = proxy.label

    async def process_response(self, request: Request, response: Response) -> Response | Request:
        self._proxy_verdict(request, ok=response.status != 407)
        slot = request.meta.pop(_SLOT, None)
        if slot is None:
            return response
        status = response.status
        error = None
        if status >= 400:
            headers = {"retry-after": (response.headers.get("Retry-After") or b"").decode("latin-1")}
            error = status_error(status, request.url, retry_after(headers))
        await self.connector.close_slot(slot, error)
        if isinstance(error, Throttled):
            # Asked to slow down: again, through the gate (which waits out the host's pause), not a Scrapy retry.
            again = request.replace(dont_filter=True)
            again.meta[_THROTTLED] = request.meta.get(_THROTTLED, 0) + 1
            return again
        return response

    def _proxy_verdict(self, request: Request, ok: bool) -> None:
        used = request.meta.pop(_PROXY, None)
        if used is not None and self.connector.proxies is not None:
            proxy, probe = used
            self.connector.proxies.breaker(proxy).record(ok, probe)

    async def process_exception(self, request: Request, exception: Exception) -> None:
        # Connecting or talking to the proxy failed: the proxy's fault (its breaker counts it), not the host's.
        via_proxy = _PROXY in request.meta and isinstance(
            exception, DownloadConnectionRefusedError | ConnectionError | DownloadFailedError
        )
        self._proxy_verdict(request, ok=not via_proxy)
        slot = request.meta.pop(_SLOT, None)
        if slot is not None:
            cls: type[FetchError] = PermanentFetchError if isinstance(exception, IgnoreRequest) else TransientFetchError
            if via_proxy:
                cls = ProxyFailed
            await self.connector.close_slot(slot, cls(f"{type(exception).__name__}: {exception}", url=request.url))


class OutcomeMiddleware:
    """One outcome per URL, at its end: after Scrapy's retries and redirects, under the URL first asked for."""

    def __init__(self, connector: SpiderConnector) -> None:
        self.connector = connector

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> OutcomeMiddleware:
        return cls(_bridge(crawler))

    def process_request(self, request: Request) -> None:
        request.meta.setdefault(_STARTED, time.monotonic())

    async def process_response(self, request: Request, response: Response) -> Response:
        status = response.status
        if 200 <= status < 300:
            kind, error = OutcomeKind.FETCHED, None
            self.connector.ctx.stats.pages += 1
            self.connector.ctx.stats.bytes += len(response.body)
            await self.connector.archive(request, response)
        elif status == 304:
            kind, error = OutcomeKind.NOT_MODIFIED, None
        else:
            kind, error = OutcomeKind.FAILED, f"HTTP {status}"
        await self.connector.outcome(request, kind, status, len(response.body), error)
        return response

    async def process_exception(self, request: Request, exception: Exception) -> None:
        if isinstance(exception, _Refused):
            await self.connector.outcome(request, exception.kind, exception.status, 0, exception.error)
        elif isinstance(exception, IgnoreRequest):  # Scrapy's own filters (offsite, ...)
            await self.connector.outcome(request, OutcomeKind.FILTERED, None, 0, str(exception) or "ignored")
        else:
            error = f"{type(exception).__name__}: {exception}".rstrip(": ")
            log.warning("url failed", url=request.url, error=error)
            await self.connector.outcome(request, OutcomeKind.FAILED, None, 0, error)


def _stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Scrapy's stats as JSON-able values (times as ISO strings)."""
    return {
        k: v.isoformat() if isinstance(v, datetime) else v
        for k, v in sorted(stats.items())
        if isinstance(v, (int, float, str, datetime))
    }


class SpiderConnector:
    """Runs one spider source's Scrapy crawl in the current event loop and yields its items as records."""

    def __init__(self, source: SpiderSource, ctx: SourceContext, frontier: Frontier | None = None) -> None:
        self.source = source
        self.ctx = ctx
        self.frontier = frontier.store if isinstance(frontier, DurableFrontier) else None
        """The store of a durable crawl's frontier (``trawl.crawler``): it checkpoints, so ``fetch()`` also yields
        ``Settled`` after the items of each finished request."""
        self.open_slots: set[contextlib.AbstractAsyncContextManager[Any]] = set()
        self.proxies = ctx.fetcher.proxy_pool(source.proxies, source.proxy_rotation)
        """The source's forward proxies (GateMiddleware puts one on each attempt), or None."""
        self._done: set[int] = set()
        """Hashes of the URLs that have their outcome (64-bit hashes, not strings: FIELD-NOTES)."""
        self._queue: asyncio.Queue[tuple[int, Record]] = asyncio.Queue(maxsize=ctx.settings.queue_size)
        self._seq = 0  # items accepted so far; an item's number orders it against requests finished
        self._unyielded: dict[int, None] = {}  # numbers of accepted items not yet yielded, oldest first
        self._finished: deque[tuple[int, int]] = deque()  # (items accepted when it finished, frontier key)
        self._crawler: Crawler | None = None
        self._waiting = 0
        self.pauses = 0
        """How many times the engine was paused because staging fell behind."""

    async def close_slot(self, slot: contextlib.AbstractAsyncContextManager[Any], exc: FetchError | None) -> None:
        """End one attempt's place under the host's rules, with its verdict for the breaker."""
        self.open_slots.discard(slot)
        if exc is None:
            await slot.__aexit__(None, None, None)
        else:
            await slot.__aexit__(type(exc), exc, None)

    async def outcome(
        self, request: Request, kind: OutcomeKind, status: int | None, size: int, error: str | None
    ) -> None:
        """Record how the URL first asked for (before redirects) ended; once per URL."""
        url = (request.meta.get("redirect_urls") or [request.url])[0]
        h = url_hash(url)
        if h in self._done:
            return
        self._done.add(h)
        started = request.meta.get(_STARTED)
        elapsed = int((time.monotonic() - started) * 1000) if started else 0
        attempts = (
            0
            if kind in (OutcomeKind.SKIPPED_BREAKER, OutcomeKind.FILTERED)
            else request.meta.get("retry_times", 0) + 1 + request.meta.get(_THROTTLED, 0)
        )
        proxy = request.meta.get(_PROXY_LABEL) if kind is OutcomeKind.FETCHED else None
        await self.ctx.outcome(
            Outcome(self.ctx.run_id, self.source.name, url, kind, status, attempts, size, elapsed, error, proxy=proxy)
        )

    async def archive(self, request: Request, response: Response) -> None:
        """Write a response to the page archive; its items find where it landed in ``request.meta``."""
        ctx = self.ctx
        if ctx.archiver is None:
            return

        def plain(headers: Any) -> dict[str, str]:
            return {
                k.decode("latin-1"): b", ".join(v).decode("latin-1") for k, v in headers.items() if isinstance(k, bytes)
            }

        at = utcnow()
        ex = Exchange(
            response.url, response.status, plain(response.headers), response.body, request.method,
            plain(request.headers), fetched_at=at,
        )  # fmt: skip
        request.meta[_ARCHIVED] = (await ctx.archiver.write(ex), at)

    async def _on_item(self, item: Any, response: Response, spider: scrapy.Spider) -> None:
        src = self.source
        data = ItemAdapter(item).asdict()
        for name, spec in src.fields.items():
            if spec.path and spec.path != name:
                data[name] = get_path(data, spec.path)
        item_url = data.get("url")
        url = item_url if isinstance(item_url, str) and item_url else response.url
        archived, at = response.meta.get(_ARCHIVED) or (None, utcnow())
        record = make_record(src.name, self.ctx.run_id, url, at, data, src.key_fields, archived)
        self.ctx.stats.records += 1
        seq, self._seq = self._seq, self._seq + 1
        self._unyielded[seq] = None
        entry = (seq, record)
        if not self._queue.full():
            self._queue.put_nowait(entry)
            return
        # Staging is behind: stop sending requests until it catches up (the items in flight wait here).
        engine = self._crawler.engine if self._crawler else None
        self._waiting += 1
        if engine is not None and not engine.paused:
            engine.pause()
            self.pauses += 1
        try:
            await self._queue.put(entry)
        finally:
            self._waiting -= 1
            if engine is not None and self._waiting == 0 and engine.paused:
                engine.unpause()
                nextcall = getattr(getattr(engine, "_slot", None), "nextcall", None)
                if nextcall is not None:  # resume now, not at the next 5 s heartbeat
                    nextcall.schedule()

    def _request_finished(self, key: int) -> None:
        """PgScheduler (durable crawl): a request is finished; every item it scraped has been accepted by now."""
        self._finished.append((self._seq, key))

    def _settled(self) -> Iterator[Settled]:
        """The finished requests whose items have all been yielded: they may be checkpointed as done."""
        while self._finished:
            oldest = next(iter(self._unyielded), None)
            if oldest is not None and oldest < self._finished[0][0]:
                return
            yield Settled(self._finished.popleft()[1])

    async def fetch(self) -> AsyncIterator[Record | Settled]:
        """Run the spider; its items as they are scraped (and, on a durable crawl's frontier, the markers of
        finished requests)."""
        if self.frontier is not None or not durable(self.source, self.ctx.settings):
            async for item in self._crawl(self.frontier):
                yield item
            return
        # Run on its own (not by the crawl engine) with the durable frontier chosen: this run's store, registered
        # afresh (a spider run that died is crawled again from the start).
        async with open_store(self.source.name, self.ctx.run_id, self.ctx.settings, shard=0) as store:
            if await store.run() is not None:
                log.warning("spider sources do not resume: the run's frontier starts over", run_id=self.ctx.run_id)
                await store.reset()
            await store.begin(utcnow(), ())  # no seeds: the spider's start requests come through the scheduler
            status = "failed"
            try:
                async for item in self._crawl(store):
                    yield item
                status = "complete"
            finally:
                try:
                    await store.finish(status)
                except Exception as exc:  # the run's status row only; not worth hiding how the crawl itself went
                    log.warning("frontier run status not recorded", status=status, error=f"{type(exc).__name__}: {exc}")

    async def _crawl(self, frontier: PgFrontier | None) -> AsyncIterator[Record | Settled]:
        spidercls = load_spider(self.source.spider)
        runner = AsyncCrawlerRunner(scrapy_settings(self.source, self.ctx.settings))
        crawler = runner.create_crawler(spidercls)
        enforce_trawl_components(crawler.settings, f"spider {self.source.spider} (custom_settings)")
        crawler.trawl_connector = self  # type: ignore[attr-defined]  # found by the middlewares
        if frontier is not None:
            PgScheduler.attach(crawler, frontier, self._request_finished if frontier is self.frontier else None)
        self._crawler = crawler
        crawler.signals.connect(self._on_item, signal=signals.item_scraped)  # a bound method: kept alive by self
        log.info(
            "spider started",
            spider=self.source.spider,
            args=self.source.args,
            frontier="postgres" if frontier else "memory",
        )
        task = runner.crawl(crawler, **self.source.args)
        queue = self._queue
        try:
            while True:
                for marker in self._settled():
                    yield marker
                if not queue.empty():
                    seq, record = queue.get_nowait()
                    del self._unyielded[seq]
                    yield record
                    continue
                if task.done():
                    break
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    seq, record = getter.result()
                    del self._unyielded[seq]
                    yield record
                else:
                    getter.cancel()
            for marker in self._settled():
                yield marker
            if task.exception() is not None:
                exc = task.exception()
                raise SpiderFailed(f"spider {self.source.spider} failed: {type(exc).__name__}: {exc}") from exc
            scheduler = getattr(crawler, "trawl_scheduler", None)
            if isinstance(scheduler, PgScheduler) and scheduler.error is not None:
                err = scheduler.error
                raise SpiderFailed(f"spider {self.source.spider}: frontier failed: {type(err).__name__}: {err}")
        finally:
            if not task.done():  # the consumer stopped early (or was cancelled): stop Scrapy too
                with contextlib.suppress(Exception):
                    await runner.stop()
                with contextlib.suppress(BaseException):
                    await task
            for slot in list(self.open_slots):  # downloads cut off by a stop: no verdict for the breaker
                self.open_slots.discard(slot)
                with contextlib.suppress(BaseException):
                    await slot.__aexit__(asyncio.CancelledError, asyncio.CancelledError(), None)
            # A spider that failed to start has no stats (Scrapy raises on asking): its own error is the one to report.
            with contextlib.suppress(RuntimeError):
                self.ctx.stats.scrapy = _stats(crawler.stats.get_stats())
            crawler.signals.disconnect(self._on_item, signal=signals.item_scraped)
            self._crawler = None
        log.info("spider finished", reason=self.ctx.stats.scrapy.get("finish_reason"), engine_pauses=self.pauses)
