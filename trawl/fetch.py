"""The one request path every connector uses.

:class:`Fetcher` owns the HTTP clients (aiohttp for bulk HTML, httpx for APIs)
and applies, per host, a concurrency cap and a minimum delay between request
starts; retries transient failures with capped exponential backoff, full jitter
and ``Retry-After``; follows redirects itself so every hop passes the network
guard; and caps body size while streaming (after decompression).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import aiohttp.abc
import httpcore
import httpx
import orjson
import structlog

from trawl.breakers import BreakerRegistry, HostBreaker
from trawl.decode import ACCEPT_ENCODING, BodyDecoder, body_too_large
from trawl.errors import (
    BlockedNetworkError,
    BreakerOpen,
    FetchError,
    PermanentFetchError,
    RobotsDisallowed,
    TransientFetchError,
)
from trawl.metrics import METRICS, status_class
from trawl.netguard import GuardedBackend, GuardedResolver, NetworkGuard, RefusedAddress, Resolve, UnresolvedHost
from trawl.records import utcnow
from trawl.retry import full_jitter, is_transient_status, status_error
from trawl.robots import ROBOTS_MAX_BYTES, RobotsCache
from trawl.settings import Settings
from trawl.urls import host_of, origin_of

__all__ = ["Fetcher", "HostTurn", "Response", "TransportName"]

log = structlog.get_logger("trawl.fetch")

T = TypeVar("T")


TransportName = Literal["aiohttp", "httpx"]
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Response:
    """A fetched response: final URL, status, lower-cased headers and the whole body."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int
    elapsed_ms: int
    method: str = "GET"
    request_headers: Mapping[str, str] = field(default_factory=dict)
    """What the last hop was sent with (the clients' defaults included): what the archive stores, masked."""
    served: bytes | None = None
    """A browser page: the document as the server sent it (``body`` is then the rendered DOM)."""
    archived: Mapping[str, Any] | None = None
    """Where the page archive holds this response (``warc``, ``offset``, ``length``), once it is written there."""
    archiving: Awaitable[Mapping[str, Any]] | None = None
    """The page archive is writing this response: resolves to what ``archived`` says (:meth:`where_archived`)."""
    archived_at: datetime | None = None
    """The archive's time for it (``WARC-Date``): records from it carry the same ``fetched_at``, so re-extracting
    them later compares equal in time with what the crawl loaded."""

    async def where_archived(self) -> Mapping[str, Any] | None:
        """Where the page archive holds this response, waiting for the archive's writer if it is still at it."""
        if self.archived is None and self.archiving is not None:
            return await self.archiving
        return self.archived

    def json(self) -> Any:
        """The body parsed as JSON; a parse failure is permanent."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise PermanentFetchError(f"invalid JSON: {exc}", url=self.url, status=self.status) from None

    def text(self) -> str:
        """The body decoded with the declared charset (UTF-8 default), never raising."""
        ctype = self.headers.get("content-type", "")
        charset = "utf-8"
        for part in ctype.split(";")[1:]:
            k, _, v = part.strip().partition("=")
            if k.lower() == "charset" and v:
                charset = v.strip('"')
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _HostGate:
    """Per-host concurrency cap and minimum gap between request starts."""

    slots: asyncio.Semaphore
    delay: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_start: float = 0.0

    async def wait_turn(self) -> None:
        if self.delay <= 0:
            return
        async with self.lock:
            now = time.monotonic()
            if self.next_start > now:
                await asyncio.sleep(self.next_start - now)
            self.next_start = max(now, self.next_start) + self.delay


class HostTurn:
    """One request's turn at its host, for every kind (an async context manager, :meth:`Fetcher.turn`).

    Entering waits for the host's gate (concurrency, delay, ``Crawl-delay``) and
    passes its breaker (BreakerOpen when it is open); leaving tells the breaker
    and the in-flight/latency/status metrics how the request went. ``ok`` is the
    breaker's verdict (None: neutral, e.g. a cancelled request), ``status`` the
    HTTP status received (0: none). A FetchError (or TimeoutError) that ends the
    block counts like a failed attempt (transient ones as failures).
    """

    __slots__ = ("_breaker", "_gate", "_in_flight", "_label", "_probe", "_sent", "_source", "_url", "ok", "status")

    def __init__(self, gate: _HostGate, breaker: HostBreaker, url: str, label: str, source: str) -> None:
        self._gate = gate
        self._breaker = breaker
        self._url = url
        self._label = label
        self._source = source
        self._probe = False
        self._sent = 0.0
        self.status = 0
        self.ok: bool | None = None

    async def __aenter__(self) -> HostTurn:
        slots = self._gate.slots
        await slots.acquire()
        try:
            self._probe = self._breaker.admit(self._url)  # after waiting for a slot: it may have opened meanwhile
        except BaseException:
            slots.release()
            raise
        try:
            await self._gate.wait_turn()
        except BaseException:
            self._breaker.release(self._probe)
            slots.release()
            raise
        self._in_flight = METRICS.in_flight.labels(self._source, self._label)
        self._in_flight.inc()
        self._sent = time.monotonic()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if isinstance(exc, TimeoutError):
                self.ok = False
            elif isinstance(exc, FetchError):
                self.ok = not exc.transient
                self.status = exc.status or self.status
            source, label = self._source, self._label
            self._in_flight.dec()
            METRICS.request_seconds.labels(source, label).observe(time.monotonic() - self._sent)
            METRICS.requests.labels(source, label, status_class(self.status)).inc()
            if self.ok is None:
                self._breaker.release(self._probe)
            else:
                self._breaker.record(self.ok, self._probe)
        finally:
            self._gate.slots.release()


class _Transport(Protocol):
    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        max_bytes: int,
        *,
        truncate: bool = False,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request (a GET unless ``method`` says otherwise, with ``body``); a response body over ``max_bytes``
        fails, or with ``truncate`` is cut there (robots.txt)."""
        ...

    async def close(self) -> None: ...


