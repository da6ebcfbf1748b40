"""Errors raised by trawl.

Every error is a :class:`TrawlError`. Whether a failure is worth retrying is a
property of its class (``transient``), never of its message::

    TrawlError
    ├── ConfigError                 bad sources file, settings or CLI usage   (exit 2)
    ├── DatabaseUnavailable         cannot reach / start PostgreSQL            (exit 2)
    ├── FetchError                  one URL could not be fetched
    │   ├── TransientFetchError     connect errors, timeouts, 408/425/429/5xx, truncated bodies
    │   ├── PermanentFetchError     other 4xx, bad content, body too large, too many redirects
    │   │   ├── BlockedNetworkError the URL resolves to a network the settings forbid
    │   │   └── RobotsDisallowed    the host's robots.txt forbids the URL
    │   └── BreakerOpen             the host's circuit breaker is open: not requested (retry later)
    ├── StagingError                staging target unreadable/unwritable, corrupt part
    └── LoadError                   a part could not be loaded into PostgreSQL
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BlockedNetworkError",
    "BreakerOpen",
    "ConfigError",
    "ConfigIssue",
    "DatabaseUnavailable",
    "FetchError",
    "LoadError",
    "PermanentFetchError",
    "RobotsDisallowed",
    "StagingError",
    "TransientFetchError",
    "TrawlError",
]


class TrawlError(Exception):
    """Base of every error trawl raises on purpose."""

    transient: bool = False


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


class ConfigError(TrawlError):
    """A user's configuration is wrong; ``issues`` lists every problem found."""

    def __init__(self, message: str, issues: list[ConfigIssue] | None = None) -> None:
        self.issues = list(issues or [])
        super().__init__(message)

    def lines(self) -> list[str]:
        """One line per problem (or the message when there is no list)."""
        return [str(i) for i in self.issues] or [str(self)]


class DatabaseUnavailable(TrawlError):
    """PostgreSQL could not be reached or started."""

    transient = True


class FetchError(TrawlError):
    """A URL could not be fetched; carries the URL, host and last HTTP status."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = 0  # set by the fetch layer once the URL has finally failed
        self.elapsed_ms = 0


class TransientFetchError(FetchError):
    """Worth retrying: the next attempt may well succeed."""

    transient = True


class PermanentFetchError(FetchError):
    """Retrying would give the same answer."""


class BlockedNetworkError(PermanentFetchError):
    """The URL's host resolves to an address the settings do not allow."""


class StagingError(TrawlError):
    """Staging could not be written or read back intact."""


class LoadError(TrawlError):
    """A staged part could not be loaded; names the staged object."""

    def __init__(self, message: str, *, staged_object: str | None = None) -> None:
        super().__init__(message)
        self.staged_object = staged_object


class RobotsDisallowed(PermanentFetchError):
    """The host's robots.txt does not allow this URL for our user agent."""


class BreakerOpen(FetchError):
    """The host's breaker is open (or its one probe is in flight): the URL was not requested."""

    def __init__(self, host: str, url: str, retry_in: float) -> None:
        super().__init__(f"circuit breaker for {host} is open; retry in {retry_in:.1f}s", url=url)
        self.host = host
        self.retry_in = retry_in
