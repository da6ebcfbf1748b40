"""A link-following crawl of the demo shop: catalogue pages, then every product page they link to.

    scrapy crawl books -a base_url=http://127.0.0.1:8080 -O products.jsonl

As a trawl source: ``kind: spider``, ``spider: spiders.books:BooksSpider``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from scrapy.http import Response
from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule

__all__ = ["BooksSpider"]


def _text(response: Response, css: str) -> str | None:
    return (response.css(css).get() or "").strip() or None


class BooksSpider(CrawlSpider):
    """Follows the catalogue's pager and its product links; one item per product page."""

    name = "books"
    rules = (
        Rule(LinkExtractor(allow=r"/catalogue/page/\d+$", restrict_css="nav.pager")),
        Rule(LinkExtractor(allow=r"/products/\d+$", restrict_css="ul.products"), callback="parse_product"),
    )

    def __init__(self, base_url: str | None = None, *args: Any, **kwargs: Any) -> None:
        base = (base_url or os.environ.get("TRAWL_DEMO_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.start_urls = [f"{base}/catalogue/page/1"]
        super().__init__(*args, **kwargs)

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        price = response.css("p.price::attr(data-amount)").get()
        rating = response.css("span.rating::attr(data-stars)").get()
        yield {
            "url": response.url,
            "sku": _text(response, "span.sku::text"),
            "name": _text(response, "h1.name::text"),
            "price": float(price) if price else None,
            "category": _text(response, "span.category::text"),
            "rating": int(rating) if rating else None,
            "tags": response.css("li.tag::text").getall(),
        }
