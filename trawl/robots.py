"""robots.txt: fetched once per origin (through the same request path as everything else), parsed with protego.

A 2xx is parsed; a 4xx means no rules (allow all); a 5xx or an unreachable
host means what ``robots_unavailable`` says (``allow`` like Scrapy, or
``disallow`` like RFC 9309). ``Crawl-delay`` is returned so the caller can
space requests to the host, capped by ``max_crawl_delay``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from protego import Protego

from trawl.errors import BreakerOpen, FetchError, PermanentFetchError
from trawl.urls import host_of

__all__ = ["RobotsCache", "RobotsRules", "origin_of"]

log = structlog.get_logger("trawl.robots")

# (status, body) of GET {origin}/robots.txt, or a FetchError.
RobotsFetch = Callable[[str], Awaitable[tuple[int, bytes]]]
ROBOTS_MAX_BYTES = 512 * 1024  # Google reads the first 500 KiB


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` (no credentials): where a URL's robots.txt is."""
    return f"{urlsplit(url).scheme.lower()}://{host_of(url)}"


@dataclass(frozen=True, slots=True)
class RobotsRules:
    """What one origin's robots.txt says for our user agent."""

    parser: Protego | None  # None: no rules (allow all) unless ``deny_all``
    deny_all: bool = False

    def allows(self, url: str, agent: str) -> bool:
        if self.deny_all:
            return False
        return self.parser is None or bool(self.parser.can_fetch(url, agent))

    def crawl_delay(self, agent: str) -> float | None:
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(agent)
        return float(delay) if delay is not None else None


class RobotsCache:
    """Per-origin rules, each robots.txt fetched at most once per process (concurrent askers wait for it)."""

    def __init__(self, agent: str, *, unavailable: str = "allow") -> None:
        self.agent = agent
        self._unavailable_denies = unavailable == "disallow"
        self._rules: dict[str, asyncio.Task[RobotsRules]] = {}

    async def rules(self, url: str, fetch: RobotsFetch) -> RobotsRules:
        """The rules for ``url``'s origin; the first asker's ``fetch`` gets the file, later askers wait for it."""
        origin = origin_of(url)
        task = self._rules.get(origin)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return task.result()  # the common case: known rules, no await, no shield
        if task is None:
            task = self._rules[origin] = asyncio.ensure_future(self._load(origin, fetch))
        try:
            return await asyncio.shield(task)
        except BreakerOpen:
            # Not an answer about robots.txt: ask again once the host's breaker lets requests through.
            if self._rules.get(origin) is task:
                del self._rules[origin]
            raise

    async def _load(self, origin: str, fetch: RobotsFetch) -> RobotsRules:
        try:
            status, body = await fetch(f"{origin}/robots.txt")
        except BreakerOpen:
            raise
        except PermanentFetchError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                return RobotsRules(None)
            log.warning("robots.txt unavailable", origin=origin, error=str(exc), treat_as=self._treat())
            return RobotsRules(None, deny_all=self._unavailable_denies)
        except FetchError as exc:
            log.warning("robots.txt unavailable", origin=origin, error=str(exc), treat_as=self._treat())
            return RobotsRules(None, deny_all=self._unavailable_denies)
        if not 200 <= status < 300:
            return RobotsRules(None)
        text = body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace")
        return RobotsRules(Protego.parse(text))

    def _treat(self) -> str:
        return "disallow all" if self._unavailable_denies else "allow all"
