"""robots.txt: fetched per origin (through the same request path as everything else), parsed with protego.

As RFC 9309 and Google do: a 2xx is parsed, its first 500 KiB only (a longer
file is read that far and cut, never refused), a UTF-8 byte order mark
ignored; a 4xx means no rules (allow all); a 5xx or an unreachable host means
what ``robots_unavailable`` says (``disallow`` all by default, or ``allow``
all as Scrapy does); a 429 (after the fetch's own retries) is neither: the
asking URL fails as throttled and the file is asked for again later. A verdict
from a failed fetch expires after ``failure_ttl`` seconds, so a host whose
robots.txt was briefly down is not judged by that for the rest of the run.
``Crawl-delay`` is returned so the caller can space requests to the host,
capped by ``max_crawl_delay``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from protego import Protego

from trawl.errors import BlockedNetworkError, BreakerOpen, FetchError, PermanentFetchError
from trawl.urls import host_of, split_plain

__all__ = ["ROBOTS_MAX_BYTES", "RobotsCache", "RobotsRules", "origin_of"]

log = structlog.get_logger("trawl.robots")

# (status, body) of GET {origin}/robots.txt (the body cut at ROBOTS_MAX_BYTES), or a FetchError.
RobotsFetch = Callable[[str], Awaitable[tuple[int, bytes]]]
ROBOTS_MAX_BYTES = 500 * 1024
"""The part of a robots.txt that is read and parsed (RFC 9309 2.5: at least 500 KiB; Google: the first 500 KiB)."""
_BOM = b"\xef\xbb\xbf"


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` (no credentials): where a URL's robots.txt is."""
    plain = split_plain(url)
    scheme = plain[0] if plain is not None else urlsplit(url).scheme.lower()
    return f"{scheme}://{host_of(url)}"


@dataclass(frozen=True, slots=True)
class RobotsRules:
    """What one origin's robots.txt says for our user agent.

    ``unavailable`` says why the file could not be read (None: it was, or it is
    absent) and ``status`` the HTTP status it got (None: the host could not be
    reached); ``throttled`` that the host answered 429; ``expires`` (monotonic
    time) when a verdict from a failed fetch is to be fetched again.
    """

    parser: Protego | None  # None: no rules (allow all) unless ``deny_all``
    deny_all: bool = False
    unavailable: str | None = None
    status: int | None = None
    throttled: bool = False
    expires: float | None = None
    body: bytes | None = None
    """The file as read (its rules' first 500 KiB), kept so another process can take the host over without it."""

    def allows(self, url: str, agent: str) -> bool:
        if self.deny_all or self.throttled:
            return False
        return self.parser is None or bool(self.parser.can_fetch(url, agent))

    def crawl_delay(self, agent: str) -> float | None:
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(agent)
        return float(delay) if delay is not None else None


def parse_robots(body: bytes) -> Protego:
    """The rules of a robots.txt body: its first :data:`ROBOTS_MAX_BYTES`, a leading UTF-8 BOM dropped."""
    head = body[:ROBOTS_MAX_BYTES]
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    return Protego.parse(head.decode("utf-8", errors="replace"))


class RobotsCache:
    """Per-origin rules, each robots.txt fetched once per process (concurrent askers wait for it).

    A verdict that came from a failed fetch (5xx, unreachable, 429) is kept for
    ``failure_ttl`` seconds only; then the next asker fetches the file again.
    """

    def __init__(self, agent: str, *, unavailable: str = "disallow", failure_ttl: float = 300.0) -> None:
        self.agent = agent
        self._unavailable_denies = unavailable == "disallow"
        self._failure_ttl = failure_ttl
        self._rules: dict[str, asyncio.Future[RobotsRules]] = {}

    async def rules(self, url: str, fetch: RobotsFetch) -> RobotsRules:
        """The rules for ``url``'s origin; the first asker's ``fetch`` gets the file, later askers wait for it."""
        origin = origin_of(url)
        task = self._rules.get(origin)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            rules = task.result()
            if rules.expires is None or time.monotonic() < rules.expires:
                return rules  # the common case: known rules, no await, no shield
            task = None  # a failure verdict that has expired: fetch the file again
        if task is None:
            task = self._rules[origin] = asyncio.ensure_future(self._load(origin, fetch))
        try:
            return await asyncio.shield(task)
        except (BreakerOpen, BlockedNetworkError):
            # Not an answer about robots.txt: ask again once the host's breaker lets requests through (a blocked
            # host ends `blocked_network` on its own request, not `skipped_robots`).
            if self._rules.get(origin) is task:
                del self._rules[origin]
            raise

    async def _load(self, origin: str, fetch: RobotsFetch) -> RobotsRules:
        try:
            status, body = await fetch(f"{origin}/robots.txt")
        except (BreakerOpen, BlockedNetworkError):
            raise
        except FetchError as exc:
            if exc.status == 429:
                log.warning("robots.txt throttled (429), asking again later", origin=origin, error=str(exc))
                return RobotsRules(None, unavailable=str(exc), status=429, throttled=True, expires=self._expiry(exc))
            if isinstance(exc, PermanentFetchError) and exc.status is not None and 400 <= exc.status < 500:
                return RobotsRules(None)
            log.warning("robots.txt unavailable", origin=origin, error=str(exc), treat_as=self._treat())
            return RobotsRules(
                None,
                deny_all=self._unavailable_denies,
                unavailable=str(exc),
                status=exc.status,
                expires=self._expiry(exc),
            )
        if not 200 <= status < 300:
            return RobotsRules(None)
        head = body[:ROBOTS_MAX_BYTES]
        return RobotsRules(parse_robots(head), body=head)

    def saved(self, host: str) -> dict[str, str | None]:
        """The robots.txt files read for ``host``'s origins (None: absent, allow all), as JSON; failed reads are
        left out (the next process asks again)."""
        out: dict[str, str | None] = {}
        for origin, task in self._rules.items():
            if urlsplit(origin).netloc != host or not task.done() or task.cancelled() or task.exception():
                continue
            rules = task.result()
            if rules.expires is None and not rules.deny_all:
                out[origin] = None if rules.body is None else rules.body.decode("utf-8", errors="replace")
        return out

    def restore(self, saved: Mapping[str, str | None]) -> None:
        """Use robots.txt files another process read (:meth:`saved`) instead of fetching them again."""
        loop = asyncio.get_running_loop()
        for origin, text in saved.items():
            if origin in self._rules:
                continue
            future: asyncio.Future[RobotsRules] = loop.create_future()
            body = None if text is None else text.encode()
            future.set_result(RobotsRules(None if body is None else parse_robots(body), body=body))
            self._rules[origin] = future

    def _expiry(self, exc: FetchError) -> float:
        wait = self._failure_ttl if exc.retry_after is None else min(self._failure_ttl, exc.retry_after)
        return time.monotonic() + wait

    def _treat(self) -> str:
        return "disallow all" if self._unavailable_denies else "allow all"
