"""Log in to the demo shop (a form POST carrying its CSRF token), then scrape the account's order pages.

    scrapy crawl orders -a base_url=http://127.0.0.1:8080 -a username=demo -a password=... -O orders.jsonl

The login POST sends the form's hidden ``csrf_token`` back with the credentials;
Scrapy's cookie jar carries the CSRF cookie to the POST and the session cookie
to the order pages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.exceptions import CloseSpider
from scrapy.http import Response

__all__ = ["OrdersSpider"]


class OrdersSpider(scrapy.Spider):
    """One item per order row, across the order list's pages."""

    name = "orders"

    def __init__(
        self, base_url: str | None = None, username: str = "demo", password: str = "", *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        base = (base_url or os.environ.get("TRAWL_DEMO_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.start_urls = [f"{base}/account/login"]
        self.username = username
        self.password = password or os.environ.get("TRAWL_DEMO_PASSWORD", "")

    def parse(self, response: Response, **kwargs: Any) -> Iterator[scrapy.Request]:
        form = response.css("form#login")
        token = form.css("input[name=csrf_token]::attr(value)").get()
        if not token:
            raise CloseSpider("no CSRF token in the login form")
        yield scrapy.FormRequest(
            response.urljoin(form.attrib.get("action", response.url)),
            formdata={"csrf_token": token, "username": self.username, "password": self.password},
            callback=self.after_login,
            meta={"handle_httpstatus_list": [403]},  # a refused login reaches after_login, which says so
        )

    def after_login(self, response: Response) -> Iterator[Any]:
        if not response.css("table.orders"):
            raise CloseSpider("login failed")
        yield from self.parse_orders(response)

    def parse_orders(self, response: Response) -> Iterator[Any]:
        for row in response.css("tr.order"):
            yield {
                "number": row.css("td.number::text").get(),
                "placed": row.css("td.placed::text").get(),
                "status": row.css("td.status::text").get(),
                "total": float(row.css("td.total::attr(data-amount)").get() or "nan"),
                "items": int(row.css("td.items::text").get() or 0),
            }
        next_page = response.css("a.next::attr(href)").get()
        if next_page:
            yield response.follow(next_page, callback=self.parse_orders)
