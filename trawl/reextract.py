"""Re-extraction: a run's archived pages through a source's *current* rules, staged as a new run.

Nothing is fetched: the pages come from the run's WARC archive (:mod:`trawl.archive`)
and go through the same handling as a crawled response
(:meth:`trawl.connectors.html.HtmlConnector.replay`): content-type filter, record
URLs, field rules and follow rules. The records keep the archived response's
time (``WARC-Date``) as their ``fetched_at`` and point at the same archived
response, so the loader writes only rows whose content changed (same time, new
content: ``updated``; same content: ``unchanged``). The Fetcher handed to the
connector refuses every network (``allowed_networks=[]``): a page that wanted
one would fail rather than fetch.

The new run's records manifest says ``reextracted_from`` and lists the archive
files its records point into (the original run's). Its outcomes stream stays
empty: no URL was requested.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from trawl.archive import ArchivedPage, archived_pages
from trawl.config import AnySource, BrowserSource, HtmlSource
from trawl.connectors.base import SourceContext, SourceStats
from trawl.connectors.html import HtmlConnector
from trawl.crawler import SourceResult, source_schema
from trawl.errors import ConfigError, StagingError
from trawl.fetch import Fetcher, Response
from trawl.frontier.base import Frontier
from trawl.records import Outcome, Record, utcnow
from trawl.settings import Settings
from trawl.staging import Manifest, Stager

__all__ = ["LinkCollector", "as_response", "check_reextractable", "read_archive", "reextract_source", "replay"]

log = structlog.get_logger("trawl.reextract")


@dataclass(slots=True)
class LinkCollector:
    """A frontier that fetches nothing: it only keeps the links the follow rules let through."""

    keep: bool = False
    links: list[str] = field(default_factory=list)
    count: int = 0
    name = "replay"
    resumable = False
    commits = True
    recent_max: int | None = None

    def add(self, url: str, depth: int) -> None:
        self.count += 1
        if self.keep:
            self.links.append(url)


def check_reextractable(source: AnySource, manifest: Manifest) -> HtmlSource:
    """The source if its archive can be re-extracted; ConfigError naming the source and run otherwise."""
    if not isinstance(source, HtmlSource):  # BrowserSource is one too
        raise ConfigError(
            f"source {source.name}: kind {source.kind!r} cannot be re-extracted (html and browser sources can; "
            "a spider's callbacks or an API's pagination are not replayed)"
        )
    if not manifest.archive:
        raise ConfigError(
            f"source {source.name}: run {manifest.run_id} has no page archive (`archive: false`, or staged "
            "before the archive existed); nothing to re-extract"
        )
    return source


def as_response(page: ArchivedPage) -> Response:
    """An archived page as the connector sees a fetched one (a browser page: its rendered DOM)."""
    headers = dict(page.headers)
    if page.rendered is not None:
        headers["content-type"] = "text/html; charset=utf-8"
    return Response(
        page.url,
        page.status,
        headers,
        page.rendered if page.rendered is not None else page.body,
        0,
        0,
        archived=page.pointer,
        archived_at=page.fetched_at,
    )


async def read_archive(stager: Stager, manifest: Manifest) -> list[tuple[str, bytes]]:
    """Every archive part of a run, checked against its manifest's sha256."""
    out = []
    for part in manifest.archive:
        data = await stager.read_bytes(part.uri)
        digest = await asyncio.to_thread(lambda d=data: hashlib.sha256(d).hexdigest())  # type: ignore[misc]
        if digest != part.sha256:
            raise StagingError(f"{part.uri}: sha256 {digest} does not match the manifest's {part.sha256}")
        out.append((part.uri, data))
    return out


def _offline(settings: Settings) -> Settings:
    return settings.model_copy(update={"allowed_networks": []})


async def replay(
    source: HtmlSource, pages: Iterable[ArchivedPage], ctx: SourceContext, links: LinkCollector
) -> list[Record]:
    """The records the source's current rules extract from archived pages (links land in ``links``)."""
    connector = HtmlConnector(source, ctx, cast(Frontier, links))
    out: asyncio.Queue[object] = asyncio.Queue()
    records: list[Record] = []
    for page in pages:
        ctx.stats.pages += 1
        ctx.stats.bytes += len(page.body)
        await connector.replay(page.url, as_response(page), out)
        while not out.empty():
            item = out.get_nowait()
            if isinstance(item, Record):
                records.append(item)
    return records


async def reextract_source(
    source: AnySource,
    manifest: Manifest,
    *,
    run_id: str,
    settings: Settings,
    stager: Stager,
    flow_run_id: str | None = None,
) -> SourceResult:
    """Re-extract one source's run (``manifest``) into a new committed run ``run_id``; no request is made."""
    src = check_reextractable(source, manifest)
    started = time.monotonic()
    stats = SourceStats()
    stage = stager.open_source(src.name, run_id, utcnow())
    stage.reextracted_from = manifest.run_id
    stage.archive_listed = manifest.archive
    archived_urls: set[str] = set()
    links = LinkCollector(keep=True)

    async def emit(outcome: Outcome) -> None:
        """No URL was requested: the new run's outcomes stream stays empty."""

    offline = _offline(settings)
    async with Fetcher(offline) as fetcher:
        ctx = SourceContext(run_id, offline, fetcher, emit, stats=stats)
        for uri, data in await read_archive(stager, manifest):
            pages = await asyncio.to_thread(lambda u=uri, d=data: list(archived_pages(u, d)))  # type: ignore[misc]
            archived_urls.update(p.url for p in pages)
            for record in await replay(src, pages, ctx, links):
                await stage.records.write(record.envelope())
    summary: dict[str, Any] = {
        **stats.as_dict(),
        "reextracted_from": manifest.run_id,
        "links_kept": links.count,
        "links_not_archived": len(set(links.links) - archived_urls),
    }
    summary.pop("outcomes", None)
    _outcomes, raw = await stage.commit(
        status="complete", schema=source_schema(src), stats=summary, flow_run_id=flow_run_id
    )
    seconds = time.monotonic() - started
    log.info("source re-extracted", source=src.name, run_id=run_id, seconds=round(seconds, 3), **summary)
    kind = "browser" if isinstance(src, BrowserSource) else "html"
    return SourceResult(src.name, "complete", seconds, {**summary, "kind": kind}, None, raw.uri)
