"""`api` sources: JSON over HTTP with httpx, walked page by page.

A page is one request (GET, or POST with a JSON body) through the one request
path. The page number, offset or cursor goes in the query or the body; an
incremental window (:mod:`trawl.incremental`) in a query parameter or wherever
``{incremental.start_value}`` is written; credentials from
:class:`~trawl.connectors.auth.Authenticator`. With ``details`` each listed item
gets one more request, its detail resource merged in.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import orjson
import structlog

from trawl.config import ApiSource
from trawl.connectors.auth import Authenticator
from trawl.connectors.base import SourceContext, make_record
from trawl.errors import BreakerOpen, FetchError, PermanentFetchError
from trawl.extract import get_path
from trawl.fetch import Response
from trawl.incremental import CursorWindow
from trawl.records import OutcomeKind, Record, utcnow

__all__ = ["ApiConnector", "next_link", "parse_body", "select_items"]

log = structlog.get_logger("trawl.connectors.api")

_LINK_PART = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")
_JSONL_TYPES = (
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
    "application/jsonlines",
)
_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


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


def parse_body(resp: Response, fmt: str) -> tuple[Any, bool]:
    """The response as JSON: one document, or (JSON Lines) the list of its lines' documents; and which it was."""
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if fmt == "json" or (fmt == "auto" and ctype not in _JSONL_TYPES):
        return resp.json(), False
    docs = []
    for n, line in enumerate(resp.body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise PermanentFetchError(
                f"invalid JSON on line {n} of a JSON Lines body: {exc}", url=resp.url, status=resp.status
            ) from None
    return docs, True


def select_items(body: Any, path: str | None, url: str) -> list[Any]:
    """The items at ``path`` (dotted; a ``*`` step takes every element of a list or value of an object, and
    the lists found are flattened). Without a ``*``, what the path finds must be a list (missing: none)."""
    if not path or "*" not in path.split("."):
        items = get_path(body, path)
        if items is None:
            return []
        if not isinstance(items, list):
            raise PermanentFetchError(f"items_path {path!r} is a {type(items).__name__}, not a list", url=url)
        return items
    nodes = [body]
    for step in path.split("."):
        found: list[Any] = []
        for node in nodes:
            if step == "*":
                found.extend(node if isinstance(node, list) else node.values() if isinstance(node, Mapping) else [])
            else:
                value = get_path(node, step)
                if value is not None:
                    found.append(value)
        nodes = found
    out: list[Any] = []
    for node in nodes:
        out.extend(node) if isinstance(node, list) else out.append(node)
    return out


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a dotted path of a JSON object, making the objects on the way."""
    *head, last = path.split(".")
    for step in head:
        nxt = doc.get(step)
        if not isinstance(nxt, dict):
            nxt = doc[step] = {}
        doc = nxt
    doc[last] = value


def _fill(node: Any, values: Mapping[str, Any]) -> Any:
    """``{incremental.start_value}`` (and the others in ``values``) filled into every string of a JSON value.

    A string that is only a template takes the value as it is (a number stays a number, none is null)."""
    if isinstance(node, str):
        whole = _TEMPLATE.fullmatch(node)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _TEMPLATE.sub(
            lambda m: "" if values.get(m.group(1), m.group(0)) is None else str(values.get(m.group(1), m.group(0))),
            node,
        )
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    return node


class ApiConnector:
    """Walks an API's pages; a failed page ends the source (pagination cannot go on)."""

    def __init__(self, source: ApiSource, ctx: SourceContext) -> None:
        self.source = source
        self.ctx = ctx
        self._auth: Authenticator | None = None
        self._window: CursorWindow | None = None
        self._detail_failures = 0

    def _incremental(self) -> CursorWindow | None:
        inc = self.source.incremental
        if inc is None:
            return None
        if self.ctx.incremental is not None:
            return self.ctx.incremental
        # No stored state handed in (no database, `trawl try`, a test): the configured window.
        return CursorWindow(inc.cursor_path, inc.initial_value, inc.end_value, None, inc.end_value is None)

    def _template_values(self) -> dict[str, Any]:
        w = self._window
        return {"incremental.start_value": w.start_value, "incremental.end_value": w.end_value} if w else {}

    def _first_request(self) -> tuple[str, Any]:
        """The first page's URL and JSON body (None: no body)."""
        src, p = self.source, self.source.pagination
        values = self._template_values()
        params: dict[str, Any] = {}
        for k, v in _fill(dict(src.params), values).items():
            if v is not None:  # `{incremental.start_value}` with no value yet: not sent
                params[k] = v
        body = copy.deepcopy(_fill(src.body, values)) if src.body is not None else None
        inc, w = src.incremental, self._window
        if inc is not None and w is not None:
            if inc.start_param and w.start_value is not None:
                params[inc.start_param] = w.start_value
            if inc.end_param and w.end_value is not None:
                params[inc.end_param] = w.end_value
        first = p.start if p.start is not None else (1 if p.type == "page" else 0)
        if p.type in ("page", "offset"):
            if p.body_path and isinstance(body, dict):
                _set_path(body, p.body_path, first)
            else:
                params[p.param or ("page" if p.type == "page" else "offset")] = first
        if p.size:
            if p.size_body_path and isinstance(body, dict):
                _set_path(body, p.size_body_path, p.size)
            elif p.size_param or p.type == "offset":
                params[p.size_param or "limit"] = p.size
        url = _fill(src.url, values)
        return _with_params(url, params) if params else url, body

    async def fetch(self) -> AsyncIterator[Record]:
        """Yield every item of every page, following the configured pagination."""
        src, p = self.source, self.source.pagination
        self._auth = Authenticator(
            src.auth,
            self.ctx.fetcher,
            source=src.name,
            origins=src.header_origins,
            concurrency=src.politeness.concurrency,
            delay=src.politeness.delay,
        )
        self._window = self._incremental()
        if self._window is not None:
            self.ctx.stats.incremental = self._window.summary()
        url: str | None
        url, body = self._first_request()
        page_no = p.start if p.start is not None else (1 if p.type == "page" else 0)
        pages = 0
        limit = self.ctx.settings.max_pages
        while url is not None and pages < p.max_pages and (limit is None or pages < limit):
            resp = await self._get(url, body)
            if resp is None:
                raise FetchError(f"page {url} failed; pagination stopped", url=url)
            if resp.status == 304:  # only asked for when there is no pagination: nothing changed
                await self.ctx.fetched(src.name, url, resp)
                return
            pages += 1
            try:
                doc, lines = parse_body(resp, src.format)
                if lines:
                    items = [i for d in doc for i in (select_items(d, src.items_path, url) if src.items_path else [d])]
                else:
                    items = select_items(doc, src.items_path, url)
            except PermanentFetchError as exc:
                await self.ctx.fetched(src.name, url, resp, OutcomeKind.FAILED, str(exc))
                raise
            fetched_at = utcnow()
            rows: list[dict[str, Any] | None] = [self._row(item) for item in items]
            if src.details is not None:
                await self.ctx.fetched(src.name, url, resp)  # the list page's outcome first, then its items'
                rows = await self._with_details(rows)
            for row in rows:
                if row is None:
                    continue
                if self._window is not None:
                    self._window.observe(get_path(row, self._window.cursor_path))
                self.ctx.stats.records += 1
                yield make_record(src.name, self.ctx.run_id, resp.url, fetched_at, row, src.key_fields)
            if self._window is not None:
                self.ctx.stats.incremental = self._window.summary()
            if src.details is None:
                await self.ctx.fetched(src.name, url, resp)
            url, body = self._next(url, body, resp, doc, items, page_no)
            if p.type == "page":
                page_no += 1
            elif p.type == "offset":
                page_no += len(items)
        if self._detail_failures:
            raise FetchError(
                f"{self._detail_failures} detail request(s) failed (their items were not staged)", url=src.url
            )

    def _row(self, item: Any) -> dict[str, Any]:
        data = dict(item) if isinstance(item, Mapping) else {"value": item}
        for name, spec in self.source.fields.items():
            if spec.path and spec.path != name:
                data[name] = get_path(item, spec.path)
        return data

    async def _with_details(self, rows: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
        """Each row with its detail resource (None where that failed), fetched side by side under the host's limits."""
        limit = asyncio.Semaphore(self.source.politeness.concurrency or self.ctx.settings.per_host_concurrency)

        async def one(row: dict[str, Any] | None) -> dict[str, Any] | None:
            if row is None:
                return None
            async with limit:
                return await self._detail(row)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    async def _detail(self, row: dict[str, Any]) -> dict[str, Any] | None:
        src, spec = self.source, self.source.details
        assert spec is not None
        missing = [m.group(1) for m in _TEMPLATE.finditer(spec.url) if get_path(row, m.group(1)) in (None, "")]
        if missing:
            log.warning("item has no value for the details URL", missing=missing, template=spec.url)
            self._detail_failures += 1
            return None
        path = _TEMPLATE.sub(lambda m: quote(str(get_path(row, m.group(1))), safe=""), spec.url)
        url = urljoin(src.url, path)
        resp = await self._get(url, None, method="GET", park=False)
        if resp is None:
            self._detail_failures += 1
            return None
        try:
            detail = select_detail(resp, spec.items_path)
        except PermanentFetchError as exc:
            await self.ctx.fetched(src.name, url, resp, OutcomeKind.FAILED, str(exc))
            self._detail_failures += 1
            return None
        await self.ctx.fetched(src.name, url, resp)
        if spec.fields is not None:
            detail = {k: detail[k] for k in spec.fields if k in detail}
        return {**row, **detail} if spec.merge else detail

    async def _get(self, url: str, body: Any, *, method: str | None = None, park: bool = True) -> Response | None:
        """One request; for a page, while the host's breaker is open, wait for it (pagination cannot skip ahead)."""
        src, auth = self.source, self._auth
        assert auth is not None
        method = method or src.method
        content = orjson.dumps(body) if body is not None and method == "POST" else None
        base = dict(src.headers)
        if content is not None:
            base.setdefault("Content-Type", "application/json")
        # Conditional only without pagination: a 304 carries no next page.
        if src.pagination.type == "none" and method == "GET" and src.details is None:
            base = self.ctx.conditional_headers(url, base)
        query = auth.query(url)
        target = _with_params(url, query) if query else url
        requeues = self.ctx.settings.breaker_requeues
        for waited in range(requeues + 1):
            try:
                headers = {**base, **await auth.headers()}
            except FetchError as exc:  # the token endpoint failed: this request cannot go
                await self.ctx.failed(src.name, url, exc)
                return None
            try:
                return await self.ctx.fetch(
                    src.name,
                    target,
                    transport="httpx",
                    headers=headers,
                    concurrency=src.politeness.concurrency,
                    delay=src.politeness.delay,
                    robots=src.robots,
                    adaptive=src.politeness.adaptive,
                    park=park and waited < requeues,
                    origins=src.header_origins,  # a next page or redirect elsewhere goes without them
                    method=method,
                    body=content,
                    reauth=auth.refresh if auth.oauth is not None else None,
                    proxies=src.proxies,
                    proxy_rotation=src.proxy_rotation,
                )
            except BreakerOpen as exc:
                await asyncio.sleep(exc.retry_in)
        return None

    def _next(
        self, url: str, body: Any, resp: Response, doc: Any, items: list[Any], page_no: int
    ) -> tuple[str | None, Any]:
        p = self.source.pagination

        def to(value: Any, default_param: str) -> tuple[str | None, Any]:
            if p.body_path and isinstance(body, dict):
                nxt = copy.deepcopy(body)
                _set_path(nxt, p.body_path, value)
                return url, nxt
            return _with_params(url, {p.param or default_param: value}), body

        match p.type:
            case "page":
                return to(page_no + 1, "page") if items else (None, body)
            case "offset":
                if not items or (p.size and len(items) < p.size):
                    return None, body
                return to(page_no + len(items), "offset")
            case "cursor":
                cursor = get_path(doc, p.cursor_path)
                if cursor in (None, "") or not items:
                    return None, body
                return to(cursor, "cursor")
            case "next_url":
                nxt = get_path(doc, p.next_path)
                return (urljoin(resp.url, str(nxt)) if nxt else None), body
            case "link_header":
                return next_link(resp.headers.get("link"), resp.url), body
        return None, body


def select_detail(resp: Response, path: str | None) -> dict[str, Any]:
    """The object at ``path`` of a detail response; PermanentFetchError when it is not one."""
    detail = get_path(resp.json(), path)
    if not isinstance(detail, Mapping):
        where = f"items_path {path!r}" if path else "the body"
        raise PermanentFetchError(
            f"detail {where} is a {type(detail).__name__}, not an object", url=resp.url, status=resp.status
        )
    return dict(detail)
