"""``trawl try``: one page through the crawl's own path, extracted, without Prefect, staging or a database.

The page goes through the connector's own handling of one URL (the same
``_page`` the crawl's workers run): network guard, robots.txt, the source's
headers and credentials scoping, its render mode, its content types, record URLs,
field rules and follow rules. What the crawl would stage and record is collected
instead: the records, the links the follow rules keep (queued, never fetched),
and the one outcome the URL gets. ``--from-archive`` takes the page from a run's
archive instead of the network (:mod:`trawl.reextract`'s replay).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, cast

from trawl.archive import archived_pages
from trawl.config import AnySource, BrowserSource, HtmlSource
from trawl.connectors.base import SourceContext, SourceStats
from trawl.connectors.browser import BrowserConnector
from trawl.connectors.html import HtmlConnector
from trawl.errors import BreakerOpen, ConfigError
from trawl.fetch import Fetcher
from trawl.frontier.base import Frontier
from trawl.masking import mask_url
from trawl.records import Outcome, OutcomeKind, Record
from trawl.reextract import LinkCollector, check_reextractable, read_archive, replay
from trawl.settings import Settings
from trawl.staging import Stager

__all__ = ["Trial", "try_archived", "try_url"]


@dataclass(slots=True)
class Trial:
    """What one URL would give the crawl: its outcome, records (envelopes) and the links followed from it."""

    source: str
    kind: str
    url: str
    outcome: str
    http_status: int | None = None
    error: str | None = None
    attempts: int = 0
    elapsed_ms: int = 0
    via: str = "http"
    """``http``, ``browser``, ``http+browser`` (a browser source), or ``archive`` (``--from-archive``)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    archive: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _html_like(source: AnySource) -> HtmlSource:
    if not isinstance(source, HtmlSource):
        raise ConfigError(
            f"source {source.name}: `trawl try` takes html and browser sources (kind {source.kind!r} has no single "
            "page to try: run it with `trawl crawl --source`)"
        )
    return source


def _trial(source: HtmlSource, url: str, outcomes: list[Outcome], records: list[Record], links: LinkCollector) -> Trial:
    kind = "browser" if isinstance(source, BrowserSource) else "html"
    trial = Trial(source.name, kind, mask_url(url), "none")
    if outcomes:
        o = outcomes[-1]
        trial.outcome, trial.http_status, trial.error = o.outcome.value, o.http_status, o.error
        trial.attempts, trial.elapsed_ms = o.attempts, o.elapsed_ms
    trial.records = [r.envelope() for r in records]
    trial.links = [mask_url(link) for link in links.links]
    trial.archive = dict(records[0].archived) if records and records[0].archived else None
    return trial


async def try_url(source: AnySource, url: str, settings: Settings) -> Trial:
    """Fetch and extract one URL as the crawl would (guard, robots.txt, headers, render mode); stage nothing."""
    src = _html_like(source)
    outcomes: list[Outcome] = []

    async def emit(outcome: Outcome) -> None:
        outcomes.append(outcome)

    links = LinkCollector(keep=True)
    out: asyncio.Queue[object] = asyncio.Queue()
    stats = SourceStats()
    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("try", settings, fetcher, emit, stats=stats)
        frontier = cast(Frontier, links)
        connector = (
            BrowserConnector(src, ctx, frontier)
            if isinstance(src, BrowserSource)
            else HtmlConnector(src, ctx, frontier)
        )
        try:
            await connector._page(url, 0, out)
        except BreakerOpen:
            await ctx.skipped_breaker(src.name, url)
    records = [item for item in _drain(out) if isinstance(item, Record)]
    trial = _trial(src, url, outcomes, records, links)
    if stats.render:
        trial.via = "+".join(k for k in ("http+browser", "browser", "http") if stats.render.get(k))
    return trial


def _drain(out: asyncio.Queue[object]) -> list[object]:
    items = []
    while not out.empty():
        items.append(out.get_nowait())
    return items


async def try_archived(source: AnySource, url: str, run_id: str, stager: Stager, settings: Settings) -> Trial:
    """The same for a page of run ``run_id``'s archive: nothing is fetched (the latest response for ``url``)."""
    src = _html_like(source)
    found = [m for m in await stager.manifests("raw") if m.run_id == run_id and m.source == src.name]
    if not found:
        raise ConfigError(f"source {src.name}: no committed run {run_id} in {stager.uri}")
    manifest = found[0]
    check_reextractable(src, manifest)
    wanted = {url, mask_url(url)}
    page = None
    for uri, data in await read_archive(stager, manifest):
        for candidate in await asyncio.to_thread(lambda u=uri, d=data: list(archived_pages(u, d))):  # type: ignore[misc]
            if candidate.url in wanted:
                page = candidate
    if page is None:
        raise ConfigError(f"source {src.name}: {mask_url(url)} is not in the archive of run {run_id}")
    outcomes: list[Outcome] = []

    async def emit(outcome: Outcome) -> None:
        outcomes.append(outcome)

    links = LinkCollector(keep=True)
    started = time.monotonic()
    offline = settings.model_copy(update={"allowed_networks": []})
    async with Fetcher(offline) as fetcher:
        ctx = SourceContext("try", offline, fetcher, emit, stats=SourceStats())
        records = await replay(src, [page], ctx, links)
    trial = _trial(src, url, outcomes, records, links)
    trial.via, trial.elapsed_ms = "archive", int((time.monotonic() - started) * 1000)
    trial.archive = page.pointer
    if trial.outcome == OutcomeKind.FETCHED:
        trial.http_status = page.status
    return trial
