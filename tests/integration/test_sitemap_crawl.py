"""`html` sources with `sitemaps`: an index of gzip'd sitemaps crawled once per in-pattern URL, and a later run
fetches only what the sitemap says changed (lastmod) or is new."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sinks.postgres import Loader, load_lastmods
from sinks.stage import LocalStager
from tests.helpers.sitemap_site import SitemapSite
from trawl.config import HtmlSource
from trawl.connectors import SourceContext, SourceStats, connector_for
from trawl.crawler import crawl_source
from trawl.fetch import Fetcher
from trawl.records import Outcome, OutcomeKind, Record
from trawl.settings import Settings


def source(site: SitemapSite, **kw: Any) -> HtmlSource:
    spec: dict[str, Any] = {
        "kind": "html",
        "name": "items",
        "sitemaps": [f"{site.url}/sitemap_index.xml"],
        "follow": {"allow": ["/item/"]},
        "fields": {"title": {"selector": "h1"}},
        "robots": False,
        "conditional": False,
        **kw,
    }
    return HtmlSource.model_validate(spec)


async def crawl(
    src: HtmlSource, settings: Settings, lastmods: dict[str, str] | None = None
) -> tuple[list[Record], list[Outcome], SourceStats]:
    records: list[Record] = []
    outcomes: list[Outcome] = []
    stats = SourceStats()

    async def emit(o: Outcome) -> None:
        outcomes.append(o)

    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("run-1", settings, fetcher, emit, stats, lastmods=lastmods or {})
        async for item in connector_for(src, ctx).fetch():
            assert isinstance(item, Record)
            records.append(item)
    return records, outcomes, stats


def lastmods_of(outcomes: list[Outcome]) -> dict[str, str]:
    """What the next run starts from: the lastmod recorded with each URL's outcome (as `load_lastmods` reads it)."""
    return {o.url: o.lastmod for o in outcomes if o.lastmod and o.outcome in ("fetched", "not_modified")}


def pages(site: SitemapSite) -> Counter[str]:
    return Counter({p: n for p, n in site.requests.items() if p.startswith(("/item/", "/other/"))})


async def second_run_after_changes(site: SitemapSite, settings: Settings, changed: list[int], new: int) -> None:
    src = source(site)
    records, outcomes, stats = await crawl(src, settings)
    wanted = {site.path(n) for n in site.in_pattern()}
    assert pages(site) == Counter(dict.fromkeys(wanted, 1))  # every in-pattern URL once, none off-pattern
    assert len(records) == len(wanted)
    assert {o.url for o in outcomes if o.outcome == "fetched" and "/item/" in o.url} == {site.url + p for p in wanted}
    assert all(o.lastmod == "2026-11-01T00:00:00+00:00" for o in outcomes if "/item/" in o.url)
    # The index and both gzip'd sitemaps, read once each; their outcomes are recorded too.
    assert {p: n for p, n in site.requests.items() if "sitemap" in p} == {
        "/sitemap_index.xml": 1,
        "/sitemap-0.xml.gz": 1,
        "/sitemap-1.xml.gz": 1,
    }
    assert stats.discovered == len(wanted)

    for n in changed:
        site.lastmod[n] = "2026-12-01T00:00:00+00:00"
    site.pages += new
    for n in range(site.pages - new, site.pages):
        site.lastmod[n] = "2026-12-01T00:00:00+00:00"
    site.requests.clear()
    records2, outcomes2, _ = await crawl(src, settings, lastmods_of(outcomes))
    expect = {site.path(n) for n in changed} | {
        site.path(n) for n in range(site.pages - new, site.pages) if site.path(n).startswith("/item/")
    }
    assert pages(site) == Counter(dict.fromkeys(expect, 1))
    assert len(records2) == len(expect)
    kinds = Counter(o.outcome.value for o in outcomes2 if "/item/" in o.url)
    # Every listed URL still ends in one outcome: unchanged ones `not_modified` (no request), carrying their lastmod.
    assert kinds == {"fetched": len(expect), "not_modified": len(wanted) - len(changed)}
    unchanged = [o for o in outcomes2 if o.outcome is OutcomeKind.NOT_MODIFIED]
    assert all(o.attempts == 0 and o.lastmod == "2026-11-01T00:00:00+00:00" for o in unchanged)
    # A third run with nothing changed fetches nothing but the sitemaps.
    site.requests.clear()
    await crawl(src, settings, lastmods_of(outcomes) | lastmods_of(outcomes2))
    assert pages(site) == Counter()


async def test_sitemap_index_of_gzipped_sitemaps_then_only_changed_urls(settings: Settings) -> None:
    async with SitemapSite(3_000) as site:
        changed = site.in_pattern()[::29][:100]
        await second_run_after_changes(site, settings, changed, new=20)


