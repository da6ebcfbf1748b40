"""`html` sources: fixed URL lists or link-following crawls, fetched with aiohttp."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from trawl.config import HtmlSource
from trawl.connectors.base import SourceContext, make_record
from trawl.errors import BreakerOpen
from trawl.extract import extract_items, extract_links, parse_html
from trawl.fetch import Response
from trawl.records import OutcomeKind, Record, utcnow

if TYPE_CHECKING:
    from trawl.frontier import PgFrontier

__all__ = ["DurableHtmlConnector", "HtmlConnector", "Idle", "Settled"]

log = structlog.get_logger("trawl.connectors.html")

_DONE = object()


def _url_hash(url: str) -> int:
    # The seen set keeps 64-bit hashes, not strings (~80 B per URL instead of ~150, FIELD-NOTES). str's own
    # hash is 64-bit, cached on the string and per-process salted: fine for a set that lives in one process.
    return hash(url)


def _any_of(patterns: list[str]) -> re.Pattern[str] | None:
    """One regex matching where any of the patterns does (one search per link instead of one per pattern)."""
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


class HtmlConnector:
    """Crawls a source with a pool of workers sharing one in-memory frontier.

    The crawl ends when no URL is queued, being fetched, or parked: URLs whose
    host's breaker is open wait (parked) until it may let requests through
    again, up to ``breaker_requeues`` times, then end as ``skipped_breaker``.
    """

    def __init__(self, source: HtmlSource, ctx: SourceContext) -> None:
        self.source = source
        self.ctx = ctx
        self._allow = _any_of(source.follow.allow)
        self._deny = _any_of(source.follow.deny)
        self._record_re = re.compile(source.record_urls) if source.record_urls else None
        self._types = frozenset(t.lower() for t in source.content_types)
        self._seeds = list(source.urls) + list(source.start_urls)
        self._crawl = bool(source.start_urls)
        self._hosts = {urlsplit(u).netloc.lower() for u in self._seeds}
        self._seen: set[int] = set()
        self._frontier: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
        self._scheduled = 0
        self._outstanding = 0  # queued + being fetched + parked
        self._idle = asyncio.Event()

    def _follow(self, url: str) -> bool:
        rules = self.source.follow
        # Links are absolute http(s) URLs here, so the netloc is the third '/'-separated part (no urlsplit).
        if rules.same_host and url.split("/", 3)[2].lower() not in self._hosts:
            return False
        if self._allow is not None and self._allow.search(url) is None:
            return False
        return self._deny is None or self._deny.search(url) is None

    def _schedule(self, url: str, depth: int, h: int | None = None) -> None:
        h = _url_hash(url) if h is None else h
        if h in self._seen:
            return
        limit = self.ctx.settings.max_pages
        if limit is not None and self._scheduled >= limit:
            return
        self._seen.add(h)
        self._scheduled += 1
        self.ctx.stats.discovered += 1
        self._enqueue(url, depth)

    def _enqueue(self, url: str, depth: int) -> None:
        """Queue a URL seen for the first time."""
        self._outstanding += 1
        self._frontier.put_nowait((url, depth, 0))

    def _settle(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    async def fetch(self) -> AsyncIterator[Record]:
        """Yield records as pages are fetched; workers stop when nothing is left to fetch."""
        out: asyncio.Queue[object] = asyncio.Queue(maxsize=self.ctx.settings.queue_size)
        for url in self._seeds:
            self._schedule(url, 0)
        n_workers = min(
            self.ctx.settings.total_concurrency,
            (self.source.politeness.concurrency or self.ctx.settings.per_host_concurrency) * max(1, len(self._hosts)),
        )
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            while True:
                url, depth, requeues = await self._frontier.get()
                try:
                    await self._page(url, depth, out)
                except BreakerOpen as exc:
                    if requeues < self.ctx.settings.breaker_requeues:
                        # Parked, still outstanding: back in the frontier when the breaker may admit a probe.
                        loop.call_later(exc.retry_in, self._frontier.put_nowait, (url, depth, requeues + 1))
                        continue
                    await self.ctx.skipped_breaker(self.source.name, url)
                self._settle()

        async def supervise(workers: list[asyncio.Task[None]]) -> None:
            # Workers only ever end by crashing; running out of URLs is the normal end.
            if self._outstanding == 0:
                self._idle.set()
            idle = asyncio.ensure_future(self._idle.wait())
            done, _ = await asyncio.wait([idle, *workers], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not idle]
            if crashed:
                idle.cancel()
                await out.put(crashed[0].exception() or RuntimeError("html worker stopped"))
            else:
                await out.put(_DONE)

        workers = [asyncio.create_task(worker(), name=f"{self.source.name}-worker-{i}") for i in range(n_workers)]
        supervisor = asyncio.create_task(supervise(workers), name=f"{self.source.name}-supervisor")
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Record)
                yield item
        finally:
            for t in (*workers, supervisor):
                t.cancel()
            await asyncio.gather(*workers, supervisor, return_exceptions=True)

    async def _get(self, url: str, headers: dict[str, str] | None = None) -> Response | None:
        """Fetch one page under the source's politeness; None when it failed (its outcome recorded).

        BreakerOpen propagates (``park``): the crawl puts the URL back until the breaker may admit it.
        """
        src = self.source
        return await self.ctx.fetch(
            src.name,
            url,
            headers=headers,
            transport="aiohttp",
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
            robots=src.robots,
            park=True,
        )

    async def _page(self, url: str, depth: int, out: asyncio.Queue[object]) -> None:
        src = self.source
        is_record_page = self._record_re is None or bool(self._record_re.search(url))
        # Only pages we need nothing else from may come back empty (304): record pages, or every page of a list.
        conditional = src.conditional and (not self._crawl or (self._record_re is not None and is_record_page))
        resp = await self._get(url, self.ctx.conditional_headers(url) if conditional else None)
        if resp is None:
            return
        if resp.status == 304:
            await self.ctx.fetched(src.name, url, resp)
            return
        if resp.url != url:
            self._seen.add(_url_hash(resp.url))  # a redirect target is not fetched again by its own link
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in self._types:
            await self.ctx.fetched(src.name, url, resp, OutcomeKind.FILTERED, f"content-type {ctype} is not allowed")
            return
        fetched_at = utcnow()
        tree = parse_html(resp.text())
        if self._record_re is None or self._record_re.search(resp.url):
            for data in extract_items(tree, src.item_selector, src.fields):
                await out.put(make_record(src.name, self.ctx.run_id, resp.url, fetched_at, data, src.key_fields))
                self.ctx.stats.records += 1
        if self._crawl and depth < src.follow.max_depth:
            seen = self._seen
            for link in extract_links(tree, resp.url):
                h = _url_hash(link)
                if h not in seen and self._follow(link):  # most links are seen already: check that first
                    self._schedule(link, depth + 1, h)
        await self.ctx.fetched(src.name, url, resp)


@dataclass(frozen=True, slots=True)
class Settled:
    """Yielded after every record and the outcome of one frontier URL: it may be checkpointed as done."""

    key: int


@dataclass(frozen=True, slots=True)
class Idle:
    """Yielded when the crawl waits on other shards: checkpoint now, so they see this one's URLs done."""