class _AiohttpTransport:
    def __init__(self, settings: Settings, guard: NetworkGuard) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
            ),
            connector=aiohttp.TCPConnector(
                limit=settings.total_concurrency, ttl_dns_cache=300, resolver=GuardedResolver(guard)
            ),
            headers={"User-Agent": settings.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            auto_decompress=False,  # bodies are inflated by trawl's bounded decoder (trawl.decode)
        )

    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        max_bytes: int,
        *,
        truncate: bool = False,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            async with self._session.request(
                method, url, headers=headers or None, data=body, allow_redirects=False
            ) as resp:
                declared = resp.content_length
                hdrs = {k.lower(): v for k, v in resp.headers.items()}
                if declared is not None and declared > max_bytes and resp.status < 300 and not truncate:
                    raise body_too_large(url, max_bytes)
                decoder = BodyDecoder(hdrs.get("content-encoding"), max_bytes, url, truncate=truncate)
                if declared is not None and declared <= max_bytes and decoder.identity:
                    # The size is known and within the cap: one read, no chunk loop.
                    return resp.status, hdrs, await resp.read()
                chunks = []
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    chunks.append(decoder.decode(chunk))
                    if decoder.full:
                        break
                chunks.append(decoder.flush())
                return resp.status, hdrs, b"".join(chunks)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, RefusedAddress):
                raise BlockedNetworkError(str(exc.os_error), url=url) from None
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except aiohttp.ClientError as exc:
            raise PermanentFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc

    async def close(self) -> None:
        await self._session.close()


