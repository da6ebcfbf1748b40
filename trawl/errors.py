"""Every error trawl raises, in one tree.

Whether a failure is worth retrying is a property of its class, never of its
message: catch :class:`Transient` to retry, :class:`Terminal` to give up at once
(as dlt's ``TransientException`` / ``TerminalException``). Each error's
``transient`` attribute says the same. :func:`trawl.retry.is_transient` applies
this to foreign errors too (OS, asyncpg by SQLSTATE, botocore by code)::

    TrawlError
    ├── ConfigError                 bad sources file, settings or CLI usage           (exit 2)
    │   └── DatabaseRefused         bad DSN, authentication failed, no such database  (exit 2, never retried)
    ├── ParameterError              a flow parameter is wrong; names the parameter
    ├── DatabaseUnavailable         cannot reach / start PostgreSQL; connection lost  (transient; exit 2)
    ├── FetchError                  one URL could not be fetched
    │   ├── TransientFetchError     connect errors, timeouts, 408/425/5xx, truncated bodies
    │   │   ├── Throttled           429, or 503 with Retry-After: the host asks us to slow down (not a failure)
    │   │   ├── ProxyFailed         the request's proxy refused, dropped or rejected it (the proxy's breaker counts it)
    │   │   └── ProxyUnavailable    every proxy of the source is benched: not requested
    │   ├── PermanentFetchError     other 4xx, bad content, body too large, too many redirects
    │   │   ├── BlockedNetworkError the URL resolves to a network the settings forbid
    │   │   ├── RobotsDisallowed    the host's robots.txt forbids the URL
    │   │   └── ThrottleBudgetSpent the host kept throttling past ``throttle_budget``: "throttled"
    │   ├── BreakerOpen             the host's circuit breaker is open: not requested (retry later)
    │   └── HostBusy                the throttled host has no room now: not requested (park the URL)
    ├── SourceFailed                a source ended early (its result attached; what it fetched is staged)
    ├── RunFailed                   every source of a flow run failed (the run's result attached)
    ├── SpiderFailed                a Scrapy spider could not start or its crawl broke off
    ├── SourceBusy                  another flow run holds the source's concurrency slot
    ├── StagingError                staging target unreadable/unwritable, corrupt part
    │   └── StagingUnavailable      S3 down or throttling after its own retries      (transient)
    └── LoadError                   a part could not be loaded into PostgreSQL
        ├── LoadConflict            serialization failure or deadlock (40001, 40P01)  (transient)
        └── TooManyRejects          a run's reject rate passed ``max_reject_rate``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "BlockedNetworkError",
    "BreakerOpen",
    "ConfigError",
    "ConfigIssue",
    "DatabaseRefused",
    "DatabaseUnavailable",
    "FetchError",
    "HostBusy",
    "LoadConflict",
    "LoadError",
    "ParameterError",
    "PermanentFetchError",
    "ProxyFailed",
    "ProxyUnavailable",
    "RobotsDisallowed",
    "RunFailed",
    "SourceBusy",
    "SourceFailed",
    "SpiderFailed",
    "StagingError",
    "StagingUnavailable",
    "Terminal",
    "ThrottleBudgetSpent",
    "Throttled",
    "TooManyRejects",
    "Transient",
    "TransientFetchError",
    "TrawlError",
]


class Transient(Exception):
    """Marker: the next attempt may well succeed (retry with backoff). ``except Transient:`` catches them all."""


class Terminal(Exception):
    """Marker: retrying would give the same answer (never retried)."""


class TrawlError(Exception):
    """Base of every error trawl raises on purpose.

    Context (``run_id``, ``source``, ``host``) is attached where the raiser knows
    it; ``transient`` follows from the :class:`Transient` marker.
    """

    transient: ClassVar[bool] = False
    run_id: str | None = None
    source: str | None = None
    host: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.transient = issubclass(cls, Transient)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a sources file: where it is and what is wrong."""

    file: str
    entry: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.entry}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class ConfigError(TrawlError, Terminal):
    """A user's configuration is wrong; ``issues`` lists every problem found."""

    def __init__(self, message: str, issues: list[ConfigIssue] | None = None) -> None:
        self.issues = list(issues or [])
        super().__init__(message)

    def lines(self) -> list[str]:
        """One line per problem (or the message when there is no list)."""
        return [str(i) for i in self.issues] or [str(self)]


