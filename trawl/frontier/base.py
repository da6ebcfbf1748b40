"""What every frontier is to the crawl: a queue of claimed URLs, and the markers a crawl yields for it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from trawl.staging import SourceStage, Stager

__all__ = ["Claim", "Counts", "Frontier", "HostMemory", "Idle", "Settled"]


class Claim(NamedTuple):
    """A URL handed to a crawl worker: its depth, its frontier key, and how often it was parked."""

    url: str
    depth: int
    key: int = 0
    requeues: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """Yielded after every record and the outcome of one frontier URL: it may be checkpointed as done."""

    key: int


@dataclass(frozen=True, slots=True)
class Idle:
    """Yielded when the crawl waits on other shards: checkpoint now, so they see this one's URLs done."""


class Counts(Protocol):
    """A source's running counts, as a frontier saves them at a checkpoint and restores them on resume."""

    def saved(self) -> dict[str, Any]: ...

    def restore(self, saved: dict[str, Any]) -> None: ...


class HostMemory(Protocol):
    """What a process learned of a host (rate, breaker, robots.txt), saved with the host's lease in a sharded crawl
    and taken over by its next owner (the Fetcher is one)."""

    def host_state(self, host: str) -> dict[str, Any]: ...

    def restore_host(self, host: str, state: Mapping[str, Any]) -> None: ...


class Frontier(Protocol):
    """Where one source's URLs wait, for the one crawl loop (:class:`trawl.connectors.html.HtmlConnector`) and the
    one source driver (:func:`trawl.crawler.crawl_source`).

    The loop's side: workers take :class:`Claim` s from ``claims``; a URL seen for
    the first time is ``add`` ed; each claim ends with ``settle``; ``feed`` runs
    beside the workers and returns when the crawl has nothing left. The driver's
    side: ``open_stage`` starts (or resumes) the run's staging, ``checkpoint`` makes
    progress durable where the frontier can (``resumable``), ``finish`` records the
    end. An in-memory frontier's checkpoints are no-ops.
    """

    name: str
    """``memory`` or ``postgres`` (logged with the source's start)."""
    resumable: bool
    """Progress survives the process: a failed crawl is not committed, ``--resume`` carries on."""
    commits: bool
    """This crawl writes the source's manifest (a shard's parent does it for its shards)."""
    recent_max: int | None
    """How many seen-URL hashes the loop keeps before it forgets them (None: all; the frontier is the seen set)."""
    claims: asyncio.Queue[Claim]

    def add(self, url: str, depth: int) -> None: ...

    def settle(self) -> None: ...

    async def feed(self, out: asyncio.Queue[object], workers: int) -> None: ...

    async def open_stage(self, stager: Stager, counts: Counts, started: datetime) -> SourceStage: ...

    async def settled(self, marker: Settled) -> None: ...

    async def idle(self) -> None: ...

    async def checkpoint(self) -> None: ...

    async def finish(self) -> None: ...
