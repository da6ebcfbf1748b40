"""`api` sources: JSON over HTTP with httpx, walked page by page."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import structlog

from trawl.config import ApiSource
from trawl.connectors.base import SourceContext, make_record
from trawl.errors import BreakerOpen, FetchError, PermanentFetchError
from trawl.extract import get_path
from trawl.fetch import Response
from trawl.records import OutcomeKind, Record, utcnow

__all__ = ["ApiConnector", "next_link"]

log = structlog.get_logger("trawl.connectors.api")

_LINK_PART = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")


def next_link(header: str | None, base: str) -> str | None:
    """The ``rel="next"`` target of an RFC 8288 Link header, made absolute."""
    if not header:
        return None
    for m in _LINK_PART.finditer(header):
        params = m.group(2)
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "rel" and "next" in v.strip().strip('"').lower().split():
                return urljoin(base, str(m.group(1)).strip())
    return None


def _with_params(url: str, params: Mapping[str, Any]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for k, v in params.items():
        query[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return urlunsplit(parts._replace(query=urlencode(query)))


class ApiConnector:
    """Walks an API's pages; a failed page ends the source (pagination cannot go on)."""

    def __init__(self, source: ApiSource, ctx: SourceContext) -> None:
        self.source = source
        self.ctx = ctx

    def _first_url(self) -> str:
        p = self.source.pagination
        params: dict[str, Any] = dict(self.source.params)
        if p.type == "page":
            params[p.param or "page"] = p.start if p.start is not None else 1
        elif p.type == "offset":
            params[p.param or "offset"] = p.start or 0
        if p.size and (p.size_param or p.type == "offset"):
            params[p.size_param or "limit"] = p.size
        return _with_params(self.source.url, params)

    async def fetch(self) -> AsyncIterator[Record]:
        """Yield every item of every page, following the configured pagination."""
        src, p = self.source, self.source.pagination
        url: str | None = self._first_url()
        page_no = p.start if p.start is not None else (1 if p.type == "page" else 0)
        pages = 0
        limit = self.ctx.settings.max_pages
        while url is not None and pages < p.max_pages and (limit is None or pages < limit):
            resp = await self._get(url)
            if resp is None:
                raise FetchError(f"page {url} failed; pagination stopped", url=url)
            if resp.status == 304:  # only asked for when there is no pagination: nothing changed
                await self.ctx.fetched(src.name, url, resp)
                return
            pages += 1
            try:
                body = resp.json()
                items = get_path(body, src.items_path)
                if items is None:
                    items = []
                if not isinstance(items, list):
                    raise PermanentFetchError(
                        f"items_path {src.items_path!r} is a {type(items).__name__}, not a list", url=url
                    )
            except PermanentFetchError as exc:
                await self.ctx.fetched(src.name, url, resp, OutcomeKind.FAILED, str(exc))
                raise
            fetched_at = utcnow()
            for item in items:
                data = dict(item) if isinstance(item, Mapping) else {"value": item}
                for name, spec in src.fields.items():
                    if spec.path and spec.path != name:
                        data[name] = get_path(item, spec.path)
                self.ctx.stats.records += 1
                yield make_record(src.name, self.ctx.run_id, resp.url, fetched_at, data, src.key_fields)
            await self.ctx.fetched(src.name, url, resp)
            url = self._next(url, resp, body, items, page_no)
            if p.type == "page":
                page_no += 1
            elif p.type == "offset":
                page_no += len(items)

    async def _get(self, url: str) -> Response | None:
        """One page; while the host's breaker is open, wait for it (pagination cannot skip ahead)."""
        src = self.source
        for waited in range(self.ctx.settings.breaker_requeues + 1):
            try:
                return await self.ctx.fetch(
                    src.name,
                    url,
                    transport="httpx",
                    # Conditional only without pagination: a 304 carries no next page.
                    headers=self.ctx.conditional_headers(url, src.headers)
                    if src.pagination.type == "none"
                    else src.headers,
                    concurrency=src.politeness.concurrency,
                    delay=src.politeness.delay,
                    robots=src.robots,
                    adaptive=src.politeness.adaptive,
                    park=waited < self.ctx.settings.breaker_requeues,
                    origins=src.header_origins,  # a next page or redirect elsewhere goes without them
                )
            except BreakerOpen as exc:
                await asyncio.sleep(exc.retry_in)
        return None

    def _next(self, url: str, resp: Response, body: Any, items: list[Any], page_no: int) -> str | None:
        p = self.source.pagination
        match p.type:
            case "none":
                return None
            case "page":
                return _with_params(url, {p.param or "page": page_no + 1}) if items else None
            case "offset":
                if not items or (p.size and len(items) < p.size):
                    return None
                return _with_params(url, {p.param or "offset": page_no + len(items)})
            case "cursor":
                cursor = get_path(body, p.cursor_path)
                if cursor in (None, "") or not items:
                    return None
                return _with_params(url, {p.param or "cursor": cursor})
            case "next_url":
                nxt = get_path(body, p.next_path)
                return urljoin(resp.url, str(nxt)) if nxt else None
            case "link_header":
                return next_link(resp.headers.get("link"), resp.url)
        return None