@pytest.mark.slow
async def test_sixty_thousand_urls_then_a_hundred_changed(settings: Settings) -> None:
    fast = settings.model_copy(update={"per_host_concurrency": 32})
    async with SitemapSite(60_000) as site:
        changed = site.in_pattern()[::500][:100]
        assert len(changed) == 100
        await second_run_after_changes(site, fast, changed, new=50)


async def test_sitemaps_from_robots_txt(settings: Settings) -> None:
    async with SitemapSite(200) as site:
        src = source(site, sitemaps="robots", urls=[f"{site.url}/item/1"], robots=True)
        records, _, _ = await crawl(src, settings)
        assert pages(site) == Counter(dict.fromkeys({site.path(n) for n in site.in_pattern()}, 1))
        assert len(records) == len(site.in_pattern())


async def test_each_sitemaps_own_host_counts_as_the_sources(settings: Settings) -> None:
    async with SitemapSite(50, off_every=0) as site, SitemapSite(5, parts=1, off_every=0, host="127.0.0.2") as other:
        src = source(site, sitemaps=[f"{site.url}/sitemap_index.xml", f"{other.url}/sitemap-0.xml.gz"])
        records, _, _ = await crawl(src, settings)
        # Each sitemap's own host counts as the source's: both sites' pages, nothing else.
        assert len(records) == 55


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"sitemaps": "robots"}, "`sitemaps: robots` reads the robots.txt"),
        ({"sitemaps": ["ftp://x.test/s.xml"]}, r"sitemaps\.list\.0\n.*not an http\(s\) URL: 'ftp://x.test/s.xml'"),
        ({"sitemaps": "sitemap.xml"}, "sitemaps.robots\n.*Input should be 'robots'"),
        ({"sitemaps": ["http://x.test/s.xml"], "frontier": "postgres"}, "in-memory crawls only"),
    ],
)
def test_bad_sitemap_config_is_named(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        HtmlSource.model_validate({"kind": "html", "name": "x", "fields": {"t": {"selector": "h1"}}, **spec})


@pytest.fixture
def stager(tmp_path: Path) -> LocalStager:
    return LocalStager(tmp_path / "staging")


async def test_lastmods_round_trip_through_staging_and_postgres(
    settings: Settings, stager: LocalStager, loader: Loader, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """The crawl stages each URL's lastmod with its outcome; the loader keeps it; the next crawl reads it back."""
    async with SitemapSite(300) as site:
        src = source(site)

        async def run(run_id: str) -> dict[str, Any]:
            async with Fetcher(settings) as fetcher:
                result = await crawl_source(
                    src,
                    run_id=run_id,
                    settings=settings,
                    fetcher=fetcher,
                    stager=stager,
                    lastmods=await load_lastmods(pool, "trawl", src.name),
                )
            for m in await stager.manifests("outcomes") + await stager.manifests("raw"):
                if m.run_id == run_id:
                    await loader.load_manifest(m)
            return result.as_dict()

        first = await run("run-a")
        wanted = len(site.in_pattern())
        assert first["records"] == wanted
        assert len(await load_lastmods(pool, "trawl", src.name)) == wanted
        changed = site.in_pattern()[:7]
        for n in changed:
            site.lastmod[n] = "2026-12-24T00:00:00Z"
        site.requests.clear()
        second = await run("run-b")
        assert pages(site) == Counter({site.path(n): 1 for n in changed})
        assert second["records"] == 7
        assert second["outcomes"] == {"fetched": 7 + 3, "not_modified": wanted - 7}  # + the index and 2 sitemaps
        rows = await db.fetch("SELECT url, lastmod FROM trawl._outcomes WHERE run_id = 'run-b' AND lastmod IS NOT NULL")
        assert len(rows) == wanted
        assert {r["lastmod"] for r in rows if r["url"].endswith(tuple(f"/item/{n}" for n in changed))} == {
            "2026-12-24T00:00:00Z"
        }
        # The unchanged rows still count as seen in run-b (their not_modified outcome is a sighting).
        seen = await db.fetchval(
            "SELECT count(*) FROM trawl._lineage l JOIN trawl._loads d USING (load_id) WHERE d.run_id = 'run-b'"
        )
        assert seen == wanted


async def test_sitemap_reading_waits_for_the_workers(settings: Settings) -> None:
    """Back-pressure: the URLs a sitemap lists are queued a bounded batch at a time, not all at once."""
    s = settings.model_copy(update={"queue_size": 100})
    async with SitemapSite(3_000, off_every=0) as site:
        records: list[Record] = []
        most = 0

        async def emit(o: Outcome) -> None:
            pass

        async with Fetcher(s) as fetcher:
            ctx = SourceContext("run-1", s, fetcher, emit, SourceStats())
            connector = connector_for(source(site), ctx)
            async for item in connector.fetch():
                assert isinstance(item, Record)
                records.append(item)
                most = max(most, connector.frontier.claims.qsize())  # type: ignore[attr-defined]
        assert len(records) == 3_000
        assert most <= 101
