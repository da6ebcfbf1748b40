"""The in-memory frontier: one process, one run, nothing kept when it ends (the default)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from trawl.frontier.base import Claim, Counts, Settled
from trawl.staging import SourceStage, Stager

__all__ = ["MemoryFrontier"]


class MemoryFrontier:
    """A queue in this process; the crawl ends when no URL is queued, being fetched, or parked."""

    name = "memory"
    resumable = False
    commits = True
    recent_max: int | None = None

    def __init__(self, source: str, run_id: str) -> None:
        self.source = source
        self.run_id = run_id
        self.claims: asyncio.Queue[Claim] = asyncio.Queue()
        self._outstanding = 0  # queued + being fetched + parked
        self._idle = asyncio.Event()

    def add(self, url: str, depth: int) -> None:
        if not self._outstanding:
            self._idle.clear()  # URLs added after all had settled once (a sitemap read while the crawl runs)
        self._outstanding += 1
        self.claims.put_nowait(Claim(url, depth))

    def settle(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    async def feed(self, out: asyncio.Queue[object], workers: int) -> None:
        """Nothing to feed: the workers' own links fill the queue. Returns once the last URL has settled."""
        if self._outstanding:
            await self._idle.wait()

    async def open_stage(self, stager: Stager, counts: Counts, started: datetime) -> SourceStage:
        return stager.open_source(self.source, self.run_id, started)

    async def settled(self, marker: Settled) -> None:
        """Nothing to record: progress lives only as long as the process."""

    async def idle(self) -> None:
        """Never idle while others work: an in-memory crawl has no shards."""

    async def checkpoint(self) -> None:
        """Nothing to checkpoint."""

    async def finish(self) -> None:
        """Nothing to record."""
