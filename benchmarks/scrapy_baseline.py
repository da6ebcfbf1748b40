"""The Scrapy baseline: the same crawl as a plain spider, run the way people run one.

    python -m scrapy runspider benchmarks/scrapy_baseline.py -O DIR/items.jsonl \\
        -a start_url=http://127.0.0.1:PORT/index.html -a out=DIR -a allow=REGEX -a record=REGEX

Scrapy's defaults except what the crawl needs: 64 concurrent requests (also
per domain, as trawl's per-host politeness is opened to 64), no AutoThrottle,
no download delay, robots.txt obeyed (trawl always obeys it, so all three
contenders read it), logs at INFO, items exported as JSON lines by the feed
exporter (``-O``). None of the FIELD-NOTES tuning (``CONCURRENT_ITEMS``, a
seen-set before yielding requests): this is the baseline as users have it.

One correctness fix every real spider needs: ``response.follow_all`` raises on
``mailto:`` links and aborts the callback, so non-http links are dropped first.

Writes ``DIR/report.json`` from ``closed()``: timing of the crawl (from the
first start request, so without interpreter start-up), pages parsed, Scrapy's
stats.
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
from scrapy.http import Response

__all__ = ["BenchSpider"]

_NOT_HTTP = ("#", "mailto:", "javascript:", "tel:", "data:")


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

    def __init__(self, start_url: str, out: str, allow: str, record: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = start_url.split(",")
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
        for href in response.css("a::attr(href)").getall():
            href = href.strip()
            if not href or href.startswith(_NOT_HTTP):
                continue
            url = response.urljoin(href).partition("#")[0]
            if self.allow.search(url):
                links.append(url)
        yield from response.follow_all(links, callback=self.parse)

    def closed(self, reason: str) -> None:
        assert self.crawler.stats is not None
        report = {
            "contender": "scrapy",
            "crawl_seconds": time.perf_counter() - self.t0,
            "crawl_cpu_s": _cpu() - self.c0,
            "reason": reason,
            "pages": self.pages,
            "pages_by_origin": {origin: len(s) for origin, s in self.seen_pages.items()},
            "stats": self.crawler.stats.get_stats(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_bytes(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2))