class _GuardedHttpxTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport whose connection pool connects through :class:`GuardedBackend`.

    httpx 0.28 takes no ``network_backend`` (encode/httpx#3749 adds it), so the pool
    the base class built is replaced by the same httpcore pool with the guarded
    backend: httpx keeps mapping httpcore's errors and wrapping the body stream.
    """

    def __init__(self, guard: NetworkGuard, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard),
        )


async def _check_location(response: httpx.Response) -> None:
    """A redirect's Location that cannot be followed fails the URL as trawl's own redirect handling words it
    (httpx parses it for ``next_request`` even when it follows nothing, and calls the failure a protocol error)."""
    location = response.headers.get("location")
    if location is None or not response.is_redirect:
        return
    url = str(response.request.url)
    try:
        response.request.url.join(location)
    except httpx.InvalidURL as exc:
        raise PermanentFetchError(f"redirect to a bad Location {location!r}: {exc}", url=url) from None
    _redirect_target(url, location)


class _HttpxTransport:
    def __init__(self, settings: Settings, guard: NetworkGuard) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            transport=_GuardedHttpxTransport(guard, httpx.Limits(max_connections=settings.total_concurrency)),
            headers={"User-Agent": settings.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            follow_redirects=False,
            event_hooks={"response": [_check_location]},
            # No proxy from HTTP(S)_PROXY/ALL_PROXY (it would connect to the target, past the guard) and no
            # credentials from ~/.netrc (they would go to whatever host a redirect names).
            trust_env=False,
        )

    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        max_bytes: int,
        *,
        truncate: bool = False,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            async with self._client.stream(method, url, headers=dict(headers), content=body) as resp:
                hdrs = {k.lower(): v for k, v in resp.headers.items()}
                decoder = BodyDecoder(hdrs.get("content-encoding"), max_bytes, url, truncate=truncate)
                # Raw bytes: httpx would inflate each chunk whole before any cap of ours applied.
                chunks = []
                async for chunk in resp.aiter_raw(_CHUNK):
                    chunks.append(decoder.decode(chunk))
                    if decoder.full:
                        break
                chunks.append(decoder.flush())
                return resp.status_code, hdrs, b"".join(chunks)
        except RefusedAddress as exc:  # from GuardedBackend, where the connection is made
            raise BlockedNetworkError(str(exc), url=url) from None
        except UnresolvedHost as exc:
            raise TransientFetchError(str(exc), url=url) from None
        except httpx.TransportError as exc:  # connect/read errors, timeouts, truncated bodies
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise PermanentFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc

    async def close(self) -> None:
        await self._client.aclose()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None


class Fetcher:
    """Every request of a process goes through one Fetcher (an async context manager).

    Per request: robots.txt (once per origin), then per attempt and redirect hop:
    the network guard, the host's gate (concurrency, delay, ``Crawl-delay``), the
    host's circuit breaker, the transport with its size and time limits.
    """

    def __init__(
        self, settings: Settings, breakers: BreakerRegistry | None = None, *, resolver: Resolve | None = None
    ) -> None:
        self._settings = settings
        self._guard = NetworkGuard(settings.allowed_networks, resolver=resolver)
        self._gates: dict[str, _HostGate] = {}
        self._transports: dict[str, _Transport] = {}
        self.breakers = breakers or BreakerRegistry(settings.breaker_fail_max, settings.breaker_reset_timeout)
        self.robots = RobotsCache(
            _agent_token(settings.user_agent),
            unavailable=settings.robots_unavailable,
            failure_ttl=settings.robots_failure_ttl,
        )
        self.resources: dict[str, Any] = {}
        """Things other request paths share through this Fetcher (the browser pool), closed with it."""
        self._closers: list[Callable[[], Awaitable[None]]] = []

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def guard(self) -> NetworkGuard:
        """The network guard every request of this Fetcher passes (also Scrapy's, for `spider` sources)."""
        return self._guard

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` when the Fetcher closes (last registered, first run)."""
        self._closers.append(closer)

    @contextlib.asynccontextmanager
    async def slot(
        self,
        url: str,
        *,
        concurrency: int | None = None,
        delay: float | None = None,
        robots: bool = True,
        source: str = "-",
    ) -> AsyncIterator[HostTurn]:
        """Hold one request's place under the per-host rules, for a request this Fetcher does not send itself.

        The network guard, robots.txt, then the host's turn (:meth:`turn`), exactly as
        for :meth:`get`: the block runs when the request may go. It may set the turn's
        ``status``; when it ends normally the request counts as a success.
        """
        await self._guard.check(url, _http_host(url))
        if robots:
            await self._obey_robots(url, concurrency, delay)
        async with self.turn(host_of(url), url, concurrency=concurrency, delay=delay, source=source) as turn:
            yield turn
            turn.ok = True
            turn.status = turn.status or 200

    def turn(self, host: str, url: str, *, concurrency: int | None, delay: float | None, source: str) -> HostTurn:
        """A request's turn at its host (``async with``): gate, breaker and metrics, as for every attempt."""
        return HostTurn(self._gate(host, concurrency, delay), self.breakers.get(host), url, METRICS.host(host), source)

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                await closer()
            except Exception as exc:  # closing one resource must not keep the others open
                log.warning("close failed", error=f"{type(exc).__name__}: {exc}")
        for transport in self._transports.values():
            await transport.close()
        self._transports.clear()

    def _transport(self, name: TransportName) -> _Transport:
        if name not in self._transports:
            self._transports[name] = (
                _AiohttpTransport(self._settings, self._guard)
                if name == "aiohttp"
                else _HttpxTransport(self._settings, self._guard)
            )
        return self._transports[name]

    def _gate(self, host: str, concurrency: int | None, delay: float | None) -> _HostGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = _HostGate(
                slots=asyncio.Semaphore(concurrency or self._settings.per_host_concurrency),
                delay=self._settings.per_host_delay if delay is None else delay,
            )
            self._gates[host] = gate
        return gate

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self._settings
        sleep = full_jitter(attempt, s.backoff_base, s.backoff_max)
        if retry_after is not None:
            sleep = max(sleep, min(retry_after, s.backoff_max))
        return sleep

    async def _obey_robots(self, url: str, concurrency: int | None, delay: float | None) -> None:
        async def fetch(robots_url: str) -> tuple[int, bytes]:
            # With the asking source's limits: this may be the first request to the host, which sets up its gate.
            # Cut at 500 KiB rather than refused: a longer file's first 500 KiB are its rules (RFC 9309 2.5).
            resp = await self.get(
                robots_url,
                robots=False,
                max_bytes=ROBOTS_MAX_BYTES,
                truncate=True,
                concurrency=concurrency,
                delay=delay,
            )
            return resp.status, resp.body

        rules = await self.robots.rules(url, fetch)
        if rules.throttled:
            raise TransientFetchError(
                f"robots.txt throttled ({rules.unavailable}), asked again later", url=url, status=429
            )
        if not rules.allows(url, self.robots.agent):
            if rules.unavailable is not None and rules.status is None:
                # Unreachable: not requested (RFC 9309: disallow), and the outcome says why rather than `robots`.
                raise TransientFetchError(
                    f"robots.txt unreachable ({rules.unavailable}): not requested (robots_unavailable)", url=url
                )
            if rules.unavailable is not None:
                raise RobotsDisallowed(
                    f"robots.txt unavailable ({rules.unavailable}): disallow all (robots_unavailable)", url=url
                )
            raise RobotsDisallowed("disallowed by robots.txt", url=url)
        crawl_delay = rules.crawl_delay(self.robots.agent)
        if crawl_delay:
            gate = self._gate(host_of(url), concurrency, delay)
            gate.delay = max(gate.delay, min(crawl_delay, self._settings.max_crawl_delay))

    async def get(
        self,
        url: str,
        *,
        transport: TransportName = "aiohttp",
        headers: Mapping[str, str] | None = None,
        concurrency: int | None = None,
        delay: float | None = None,
        robots: bool = True,
        max_bytes: int | None = None,
        truncate: bool = False,
        source: str = "-",
        origins: Collection[str] | None = None,
        method: str = "GET",
        body: bytes | None = None,
    ) -> Response:
        """GET a URL through robots.txt, politeness, the breaker, retries, redirects and limits.

        ``method`` and ``body`` send something else (an API's POST with a JSON body): the same
        path, retries included. A 303 (and a 301/302 after a POST) continues as a GET without the
        body, as browsers do; a 307/308 resends it, but never to an origin outside ``origins``.

        ``headers`` (a source's credentials among them) go only to ``origins``
        (:func:`trawl.urls.origin_of` spellings; default: the origin of ``url``):
        a request or redirect hop to any other origin is sent without them, as
        browsers and ``requests`` do.

        ``truncate``: a body over ``max_bytes`` is cut there instead of failing (robots.txt).

        Raises FetchError (with ``attempts`` and ``elapsed_ms`` set) when the URL
        finally fails; a final status other than 2xx or 304 is an error too.
        BreakerOpen means the URL was not (or no longer) requested.
        """
        started = time.monotonic()
        scope = frozenset(origins) if origins is not None else frozenset({origin_of(url)})
        if robots:
            try:
                _http_host(url)
            except PermanentFetchError:
                robots = False  # not a URL trawl can request: it fails on its first attempt, no robots.txt asked
        if robots:
            try:
                await self._obey_robots(url, concurrency, delay)
            except BlockedNetworkError:
                pass  # robots.txt's host is forbidden: the URL's own attempt meets the guard and says so
            except FetchError as exc:
                exc.attempts, exc.elapsed_ms = 0, int((time.monotonic() - started) * 1000)
                raise

        async def once(attempt: int) -> Response:
            final_url, status, hdrs, content, sent = await self._attempt(
                url,
                transport,
                headers or {},
                concurrency,
                delay,
                max_bytes or self._settings.max_body_bytes,
                robots,
                source,
                scope,
                truncate=truncate,
                method=method,
                body=body,
            )
            if 200 <= status < 300 or status == 304:
                elapsed = int((time.monotonic() - started) * 1000)
                return Response(final_url, status, hdrs, content, attempt, elapsed, sent[0], sent[1])
            error = status_error(status, final_url)
            error.retry_after = _retry_after(hdrs)
            raise error

        return await self.retrying(once, url=url, source=source, started=started)

    async def retrying(
        self, attempt: Callable[[int], Awaitable[T]], *, url: str, source: str = "-", started: float | None = None
    ) -> T:
        """Run ``attempt(n)`` (n = 1, 2, ...) until it returns: the one retry loop of every kind.

        A transient FetchError is retried up to ``max_retries`` times after a
        backoff with full jitter (at least the error's ``Retry-After``, capped);
        the last error is raised with ``attempts`` and ``elapsed_ms`` set.
        BreakerOpen propagates at once (nothing was sent).
        """
        started = time.monotonic() if started is None else started
        retries = self._settings.max_retries
        attempts = 0
        try:
            for n in range(retries + 1):
                attempts += 1
                try:
                    return await attempt(attempts)
                except BreakerOpen:
                    attempts -= 1
                    raise
                except FetchError as exc:
                    if not exc.transient or n == retries:
                        raise
                    pause = self._backoff(n, exc.retry_after)
                    METRICS.retries.labels(source, METRICS.host(host_of(exc.url))).inc()
                    log.info("retrying", url=url, attempt=attempts, error=str(exc), sleep_s=round(pause, 3))
                await asyncio.sleep(pause)
            raise AssertionError("unreachable: the last attempt returns or raises")
        except FetchError as exc:
            exc.attempts = attempts
            exc.elapsed_ms = int((time.monotonic() - started) * 1000)
            raise

    async def _attempt(
        self,
        url: str,
        transport: TransportName,
        headers: Mapping[str, str],
        concurrency: int | None,
        delay: float | None,
        max_bytes: int,
        robots: bool,
        source: str = "-",
        origins: frozenset[str] = frozenset(),
        *,
        truncate: bool = False,
        method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[str, int, dict[str, str], bytes, tuple[str, dict[str, str]]]:
        client = self._transport(transport)
        s = self._settings
        current = url
        for hop in range(s.max_redirects + 1):
            hostname = _http_host(current)
            await self._guard.check(current, hostname)
            if hop and robots:  # a redirect target answers to its own robots.txt (as in Scrapy)
                await self._obey_robots(current, concurrency, delay)
            async with self.turn(
                host_of(current), current, concurrency=concurrency, delay=delay, source=source
            ) as turn:
                try:
                    async with asyncio.timeout(s.total_timeout):
                        sent = headers if origin_of(current) in origins else {}  # credentials stay at home
                        status, hdrs, content = await client.get(
                            current, sent, max_bytes, truncate=truncate, method=method, body=body
                        )
                except TimeoutError:
                    raise TransientFetchError(f"timed out after {s.total_timeout}s", url=current) from None
                except FetchError:
                    raise
                except Exception as exc:  # whatever else sending this hop raised ends this URL, not its source
                    raise PermanentFetchError(f"{type(exc).__name__}: {exc}", url=current) from exc
                turn.status, turn.ok = status, not is_transient_status(status)
            if status in _REDIRECT_STATUS and "location" in hdrs:
                current = _redirect_target(current, hdrs["location"])
                if status == 303 or (status in (301, 302) and method == "POST"):
                    method, body = "GET", None  # as browsers and requests do
                elif body is not None and origin_of(current) not in origins:
                    raise PermanentFetchError(
                        f"{status} redirect to {current}: the request body is not resent to another origin", url=url
                    )
                continue
            defaults = {"User-Agent": s.user_agent, "Accept-Encoding": ACCEPT_ENCODING}  # the clients' own
            return current, status, hdrs, content, (method, {**defaults, **sent})
        raise PermanentFetchError(f"more than {s.max_redirects} redirects", url=url)


def _http_host(url: str) -> str:
    """The host name of an http(s) URL; PermanentFetchError naming the URL when it is not one trawl can request
    (another scheme, no host, a malformed host or port)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (validates the port: a number in 0-65535)
    except ValueError as exc:
        raise PermanentFetchError(f"malformed URL {url!r}: {exc}", url=url) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentFetchError(f"not an http(s) URL: {url}", url=url)
    return parts.hostname


def _redirect_target(url: str, location: str) -> str:
    """Where a redirect from ``url`` leads; PermanentFetchError naming both when its Location cannot be followed."""
    try:
        target = urljoin(url, location.strip())
        _http_host(target)
    except (ValueError, PermanentFetchError) as exc:
        error = exc.args[0] if isinstance(exc, PermanentFetchError) else str(exc)
        raise PermanentFetchError(f"redirect to a bad Location {location!r}: {error}", url=url) from None
    return target


def _agent_token(user_agent: str) -> str:
    """The product token robots.txt groups match against (``trawl`` in ``trawl/0.1 (+url)``)."""
    return user_agent.split("/", 1)[0].split()[0] if user_agent.strip() else "*"