_RECENT_MAX = 100_000  # hashes of links seen lately: saves duplicate inserts; the database is the seen set


class DurableHtmlConnector(HtmlConnector):
    """An html crawl whose frontier is PostgreSQL (:mod:`trawl.frontier`).

    A feeder claims URLs in batches into a small local queue for the workers;
    discovered links are buffered and inserted in batches. After each URL's
    records and outcome, ``fetch()`` yields a :class:`Settled` marker: the
    crawler marks it done at its next checkpoint. Memory does not grow with the
    frontier: the only per-URL state kept here is a bounded set of recent link
    hashes. The crawl ends when none of its shard's URLs is left to claim and no
    other shard that is scheduled or running has URLs left (it may still discover
    links for this one). A shard that ends while another later queues URLs for it
    is run again by the crawl flow (see ``flows.crawl``).
    """

    def __init__(self, source: HtmlSource, ctx: SourceContext, frontier: PgFrontier) -> None:
        super().__init__(source, ctx)
        self.frontier = frontier

    def _enqueue(self, url: str, depth: int) -> None:
        # ``_scheduled`` is an upper bound here: links other crawlers queued first are counted too.
        if len(self._seen) > _RECENT_MAX:
            self._seen.clear()
            self._seen.add(_url_hash(url))
        self.frontier.queue_link(url, depth)

    async def fetch(self) -> AsyncIterator[Record | Settled | Idle]:  # type: ignore[override]
        out: asyncio.Queue[object] = asyncio.Queue(maxsize=self.ctx.settings.queue_size)
        settings = self.ctx.settings
        batch = settings.frontier_batch
        frontier = self.frontier
        n_workers = min(
            settings.total_concurrency,
            (self.source.politeness.concurrency or settings.per_host_concurrency) * max(1, len(self._hosts)),
        )
        if not self.source.follow.same_host:  # links lead to other hosts: as many workers as the crawl may use
            n_workers = settings.total_concurrency
        local: asyncio.Queue[tuple[str, int, int, int]] = asyncio.Queue()
        inflight = 0  # claimed and not yet settled (parked ones included)
        settled = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def worker() -> None:
            nonlocal inflight
            while True:
                url, depth, key, requeues = await local.get()
                try:
                    await self._page(url, depth, out)
                except BreakerOpen as exc:
                    if requeues < settings.breaker_requeues:
                        loop.call_later(exc.retry_in, local.put_nowait, (url, depth, key, requeues + 1))
                        continue
                    await self.ctx.skipped_breaker(self.source.name, url)
                await out.put(Settled(key))
                inflight -= 1
                settled.set()

        async def feeder() -> None:
            nonlocal inflight
            while True:
                room = max(batch, n_workers * 2) - local.qsize()
                if frontier.queued_links >= batch or local.qsize() <= n_workers:
                    await frontier.flush()
                if local.qsize() <= n_workers:
                    claimed = await frontier.claim(room)
                    for c in claimed:
                        local.put_nowait((c.url, c.depth, c.key, 0))
                    inflight += len(claimed)
                    if claimed:
                        continue
                    if inflight == 0 and not frontier.queued_links:
                        if frontier.shards == 1 or await frontier.others_busy() == 0:
                            return
                        # Other shards are at work and may queue URLs for this one; they wait on this one's
                        # settled URLs being checkpointed done just as it waits on theirs.
                        await out.put(Idle())
                        await asyncio.sleep(0.5)
                        continue
                settled.clear()
                # asyncio.wait, not wait_for: on 3.11 wait_for may swallow a cancel that lands as the event fires.
                waiter = asyncio.ensure_future(settled.wait())
                try:
                    await asyncio.wait([waiter], timeout=0.5)
                finally:
                    waiter.cancel()

        workers = [asyncio.create_task(worker(), name=f"{self.source.name}-worker-{i}") for i in range(n_workers)]

        async def run_feeder() -> None:
            try:
                await feeder()
            except BaseException as exc:
                await out.put(exc)
                raise
            await out.put(_DONE)

        feeding = asyncio.create_task(run_feeder(), name=f"{self.source.name}-frontier")

        async def watch() -> None:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            crashed = next(iter(done))
            await out.put(crashed.exception() or RuntimeError("html worker stopped"))

        watcher = asyncio.create_task(watch(), name=f"{self.source.name}-supervisor")
        try:
            while True:
                item = await out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            for t in (*workers, feeding, watcher):
                t.cancel()
            await asyncio.gather(*workers, feeding, watcher, return_exceptions=True)
