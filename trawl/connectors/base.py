"""What every connector shares: the context it runs in and the one way it fetches a URL."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

import orjson
import structlog

from trawl.archive import Archiver, Exchange
from trawl.errors import BlockedNetworkError, BreakerOpen, FetchError, HostBusy, RobotsDisallowed
from trawl.extract import get_path
from trawl.fetch import Fetcher, Response, TransportName
from trawl.frontier.base import Idle, Settled
from trawl.incremental import CursorWindow
from trawl.logs import redact
from trawl.metrics import METRICS
from trawl.proxies import ProxyRotation
from trawl.records import Outcome, OutcomeKind, Record, utcnow
from trawl.settings import Settings
from trawl.urls import host_of

__all__ = [
    "OUTCOME_OF",
    "Connector",
    "SourceContext",
    "SourceStats",
    "Validators",
    "make_record",
    "record_key",
    "url_hash",
]

Validators = tuple[str | None, str | None]  # (ETag, Last-Modified)

log = structlog.get_logger("trawl.connectors")

# Failures that are not the host's fault get their own outcome kind (subclasses before their bases).
OUTCOME_OF: dict[type[FetchError], OutcomeKind] = {
    BlockedNetworkError: OutcomeKind.BLOCKED_NETWORK,
    RobotsDisallowed: OutcomeKind.SKIPPED_ROBOTS,
}


def url_hash(url: str) -> int:
    """A URL in a seen set: 64-bit hashes, not strings (~80 B per URL instead of ~150, FIELD-NOTES). str's own hash
    is 64-bit, cached on the string and per-process salted: fine for a set that lives in one process.
    :func:`trawl.extract.extract_links` checks a seen set with ``hash()`` directly: keep the two the same."""
    return hash(url)


@dataclass(slots=True)
class SourceStats:
    """Running counts of one source's crawl."""

    pages: int = 0
    records: int = 0
    bytes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    discovered: int = 0
    hosts: set[str] = field(default_factory=set)
    """Hosts (:func:`trawl.urls.host_of`) this source's URLs ended on: whose breakers its summary counts."""
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(outcome, error message) of the URLs that did not end fetched or not_modified."""
    error_examples: dict[tuple[str, str], str] = field(default_factory=dict)
    render: Counter[str] = field(default_factory=Counter)
    """`browser` sources: pages per path (``http``, ``browser``, ``http+browser``)."""
    scrapy: dict[str, Any] = field(default_factory=dict)
    """`spider` sources: Scrapy's own stats at the end of the crawl."""
    incremental: dict[str, Any] | None = None
    """`api` sources with `incremental`: the run's window and the largest value seen (the load moves the state)."""

    @property
    def failures(self) -> int:
        """URLs that did not end fetched or not_modified."""
        return sum(n for k, n in self.outcomes.items() if k not in (OutcomeKind.FETCHED, OutcomeKind.NOT_MODIFIED))

    @property
    def done(self) -> int:
        """URLs that have their outcome."""
        return sum(self.outcomes.values())

    def top_errors(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` most frequent (outcome, error) pairs with a count and an example URL."""
        return [
            {
                "outcome": kind,
                "error": redact(error),
                "count": count,
                "example_url": redact(self.error_examples[(kind, error)]),
            }
            for (kind, error), count in self.errors.most_common(n)
        ]

    def saved(self) -> dict[str, Any]:
        """What a resumed crawl carries on counting from (saved with each checkpoint)."""
        return {
            "pages": self.pages,
            "records": self.records,
            "bytes": self.bytes,
            "discovered": self.discovered,
            "outcomes": dict(self.outcomes),
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Carry on from a checkpoint's counts."""
        self.pages += saved.get("pages", 0)
        self.records += saved.get("records", 0)
        self.bytes += saved.get("bytes", 0)
        self.discovered += saved.get("discovered", 0)
        self.outcomes.update(saved.get("outcomes", {}))

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.saved(),
            "failures": self.failures,
            "top_errors": self.top_errors(),
            **({"render": dict(self.render)} if self.render else {}),
            **({"scrapy": self.scrapy} if self.scrapy else {}),
            **({"incremental": self.incremental} if self.incremental is not None else {}),
        }


@dataclass(slots=True)
class SourceContext:
    """What a connector needs to run: shared fetcher, its source's run id, and an outcome sink."""

    run_id: str
    settings: Settings
    fetcher: Fetcher
    emit_outcome: Callable[[Outcome], Awaitable[None]]
    stats: SourceStats = field(default_factory=SourceStats)
    validators: Mapping[str, Validators] = field(default_factory=dict)
    """ETag / Last-Modified per URL from earlier runs (conditional requests)."""
    lastmods: Mapping[str, str] = field(default_factory=dict)
    """Sitemap ``lastmod`` per URL as of its last fetch in an earlier run (unchanged: not fetched again)."""
    incremental: CursorWindow | None = None
    """`api` sources with `incremental`: the window this run asks for (from the stored state)."""
    archiver: Archiver | None = None
    """The source's page archive (sources with ``archive: true``): every response it fetched goes there."""
    _counters: dict[tuple[str, str], Any] = field(default_factory=dict, init=False, repr=False)
    """``trawl_url_outcomes_total`` children by (source, outcome): looked up once, not per URL."""

    def archive(self, resp: Response) -> Response:
        """``resp`` queued for the page archive (written off the event loop), as is without one.

        Its ``archiving`` resolves to where it landed: the page goes on (parsing, links) meanwhile and awaits
        it (:meth:`Response.where_archived`) only for the records that point at it.
        A 304 is not archived: it has no body to extract again (the earlier run's archive holds it).
        """
        if self.archiver is None or resp.status == 304:
            return resp
        rendered = resp.body if resp.served is not None else None
        at = utcnow()
        ex = Exchange(
            resp.url,
            resp.status,
            resp.headers,
            resp.served if resp.served is not None else resp.body,
            resp.method,
            resp.request_headers,
            rendered=rendered,
            fetched_at=at,
        )
        return replace(resp, archiving=self.archiver.write(ex), archived_at=at)

    def conditional_headers(self, url: str, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        """``headers`` plus If-None-Match / If-Modified-Since for a URL fetched in an earlier run."""
        out = dict(headers or {})
        etag, last_modified = self.validators.get(url, (None, None))
        if etag:
            out["If-None-Match"] = etag
        if last_modified:
            out["If-Modified-Since"] = last_modified
        return out

    async def fetch(
        self,
        source: str,
        url: str,
        *,
        transport: TransportName,
        headers: Mapping[str, str] | None = None,
        concurrency: int | None = None,
        delay: float | None = None,
        robots: bool = True,
        adaptive: bool = True,
        park: bool = False,
        park_busy: bool = False,
        attempts: int = 0,
        started: float | None = None,
        origins: Collection[str] | None = None,
        method: str = "GET",
        body: bytes | None = None,
        reauth: Callable[[Mapping[str, str]], Awaitable[Mapping[str, str] | None]] | None = None,
        max_bytes: int | None = None,
        proxies: Sequence[str] | None = None,
        proxy_rotation: ProxyRotation | None = None,
    ) -> Response | None:
        """Fetch a URL and record exactly one outcome for it when it failed; None when it failed.

        ``headers`` go only to ``origins`` (the source's :attr:`header_origins`), on every hop.
        With ``park`` a BreakerOpen is raised instead of recorded, so the caller can
        put the URL back until the breaker closes (and record ``skipped_breaker`` later).
        With ``park_busy`` a throttled host without room raises HostBusy instead of
        holding the caller, who puts the URL back when the host has room
        (``attempts``/``started`` carry on from there).

        ``reauth``: when the URL finally fails with a 401, called once with the headers
        sent; the headers it returns (a renewed token) are tried once more.
        ``max_bytes``: a larger body cap than the setting (sitemaps); ``proxies``: the
        source's own proxy list (default: the ``proxies`` setting).
        """
        sent = headers or {}
        for last in (False, True):
            try:
                resp = await self.fetcher.get(
                    url,
                    transport=transport,
                    headers=sent,
                    concurrency=concurrency,
                    delay=delay,
                    robots=robots,
                    source=source,
                    adaptive=adaptive,
                    park=park_busy,
                    attempts=attempts,
                    started=started,
                    origins=origins,
                    method=method,
                    body=body,
                    max_bytes=max_bytes,
                    proxies=proxies,
                    proxy_rotation=proxy_rotation,
                )
                break
            except HostBusy:
                raise  # only with park_busy: the caller puts the URL back
            except BreakerOpen:
                if park:
                    raise
                await self.skipped_breaker(source, url)
                return None
            except FetchError as exc:
                renewed = None
                if not last and reauth is not None and exc.status == 401:
                    try:
                        renewed = await reauth(sent)
                    except FetchError as auth_exc:
                        exc = auth_exc
                if renewed is None:
                    await self.failed(source, url, exc)
                    return None
                sent = {**sent, **renewed}
        else:
            raise AssertionError("unreachable: the last try returns or breaks")
        self.stats.pages += 1
        self.stats.bytes += len(resp.body)
        return self.archive(resp)

    async def failed(self, source: str, url: str, exc: FetchError) -> None:
        """Record the outcome of a URL that finally failed (robots and the network guard have their own kinds)."""
        kind = OUTCOME_OF.get(type(exc), OutcomeKind.FAILED)
        if kind is OutcomeKind.FAILED:
            log.warning("url failed", url=url, error=str(exc), attempts=exc.attempts)
        await self.outcome(
            Outcome(self.run_id, source, url, kind, exc.status, exc.attempts, 0, exc.elapsed_ms, str(exc))
        )

    async def skipped_breaker(self, source: str, url: str) -> None:
        """Record that a URL was given up on because its host's breaker stayed open."""
        breaker = self.fetcher.breakers.get(host_of(url))
        await self.outcome(
            Outcome(
                self.run_id,
                source,
                url,
                OutcomeKind.SKIPPED_BREAKER,
                None,
                0,
                0,
                0,
                f"circuit breaker for {breaker.host} is {breaker.state}",
            )
        )

    async def outcome(self, outcome: Outcome) -> None:
        """Count and stage one URL outcome."""
        stats = self.stats
        kind = outcome.outcome.value
        stats.outcomes[kind] += 1
        counter = self._counters.get((outcome.source, kind))
        if counter is None:
            counter = self._counters[(outcome.source, kind)] = METRICS.outcomes.labels(outcome.source, kind)
        counter.inc()
        stats.hosts.add(host_of(outcome.url))
        if outcome.outcome not in (OutcomeKind.FETCHED, OutcomeKind.NOT_MODIFIED):
            error = outcome.error or (f"HTTP {outcome.http_status}" if outcome.http_status else kind)
            key = (kind, error)
            stats.errors[key] += 1
            stats.error_examples.setdefault(key, outcome.url)
        await self.emit_outcome(outcome)

    async def fetched(
        self,
        source: str,
        url: str,
        resp: Response,
        kind: OutcomeKind = OutcomeKind.FETCHED,
        error: str | None = None,
        *,
        lastmod: str | None = None,
    ) -> None:
        """Record the outcome of a URL whose response was received (with its validators for next time)."""
        etag, last_modified = resp.headers.get("etag"), resp.headers.get("last-modified")
        if resp.status == 304:  # a 304 may omit them; the ones we sent still hold
            kind = OutcomeKind.NOT_MODIFIED
            sent = self.validators.get(url, (None, None))
            etag, last_modified = etag or sent[0], last_modified or sent[1]
        await self.outcome(
            Outcome(
                self.run_id,
                source,
                url,
                kind,
                resp.status,
                resp.attempts,
                len(resp.body),
                resp.elapsed_ms,
                error,
                etag=etag,
                last_modified=last_modified,
                lastmod=lastmod,
                proxy=resp.proxy,
            )
        )

    async def unchanged(self, source: str, url: str, lastmod: str) -> None:
        """Record a sitemap URL not fetched because its ``lastmod`` is what it was at its last fetch."""
        await self.outcome(
            Outcome(self.run_id, source, url, OutcomeKind.NOT_MODIFIED, None, 0, 0, 0, None, lastmod=lastmod)
        )


class Connector(Protocol):
    """A source kind: ``fetch()`` yields records and records one outcome per URL it touches (and, on a durable
    frontier, the markers the crawl checkpoints by)."""

    def fetch(self) -> AsyncIterator[Record | Settled | Idle]: ...


def record_key(data: Mapping[str, Any], url: str, key_fields: list[str]) -> str | None:
    """The natural key: the URL, one field's value, or a JSON array of several (None if any is missing)."""
    if key_fields == ["url"]:
        return url
    values = []
    for name in key_fields:
        v = url if name == "url" else get_path(data, name)
        if v is None or v == "" or v == []:
            return None
        values.append(v if isinstance(v, str) else orjson.dumps(v).decode())
    return values[0] if len(values) == 1 else orjson.dumps(values).decode()


def make_record(
    source: str,
    run_id: str,
    url: str,
    fetched_at: datetime,
    data: dict[str, Any],
    key_fields: list[str],
    archived: Mapping[str, Any] | None = None,
) -> Record:
    """Wrap extracted data in its staging envelope (``archived``: where the page archive holds its response)."""
    return Record(source, record_key(data, url, key_fields), url, fetched_at, run_id, data, archived=archived)