class ParameterError(TrawlError, Terminal):
    """A flow parameter is wrong; the message names the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"parameter {parameter!r}: {message}")
        self.parameter = parameter


class DatabaseRefused(ConfigError):
    """PostgreSQL answered, and the answer will not change: a bad DSN, failed authentication, no such database."""


class DatabaseUnavailable(TrawlError, Transient):
    """PostgreSQL could not be reached or started, or the connection was lost (it may be back soon)."""


class FetchError(TrawlError):
    """A URL could not be fetched; carries the URL, host and last HTTP status."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = 0  # set by the fetch layer once the URL has finally failed
        self.elapsed_ms = 0
        self.retry_after: float | None = None  # what the server asked for (Retry-After), if anything


class TransientFetchError(FetchError, Transient):
    """Worth retrying: the next attempt may well succeed."""


class Throttled(TransientFetchError):
    """The host asked us to slow down (429, or 503 with ``Retry-After``).

    Not a failure: the host's gate pauses and slows it, its breaker does not count
    it, and the retry that follows does not use one of the URL's ``max_retries``.
    """


class ProxyFailed(TransientFetchError):
    """The proxy the request went through could not be reached, dropped the connection or refused us (407).

    The proxy's fault, not the host's: the proxy's breaker counts it, the host's does
    not, and the retry (through another proxy when one is up) uses none of the URL's
    ``max_retries``.
    """


class ProxyUnavailable(TransientFetchError):
    """Every proxy of the source is benched by its breaker: nothing was sent (retried after a backoff)."""


class PermanentFetchError(FetchError, Terminal):
    """Retrying would give the same answer."""


class BlockedNetworkError(PermanentFetchError):
    """The URL's host resolves to an address the settings do not allow."""


class RobotsDisallowed(PermanentFetchError):
    """The host's robots.txt does not allow this URL for our user agent."""


class ThrottleBudgetSpent(PermanentFetchError):
    """The host kept throttling at its slowest rate for longer than ``throttle_budget``: its URLs end ``failed``.

    ``status`` is the host's last throttle status (429 or 503); the message starts with "throttled".
    """

    def __init__(self, host: str, url: str, status: int | None, budget: float) -> None:
        super().__init__(
            f"throttled: {host} kept asking to slow down for more than {budget:g}s", url=url, status=status
        )
        self.host = host


class BreakerOpen(FetchError):
    """The host's breaker is open (or its one probe is in flight): the URL was not requested."""

    def __init__(self, host: str, url: str, retry_in: float) -> None:
        super().__init__(f"circuit breaker for {host} is open; retry in {retry_in:.1f}s", url=url)
        self.host = host
        self.retry_in = retry_in


class HostBusy(FetchError):
    """The URL's host is throttled and has no room for another request now: it was not requested.

    A crawl puts the URL back (:meth:`when_ready` calls back once the host has room)
    instead of holding a worker through the host's pause.
    """

    def __init__(self, host: str, url: str, park: Callable[[Callable[[], None], bool], None]) -> None:
        super().__init__(f"{host} is throttled and has no room now", url=url)
        self.host = host
        self._park = park

    def when_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the event loop) when the host may take this request.

        A URL already under way (``attempts`` > 0) goes before those not yet sent, so the host's
        URLs finish one by one rather than all waiting on each other's pauses.
        """
        self._park(callback, self.attempts > 0)


class SourceFailed(TrawlError):
    """A source ended early; what it fetched before is staged and its result (``SourceResult``) is attached."""

    def __init__(self, result: Any) -> None:
        super().__init__(f"source {result.source} failed: {result.error}")
        self.result = result
        self.source = result.source


class RunFailed(TrawlError):
    """Every source of a flow run failed: the run ends ``Failed``; ``result`` is the run's result all the same."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message, result)  # both in args: the exception pickles (Prefect persists it)
        self.result = result

    def __str__(self) -> str:
        return str(self.args[0])


class SpiderFailed(TrawlError):
    """The spider could not start or its crawl broke off."""


class SourceBusy(TrawlError):
    """Another flow run holds this source's concurrency slot and the settings say not to wait."""


class StagingError(TrawlError):
    """Staging could not be written or read back intact."""


class StagingUnavailable(StagingError, Transient):
    """S3 could not be reached or answered with a transient error after retries: worth trying again later."""


class LoadError(TrawlError):
    """A staged part could not be loaded; names the staged object."""

    def __init__(self, message: str, *, staged_object: str | None = None) -> None:
        super().__init__(message)
        self.staged_object = staged_object


class LoadConflict(LoadError, Transient):
    """The load's transaction lost a serialization conflict or a deadlock: run it again."""


class TooManyRejects(LoadError):
    """A manifest's reject rate passed ``max_reject_rate``."""
