"""`html` sources: fixed URL lists or link-following crawls, fetched with aiohttp."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator

import structlog

from trawl.config import HtmlSource
from trawl.connectors.base import SourceContext, make_record, url_hash
from trawl.errors import BreakerOpen, ConfigError, FetchError, HostBusy
from trawl.extract import extract_items, extract_links, parse_html
from trawl.fetch import Response
from trawl.frontier.base import Claim, Frontier, Idle, Settled
from trawl.frontier.memory import MemoryFrontier
from trawl.records import OutcomeKind, Record, utcnow
from trawl.robots import ROBOTS_MAX_BYTES, parse_robots
from trawl.sitemaps import MAX_BYTES as SITEMAP_MAX_BYTES
from trawl.sitemaps import sitemap_entries
from trawl.urls import host_of, origin_of

__all__ = ["HtmlConnector"]

log = structlog.get_logger("trawl.connectors.html")

_DONE = object()


def _any_of(patterns: list[str]) -> re.Pattern[str] | None:
    """One regex matching where any of the patterns does (one search per link instead of one per pattern)."""
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


class HtmlConnector:
    """Crawls a source with a pool of workers sharing one frontier: the one crawl loop of every html-like kind.

    The frontier (:mod:`trawl.frontier`) is in memory unless the crawl is given a
    durable one; the loop is the same. The crawl ends when the frontier says so
    (nothing queued, being fetched, or parked). URLs whose host's breaker is open
    wait (parked) until it may let requests through again, up to
    ``breaker_requeues`` times, then end as ``skipped_breaker``. URLs whose host
    is throttled and has no room are parked too, without holding a worker, until
    the host's gate calls them back (any number of times: the host's throttle
    budget bounds it); their attempts and clock carry on. With a frontier
    that checkpoints, ``fetch()`` also yields a :class:`Settled` marker after each
    URL's records and outcome, and :class:`Idle` while it waits on other shards.
    """

    def __init__(self, source: HtmlSource, ctx: SourceContext, frontier: Frontier | None = None) -> None:
        self.source = source
        self.ctx = ctx
        self.frontier: Frontier = frontier or MemoryFrontier(source.name, ctx.run_id)
        self._allow = _any_of(source.follow.allow)
        self._deny = _any_of(source.follow.deny)
        self._record_re = re.compile(source.record_urls) if source.record_urls else None
        self._types = frozenset(t.lower() for t in source.content_types)
        self._seeds = list(source.urls) + list(source.start_urls)
        self._crawl = bool(source.start_urls)
        self._hosts = {host_of(u) for u in self._seeds}
        self._seen: set[int] = set()
        # Worked out once: the property walks every seed URL, and a crawl asks for it on every page.
        self._origins = source.header_origins
        self._resume: dict[str, tuple[int, float]] = {}
        """Parked for a throttled host: attempts made so far and when the first started, per URL."""
        self._scheduled = 0  # an upper bound with a shared frontier: links other crawlers queued first count too
        self._lastmod: dict[str, str] = {}
        """Sitemap URLs scheduled with a ``lastmod``: recorded with their outcome, so the next run can skip them."""

    def _follow(self, url: str) -> bool:
        rules = self.source.follow
        if rules.same_host and host_of(url) not in self._hosts:
            return False
        if self._allow is not None and self._allow.search(url) is None:
            return False
        return self._deny is None or self._deny.search(url) is None

    def _schedule(self, url: str, depth: int, h: int | None = None) -> None:
        h = url_hash(url) if h is None else h
        if h in self._seen:
            return
        limit = self.ctx.settings.max_pages
        if limit is not None and self._scheduled >= limit:
            return
        recent_max = self.frontier.recent_max
        if recent_max is not None and len(self._seen) >= recent_max:
            self._seen.clear()  # only recent links are remembered here: the frontier itself is the seen set
        self._seen.add(h)
        self._scheduled += 1
        self.ctx.stats.discovered += 1
        self.frontier.add(url, depth)

    def _workers(self) -> int:
        settings = self.ctx.settings
        if self._crawl and not self.source.follow.same_host:  # links lead to other hosts: as many as the crawl may use
            return settings.total_concurrency
        per_host = self.source.politeness.concurrency or settings.per_host_concurrency
        return min(settings.total_concurrency, per_host * max(1, len(self._hosts)))

    async def fetch(self) -> AsyncIterator[Record | Settled | Idle]:
        """Yield records as pages are fetched (and the frontier's markers); stop when nothing is left to fetch."""
        out: asyncio.Queue[object] = asyncio.Queue(maxsize=self.ctx.settings.queue_size)
        frontier = self.frontier
        markers = frontier.resumable
        requeues_max = self.ctx.settings.breaker_requeues
        loop = asyncio.get_running_loop()
        for url in self._seeds if not markers else ():  # a durable frontier was seeded when its run began
            self._schedule(url, 0)
        n_workers = self._workers()
        if self.source.sitemaps and markers:
            raise ConfigError(f"source {self.source.name}: `sitemaps` are read by in-memory crawls only")
        discovery = (
            asyncio.create_task(self._discover(), name=f"{self.source.name}-sitemaps") if self.source.sitemaps else None
        )

        woken: set[asyncio.Task[None]] = set()
        closed = False

        async def handle(claim: Claim) -> None:
            try:
                await self._page(claim.url, claim.depth, out)
            except HostBusy as exc:
                # The host asked to slow down: the URL waits outside the worker pool until the host has room.
                self._resume[claim.url] = (exc.attempts, time.monotonic() - exc.elapsed_ms / 1000)
                exc.when_ready(functools.partial(wake, claim))
                return
            except BreakerOpen as exc:
                if claim.requeues < requeues_max:
                    # Parked, still outstanding: back in the frontier when the breaker may admit a probe.
                    parked = claim._replace(requeues=claim.requeues + 1)
                    loop.call_later(exc.retry_in, frontier.claims.put_nowait, parked)
                    return
                await self.ctx.skipped_breaker(self.source.name, claim.url)
            if markers:
                await out.put(Settled(claim.key))
            frontier.settle()

        def wake(claim: Claim) -> None:
            # The throttled host has room for it now: straight to the host's gate, not behind the whole frontier
            # (which may hold thousands of other hosts' URLs). The gate wakes no more URLs than the host may take.
            if not closed:
                task = asyncio.create_task(woken_page(claim), name=f"{self.source.name}-woken")
                woken.add(task)
                task.add_done_callback(woken.discard)

        async def woken_page(claim: Claim) -> None:
            try:
                await handle(claim)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # as a worker's crash would: the crawl ends with it
                await out.put(exc)

        async def worker() -> None:
            while True:
                await handle(await frontier.claims.get())

        async def feed() -> None:
            try:
                if discovery is not None:
                    await discovery  # URLs are crawled as the sitemaps are read; the crawl may end only after
                await frontier.feed(out, n_workers)
            except BaseException as exc:
                await out.put(exc)
                raise
            await out.put(_DONE)

        async def watch(workers: list[asyncio.Task[None]]) -> None:
            # Workers only ever end by crashing; running out of URLs is the feeder's end.
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            await out.put(next(iter(done)).exception() or RuntimeError("html worker stopped"))

        workers = [asyncio.create_task(worker(), name=f"{self.source.name}-worker-{i}") for i in range(n_workers)]
        helpers = [
            asyncio.create_task(feed(), name=f"{self.source.name}-frontier"),
            asyncio.create_task(watch(workers), name=f"{self.source.name}-supervisor"),
        ]
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            closed = True
            tasks = (*workers, *helpers, *woken, *((discovery,) if discovery is not None else ()))
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sitemap_roots(self) -> list[str]:
        """The configured sitemaps, or those the robots.txt of each start host lists (``sitemaps: robots``)."""
        maps = self.source.sitemaps
        if isinstance(maps, list):
            return list(maps)
        roots: list[str] = []
        for origin in dict.fromkeys(origin_of(u) for u in self._seeds):
            try:
                resp = await self.ctx.fetcher.get(
                    f"{origin}/robots.txt",
                    robots=False,
                    max_bytes=ROBOTS_MAX_BYTES,
                    truncate=True,
                    source=self.source.name,
                    concurrency=self.source.politeness.concurrency,
                    delay=self.source.politeness.delay,
                    proxies=self.source.proxies,
                    proxy_rotation=self.source.proxy_rotation,
                )
            except (FetchError, BreakerOpen) as exc:
                log.warning("robots.txt unavailable: no sitemaps from it", origin=origin, error=str(exc))
                continue
            listed = list(parse_robots(resp.body).sitemaps) if resp.status == 200 else []
            log.info("sitemaps from robots.txt", origin=origin, sitemaps=len(listed))
            roots += listed
        return roots

    async def _sitemap(self, url: str) -> bytes | None:
        """One sitemap's body through the request path (its outcome recorded); None when it failed."""
        src = self.source
        resp = await self.ctx.fetch(
            src.name,
            url,
            transport="aiohttp",
            headers=src.headers,
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
            robots=src.robots,
            origins=self._origins,
            max_bytes=SITEMAP_MAX_BYTES,
            proxies=src.proxies,
            proxy_rotation=src.proxy_rotation,
        )
        if resp is None:
            return None
        self._hosts.add(host_of(url))  # same_host: a sitemap lists its own host's URLs
        await self.ctx.fetched(src.name, url, resp)
        return resp.body

    async def _discover(self) -> None:
        """Schedule the sitemaps' URLs that ``follow`` allows; skip those whose ``lastmod`` has not moved."""
        ctx, name = self.ctx, self.source.name
        listed = unchanged = 0
        backlog = max(100, ctx.settings.queue_size)
        roots = await self._sitemap_roots()
        self._hosts.update(host_of(root) for root in roots)
        async for entry in sitemap_entries(roots, self._sitemap):
            url = entry.url
            h = url_hash(url)
            if h in self._seen or not self._follow(url):
                continue
            listed += 1
            if entry.lastmod is not None and ctx.lastmods.get(url) == entry.lastmod:
                self._seen.add(h)
                unchanged += 1
                await ctx.unchanged(name, url, entry.lastmod)
                continue
            if entry.lastmod is not None:
                self._lastmod[url] = entry.lastmod
            self._schedule(url, 0, h)
            if self.frontier.claims.qsize() >= backlog:
                # Back-pressure: the sitemap waits, paused mid-parse, while the workers drain the queue, so memory
                # stays flat with the sitemap's size instead of holding every listed URL at once.
                while self.frontier.claims.qsize() > backlog // 2:  # noqa: ASYNC110 - the frontier's queue is its own
                    await asyncio.sleep(0.02)
        log.info("sitemaps read", urls=listed, unchanged=unchanged, scheduled=listed - unchanged)

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> Response | None:
        """Fetch one page under the source's politeness; None when it failed (its outcome recorded).

        BreakerOpen and HostBusy propagate (``park``): the crawl puts the URL back until its host may take it.
        """
        src = self.source
        attempts, started = self._resume.pop(url, (0, None))
        return await self.ctx.fetch(
            src.name,
            url,
            headers={**src.headers, **headers} if headers else src.headers,
            transport="aiohttp",
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
            robots=src.robots,
            adaptive=src.politeness.adaptive,
            park=True,
            park_busy=True,
            attempts=attempts,
            started=started,
            origins=self._origins,  # links and redirects to other origins go without the source's headers
            proxies=src.proxies,
            proxy_rotation=src.proxy_rotation,
        )

    async def _page(self, url: str, depth: int, out: asyncio.Queue[object]) -> None:
        src = self.source
        record = self._record_re is None or self._record_re.search(url) is not None
        # Only pages we need nothing else from may come back empty (304): record pages, or every page of a list.
        conditional = src.conditional and (not self._crawl or (self._record_re is not None and record))
        resp = await self._get(url, self.ctx.conditional_headers(url) if conditional else None)
        if resp is None:
            return
        await self._process(url, depth, resp, out, record if resp.url == url else None)

    async def replay(self, url: str, resp: Response, out: asyncio.Queue[object]) -> None:
        """What the crawl does with a response it already has (an archived page): the same records, outcome and
        follow rules as :meth:`_page` after its fetch (links it keeps are queued in the frontier, never fetched
        here). Re-extraction and ``trawl try --from-archive`` run the source's current rules through it."""
        await self._process(url, 0, resp, out)

    async def _process(
        self, url: str, depth: int, resp: Response, out: asyncio.Queue[object], record: bool | None = None
    ) -> None:
        """``record``: whether ``resp.url`` is a record page, when the caller knows already."""
        src = self.source
        archived = await resp.where_archived()  # at once, unless the archive's stream is flushing a part
        lastmod = self._lastmod.pop(url, None) if self._lastmod else None
        if resp.status == 304:
            await self.ctx.fetched(src.name, url, resp, lastmod=lastmod)
            return
        if resp.url != url:
            self._seen.add(url_hash(resp.url))  # a redirect target is not fetched again by its own link
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in self._types:
            await self.ctx.fetched(src.name, url, resp, OutcomeKind.FILTERED, f"content-type {ctype} is not allowed")
            return
        fetched_at = resp.archived_at or utcnow()
        tree = parse_html(resp.markup())
        if record is None:
            record = self._record_re is None or self._record_re.search(resp.url) is not None
        if record:
            for data in extract_items(tree, src.item_selector, src.fields):
                await out.put(
                    make_record(src.name, self.ctx.run_id, resp.url, fetched_at, data, src.key_fields, archived)
                )
                self.ctx.stats.records += 1
        if self._crawl and depth < src.follow.max_depth:
            for link in extract_links(tree, resp.url, self._seen):  # most links are seen already: dropped there
                if self._follow(link):
                    self._schedule(link, depth + 1)
        await self.ctx.fetched(src.name, url, resp, lastmod=lastmod)
