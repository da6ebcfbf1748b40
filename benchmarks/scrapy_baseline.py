"""The Scrapy baseline: the same crawl as a plain spider, run the way people run one, and tuned.

    python -m scrapy runspider benchmarks/scrapy_baseline.py -O DIR/items.jsonl \\
        -a start_url=http://127.0.0.1:PORT/index.html -a out=DIR -a allow=REGEX -a record=REGEX [-a tuned=1]

Scrapy's defaults except what the crawl needs: 64 concurrent requests (also
per domain, as trawl's per-host politeness is opened to 64), no AutoThrottle,
no download delay, robots.txt obeyed (trawl always obeys it, so all three
contenders read it), logs at INFO, items exported as JSON lines by the feed
exporter (``-O``). Plain, none of the FIELD-NOTES tuning: this is the
baseline as users have it.

``-a tuned=1`` (the runner's ``scrapy-tuned``) is the same spider as someone
who profiled it would write it: ``CONCURRENT_ITEMS=10`` (Scrapy starts that many
tasks per response's callback output, 100 by default) and the spider's own set
of URLs already requested, checked before a ``Request`` is built, so a link
seen before (most of a page's) costs a set lookup instead of a ``Request``, its
fingerprint and the dupefilter. FIELD-NOTES measured the pair at 3x the plain spider's
pages/s; it is the fairest Scrapy to hold trawl against.

One correctness fix every real spider needs: ``response.follow_all`` raises on
``mailto:`` links and aborts the callback, so non-http links are dropped first.

Writes ``DIR/report.json`` from ``closed()``: timing of the crawl (from the
first start request, so without interpreter start-up), pages parsed, the
process's peak RSS, Scrapy's stats.
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import scrapy
from scrapy.crawler import Crawler
from scrapy.http import Response

from benchmarks.rss import peak_rss_mb

__all__ = ["BenchSpider"]

_NOT_HTTP = ("#", "mailto:", "javascript:", "tel:", "data:")
TUNED_SETTINGS = {"CONCURRENT_ITEMS": 10}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class BenchSpider(scrapy.Spider):
    """Follows the allowed links of every page; yields the four fields of every product page."""

    name = "bench"
    custom_settings = {
        "CONCURRENT_REQUESTS": 64,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 64,
        "DOWNLOAD_DELAY": 0,
        "AUTOTHROTTLE_ENABLED": False,
        "ROBOTSTXT_OBEY": True,
        "LOG_LEVEL": "INFO",
    }

    @classmethod
    def from_crawler(cls, crawler: Crawler, *args: Any, **kwargs: Any) -> BenchSpider:
        spider: BenchSpider = super().from_crawler(crawler, *args, **kwargs)
        if spider.tuned:  # spider arguments come after custom_settings; Scrapy >= 2.11 applies these still
            crawler.settings.setdict(TUNED_SETTINGS, priority="spider")
        return spider

    def __init__(self, start_url: str, out: str, allow: str, record: str, tuned: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tuned = tuned not in ("", "0")
        self.start_urls = start_url.split(",")
        # tuned: every URL requested so far, the start URLs included (Scrapy's start requests skip the dupefilter).
        self.requested: set[str] = {u.partition("#")[0] for u in self.start_urls}
        self.allowed_domains = sorted({urlsplit(u).hostname or "" for u in self.start_urls})
        self.out = Path(out)
        self.allow = re.compile(allow)
        self.record = re.compile(record)
        self.pages = 0
        self.seen_pages: dict[str, set[int]] = {}  # instrumentation only: unique pages parsed per origin
        self.t0 = self.c0 = 0.0

    async def start(self) -> AsyncIterator[Any]:
        self.t0, self.c0 = time.perf_counter(), _cpu()
        async for item_or_request in super().start():
            yield item_or_request

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        self.pages += 1
        parts = urlsplit(response.url)
        self.seen_pages.setdefault(f"{parts.scheme}://{parts.netloc}", set()).add(hash(response.url))
        if self.record.search(response.url):
            yield {
                "url": response.url,
                "name": (response.css("h1.name::text").get() or "").strip() or None,
                "sku": (response.css("span.sku::text").get() or "").strip() or None,
                "price": response.css("p.price::attr(data-amount)").get(),
                "category": (response.css("span.category::text").get() or "").strip() or None,
            }
        links = []
        requested = self.requested if self.tuned else None
        for href in response.css("a::attr(href)").getall():
            href = href.strip()
            if not href or href.startswith(_NOT_HTTP):
                continue
            url = response.urljoin(href).partition("#")[0]
            if requested is not None:
                if url in requested:
                    continue
                requested.add(url)
            if self.allow.search(url):
                links.append(url)
        yield from response.follow_all(links, callback=self.parse)

    def closed(self, reason: str) -> None:
        assert self.crawler.stats is not None
        report = {
            "contender": "scrapy-tuned" if self.tuned else "scrapy",
            "settings": {k: self.crawler.settings.getint(k) for k in ("CONCURRENT_ITEMS", "CONCURRENT_REQUESTS")},
            "peak_rss_mb": peak_rss_mb(),
            "crawl_seconds": time.perf_counter() - self.t0,
            "crawl_cpu_s": _cpu() - self.c0,
            "reason": reason,
            "pages": self.pages,
            "pages_by_origin": {origin: len(s) for origin, s in self.seen_pages.items()},
            "stats": self.crawler.stats.get_stats(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_bytes(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2))
