"""Frontiers: where a source's URLs wait during a crawl.

Two implementations of one :class:`Frontier` Protocol serve the one crawl loop:
:class:`MemoryFrontier` (one process, the default) and :class:`DurableFrontier`
(PostgreSQL: resumable, shardable, any number of machines). Scrapy's scheduler
for spider sources sits on the same PostgreSQL store (:mod:`trawl.frontier.scheduler`).
Which one a source uses is decided here and only here (:func:`durable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeGuard

from trawl.config import AnySource, HtmlSource, SpiderSource
from trawl.errors import ConfigError
from trawl.frontier.base import Claim, Counts, Frontier, HostMemory, Idle, Settled
from trawl.frontier.memory import MemoryFrontier
from trawl.frontier.postgres import DurableFrontier, PgFrontier, open_store
from trawl.settings import Settings

__all__ = [
    "Claim",
    "Counts",
    "DurableFrontier",
    "Frontier",
    "Idle",
    "MemoryFrontier",
    "PgFrontier",
    "Settled",
    "durable",
    "open_frontier",
    "open_store",
    "sharded",
]


def sharded(source: AnySource) -> TypeGuard[HtmlSource]:
    """Whether the crawl flow fans a source out into shard runs."""
    return isinstance(source, HtmlSource) and source.shards > 1


def durable(source: AnySource, settings: Settings) -> bool:
    """Whether a source's crawl keeps its URLs in PostgreSQL: html (browser too) and spider sources with it
    chosen (the source's ``frontier``, else the setting), and sharded html sources."""
    if not isinstance(source, HtmlSource | SpiderSource):
        return False
    return sharded(source) or (source.frontier or settings.frontier) == "postgres"


@contextlib.asynccontextmanager
async def open_frontier(
    source: AnySource,
    run_id: str,
    settings: Settings,
    *,
    resume: bool = False,
    shard: int | None = None,
    hosts: HostMemory | None = None,
) -> AsyncIterator[Frontier]:
    """The frontier one source's crawl runs on, for as long as the crawl runs.

    ``resume`` continues a durable run that died; ``shard`` crawls one shard of a
    sharded run (which commits no manifest: the parent writes it once every shard
    is done). ``hosts`` (the Fetcher) saves and restores what is learned of a host
    as its lease moves between shards. Shard 0 is the crawl flow's own: it stays
    while any host has work, to take over the hosts of a shard that vanished.
    """
    if not durable(source, settings):
        if shard is not None:
            raise ConfigError(f"source {source.name}: only html sources with shards > 1 are crawled in shards")
        yield MemoryFrontier(source.name, run_id)
        return
    is_sharded = sharded(source)
    if is_sharded and shard is None:
        raise ConfigError(f"source {source.name} has shards: the crawl flow fans it out")
    shards = source.shards if isinstance(source, HtmlSource) else 1
    # A spider's start requests come through its scheduler (PgScheduler) instead of seeds.
    seeds = list(source.urls) + list(source.start_urls) if isinstance(source, HtmlSource) else []
    async with open_store(source.name, run_id, settings, shard=shard or 0, shards=shards) as store:
        frontier = DurableFrontier(
            store,
            settings,
            seeds=seeds,
            resume=resume,
            sharded=is_sharded,
            hosts=hosts,
            per_host=(source.politeness.concurrency if isinstance(source, HtmlSource) else None)
            or settings.per_host_concurrency,
            keeper=is_sharded and not shard,
            links_stay=isinstance(source, HtmlSource) and (not source.start_urls or source.follow.same_host),
        )
        try:
            yield frontier
        finally:
            await frontier.close()
