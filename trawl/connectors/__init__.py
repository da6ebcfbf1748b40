"""Source kinds: each turns one configured source into a stream of records."""

from __future__ import annotations

from trawl.config import AnySource, BrowserSource, HtmlSource, SpiderSource
from trawl.connectors.api import ApiConnector
from trawl.connectors.base import Connector, SourceContext, SourceStats, make_record, record_key
from trawl.connectors.html import HtmlConnector
from trawl.frontier.base import Frontier

__all__ = [
    "ApiConnector",
    "Connector",
    "HtmlConnector",
    "SourceContext",
    "SourceStats",
    "connector_for",
    "make_record",
    "record_key",
]


def connector_for(source: AnySource, ctx: SourceContext, frontier: Frontier | None = None) -> Connector:
    """The connector that runs a source of this kind, on the crawl's frontier (api sources page on their own)."""
    if isinstance(source, SpiderSource):
        from trawl.connectors.spider import SpiderConnector  # Scrapy is imported only when needed

        return SpiderConnector(source, ctx, frontier)
    if isinstance(source, BrowserSource):
        from trawl.connectors.browser import BrowserConnector  # Playwright is imported only when needed

        return BrowserConnector(source, ctx, frontier)
    if isinstance(source, HtmlSource):
        return HtmlConnector(source, ctx, frontier)
    return ApiConnector(source, ctx)
