"""Frontiers without a database: the one decision of which a source uses, the in-memory queue, host spelling."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sinks.stage import LocalStager
from trawl.config import ApiSource, BrowserSource, HtmlSource, SpiderSource
from trawl.connectors.base import SourceStats
from trawl.errors import ConfigError
from trawl.frontier import Claim, MemoryFrontier, durable, open_frontier, sharded
from trawl.settings import Settings
from trawl.urls import host_of


def html(**kw: object) -> HtmlSource:
    spec = {"kind": "html", "name": "shop", "urls": ["http://a.test/"], "fields": {"title": {"selector": "h1"}}}
    return HtmlSource.model_validate(spec | kw)


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://Shop.Example:8080/a/b?x=1", "shop.example:8080"),
        ("https://user:pw@Shop.Example/a", "shop.example"),
        ("http://user@127.0.0.1:9/", "127.0.0.1:9"),
        ("http://[::1]:80/x", "[::1]:80"),
    ],
)
def test_host_of_is_one_spelling_without_user(url: str, host: str) -> None:
    assert host_of(url) == host


def test_which_frontier_a_source_uses_is_decided_once() -> None:
    memory, pg = Settings(frontier="memory"), Settings(frontier="postgres")
    api = ApiSource.model_validate({"kind": "api", "name": "a", "url": "http://a.test/"})
    spider = SpiderSource.model_validate({"kind": "spider", "name": "s", "spider": "spiders.books:BooksSpider"})
    browser = BrowserSource.model_validate(
        {"kind": "browser", "name": "b", "urls": ["http://a.test/"], "fields": {"title": {"selector": "h1"}}}
    )
    assert not durable(html(), memory) and durable(html(), pg)
    assert durable(html(frontier="postgres"), memory) and not durable(html(frontier="memory"), pg)
    assert durable(html(shards=2), memory) and sharded(html(shards=2)) and not sharded(html())
    assert not durable(api, pg)  # api sources page on their own
    assert durable(spider, pg) and not durable(spider, memory)
    assert durable(browser, pg)  # the same crawl loop as html


async def test_memory_frontier_feeds_until_every_claim_settled() -> None:
    f = MemoryFrontier("shop", "r1")
    f.add("http://a.test/1", 0)
    f.add("http://a.test/2", 1)
    assert f.claims.get_nowait() == Claim("http://a.test/1", 0)
    feeding = asyncio.create_task(f.feed(asyncio.Queue(), workers=2))
    f.settle()
    await asyncio.sleep(0.01)
    assert not feeding.done()  # one URL still queued
    claim = f.claims.get_nowait()
    assert claim == Claim("http://a.test/2", 1, 0, 0)
    f.add("http://a.test/3", 2)  # discovered while the second was fetched
    f.settle()
    await asyncio.sleep(0.01)
    assert not feeding.done()
    f.claims.get_nowait()
    f.settle()
    await asyncio.wait_for(feeding, 1)


async def test_memory_frontier_with_nothing_queued_is_done_at_once() -> None:
    await asyncio.wait_for(MemoryFrontier("shop", "r1").feed(asyncio.Queue(), workers=4), 1)


async def test_memory_frontier_stages_a_fresh_run_and_checkpoints_nothing(tmp_path: Path) -> None:
    f = MemoryFrontier("shop", "r1")
    assert (f.resumable, f.commits, f.recent_max, f.name) == (False, True, None, "memory")
    started = datetime(2026, 3, 14, 12, tzinfo=UTC)
    stager = await asyncio.to_thread(LocalStager, tmp_path)  # its constructor resolves the path: off the loop
    stage = await f.open_stage(stager, SourceStats(), started)
    assert (stage.source, stage.run_id, stage.dt) == ("shop", "r1", "2026-03-14")
    await f.checkpoint()
    await f.finish()
    assert not await asyncio.to_thread(lambda: list(tmp_path.rglob("*")))  # nothing written before the source writes


async def test_open_frontier_refuses_shards_where_there_are_none() -> None:
    settings = Settings(frontier="memory")
    with pytest.raises(ConfigError, match="only html sources with shards > 1"):
        async with open_frontier(html(), "r1", settings, shard=0):
            pass
    with pytest.raises(ConfigError, match="the crawl flow fans it out"):
        async with open_frontier(html(shards=2), "r1", settings):
            pass
    async with open_frontier(html(), "r1", settings) as f:
        assert isinstance(f, MemoryFrontier)


def test_one_host_spelling_everywhere_a_host_keys_something() -> None:
    from trawl.robots import origin_of

    url = "https://user:secret@Shop.Example:8443/a?b#c"
    assert host_of(url) == "shop.example:8443"
    assert origin_of(url) == "https://shop.example:8443"  # robots.txt is never asked for with credentials
    assert host_of("http://shop.example?x=1") == host_of("http://shop.example#top") == "shop.example"
