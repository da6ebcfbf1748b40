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
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType, TracebackType
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
    HostBusy,
    PermanentFetchError,
    ProxyFailed,
    ProxyUnavailable,
    RobotsDisallowed,
    ThrottleBudgetSpent,
    Throttled,
    TransientFetchError,
)
from trawl.metrics import METRICS, OTHER_HOST, status_class
from trawl.netguard import GuardedBackend, GuardedResolver, NetworkGuard, RefusedAddress, Resolve, UnresolvedHost
from trawl.proxies import Proxy, ProxyPool, ProxyRotation, proxy_label
from trawl.retry import full_jitter, is_throttle, is_transient_status, retry_after, status_error
from trawl.robots import ROBOTS_MAX_BYTES, RobotsCache
from trawl.settings import Settings
from trawl.urls import host_of, origin_of, split_plain

__all__ = ["Fetcher", "HostTurn", "Response", "TransportName"]

log = structlog.get_logger("trawl.fetch")

T = TypeVar("T")


TransportName = Literal["aiohttp", "httpx"]
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_PROXY_RETRIES = 16  # proxy failures one URL may meet before the last one ends it
_CHUNK = 64 * 1024
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_UTF8 = frozenset({"utf-8", "utf8"})


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

    proxy: str | None = None
    """The proxy that served the final response (``scheme://host:port``), when one was used."""

    def json(self) -> Any:
        """The body parsed as JSON; a parse failure is permanent."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise PermanentFetchError(f"invalid JSON: {exc}", url=self.url, status=self.status) from None

    @property
    def charset(self) -> str:
        """The declared charset (``Content-Type``), UTF-8 when none is."""
        ctype = self.headers.get("content-type", "")
        charset = "utf-8"
        for part in ctype.split(";")[1:]:
            k, _, v = part.strip().partition("=")
            if k.lower() == "charset" and v:
                charset = v.strip('"')
        return charset

    def text(self) -> str:
        """The body decoded with the declared charset (UTF-8 default), never raising."""
        try:
            return self.body.decode(self.charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    def markup(self) -> str | bytes:
        """What the HTML parser is given: the body as it is when it is UTF-8 (Lexbor reads UTF-8 bytes as
        :meth:`text` would decode them, without the copy), else :meth:`text`."""
        return self.body if self.charset.lower() in _UTF8 else self.text()


# A throttle signal's first raise of a host's delay (seconds between request starts); each further one doubles it.
_THROTTLE_STEP = 0.1
# Latency-aware easing: a host is "slowing" when its smoothed response time is both this many times its usual one
# and this many seconds above it (loopback and busy event loops jitter by milliseconds, not by half a second).
_SLOW_RATIO = 3.0
_SLOW_MARGIN = 0.5


class _Meters:
    """One source's request metrics at one host, their label children looked up once (``labels()`` costs a lock,
    a tuple and a dict lookup: once per source and host instead of three times per request)."""

    __slots__ = ("_by_status", "_label", "_source", "in_flight", "seconds")

    def __init__(self, source: str, label: str) -> None:
        self._source, self._label = source, label
        self.in_flight = METRICS.in_flight.labels(source, label)
        self.seconds = METRICS.request_seconds.labels(source, label)
        self._by_status: dict[int, Any] = {}

    def answered(self, status: int, latency: float) -> None:
        """A request ended: its latency and its status class counted."""
        self.in_flight.dec()
        self.seconds.observe(latency)
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = METRICS.requests.labels(self._source, self._label, status_class(status))
        counter.inc()


class _HostGate:
    """One host's rate, shared by every request to it (every kind, every source of the process).

    At most ``limit`` requests in flight (the configured ``cap``, lowered while the
    host throttles or slows down) and at least ``delay`` (politeness, ``Crawl-delay``)
    plus ``extra`` seconds between request starts. A throttle signal (429, 503 with
    ``Retry-After``) pauses the whole host for its ``Retry-After`` (capped by
    ``backoff_max``), halves ``limit`` (floor 1) and raises ``extra``, once per
    window (signals for requests sent before the last cut do not cut again);
    successes grow ``limit`` back by about one per window and shrink ``extra``
    (AIMD, as TCP). A host that throttles at the floor without one good answer for
    ``throttle_budget`` seconds is given up: its waiting and later requests raise
    ThrottleBudgetSpent, for another ``throttle_budget`` seconds (then it is tried
    again).

    Requests that may not wait (``park``) are told HostBusy while the throttled host
    has no room, and called back (:meth:`park`) when it has.
    """

    __slots__ = (
        "_label",
        "_meters",
        "_parked",
        "_settings",
        "_timer",
        "_timer_at",
        "_waiters",
        "active",
        "baseline",
        "cap",
        "delay",
        "ewma",
        "extra",
        "given_up",
        "given_up_until",
        "host",
        "last_cut",
        "last_status",
        "limit",
        "next_start",
        "paused_until",
        "signals",
        "throttled_at",
        "throttled_since",
        "throttling",
        "windows",
    )

    def __init__(self, host: str, cap: int, delay: float, settings: Settings) -> None:
        self.host = host
        self._label = METRICS.host(host)
        self._settings = settings
        self.cap = cap
        self.limit = float(cap)
        self.delay = delay
        self.extra = 0.0
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._parked: deque[Callable[[], None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.next_start = 0.0
        self.paused_until = 0.0
        self.last_cut = 0.0  # when limit was last cut: answers to requests sent before it say nothing new
        self.windows = 0  # throttle windows since the last good answer (the backoff exponent without Retry-After)
        self.throttling = False  # from the first throttle signal until the rate is all the way back
        self.throttled_at = 0.0
        self.throttled_since: float | None = None  # first throttle signal since the last good answer
        self.last_status: int | None = None
        self.given_up = False
        self.given_up_until = 0.0
        self.signals: Counter[str] = Counter()  # throttle signals per source
        self.ewma: float | None = None  # smoothed response time (adaptive sources only)
        self.baseline: float | None = None  # the host's usual response time
        self._meters: dict[str, _Meters] = {}
        self._show()

    @property
    def label(self) -> str:
        """The host's metrics label (``other`` past the host cap)."""
        return self._label

    def meters(self, source: str) -> _Meters:
        """``source``'s request metrics at this host; the first time, its throttle counter is made too (at 0, so a
        burst of signals inside one scrape shows as an increase, not as a new series)."""
        m = self._meters.get(source)
        if m is None:
            m = self._meters[source] = _Meters(source, self._label)
            if source not in self.signals:
                self.signals[source] = 0
                METRICS.throttle_signals.labels(source, self._label).inc(0)
        return m

    @property
    def slots(self) -> int:
        """Requests that may be in flight now."""
        return max(1, int(self.limit))

    @property
    def gap(self) -> float:
        """Seconds between request starts now."""
        return self.delay + self.extra

    def _show(self) -> None:
        if self._label == OTHER_HOST:
            return  # one gauge for many hosts would show whichever changed last
        METRICS.host_concurrency.labels(self._label).set(self.slots)
        METRICS.host_delay.labels(self._label).set(self.gap)

    def raise_delay(self, delay: float) -> None:
        """At least ``delay`` seconds between starts from now on (robots.txt's ``Crawl-delay``)."""
        if delay > self.delay:
            self.delay = delay
            self._show()

    # --- admission ---------------------------------------------------------------------------------------------------

    def check(self, url: str) -> None:
        """Raise ThrottleBudgetSpent while the host is given up (for ``throttle_budget`` seconds; then it is tried
        again, and a host still throttling spends a new budget)."""
        if self.given_up:
            if time.monotonic() < self.given_up_until:
                raise ThrottleBudgetSpent(self.host, url, self.last_status, self._settings.throttle_budget)
            self.given_up, self.throttled_since, self.windows = False, None, 0

    def crowded(self) -> bool:
        """Whether a request that may not wait should be parked: the host throttles and has no room now."""
        if not self.throttling:
            return False
        return self.paused_until > time.monotonic() or self.active + len(self._waiters) >= self.slots

    def park(self, callback: Callable[[], None], first: bool = False) -> None:
        """Call ``callback`` when the host may take another request (or has been given up); ``first``: before the
        others waiting (a URL under way)."""
        if first:
            self._parked.appendleft(callback)
        else:
            self._parked.append(callback)
        self._unpark()

    async def acquire(self) -> None:
        """Wait for one of the host's slots (first come, first served)."""
        if self.active < self.slots and not self._waiters:
            self.active += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the releaser hands its slot over (active stays counted)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the next waiter, or (room permitting) to a parked request."""
        self.active -= 1
        self._wake()
        self._unpark()

    def _wake(self) -> None:
        while self._waiters and self.active < self.slots:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    def _unpark(self) -> None:
        if not self._parked:
            return
        now = time.monotonic()
        if self.given_up or not self.throttling:
            room = len(self._parked)
        elif self.paused_until > now:
            self._look_again(self.paused_until)  # wake them when the pause is over
            return
        else:
            room = self.slots - self.active - len(self._waiters)
        for _ in range(min(room, len(self._parked))):
            self._parked.popleft()()
        if self._parked:
            # Look again in a while even if nothing happens here: a woken request may never come back to the gate
            # (it failed before, or its crawl stopped), and the others must not wait for it for ever.
            self._look_again(now + 1.0)

    def _look_again(self, at: float) -> None:
        """Run :meth:`_unpark` at ``at`` (monotonic), unless it is due to run earlier."""
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._unpark()

    async def wait_turn(self, url: str, park: bool = False) -> None:
        """Wait out the host's pause and its gap between request starts; with ``park``, a pause that began while
        this request waited its turn raises HostBusy (its slot goes back, and URLs already under way go first)."""
        while True:
            self.check(url)
            now = time.monotonic()
            if park and self.paused_until > now:
                raise HostBusy(self.host, url, self.park)
            at = max(now, self.paused_until, self.next_start)
            if at <= now:
                gap = self.gap
                if gap > 0:
                    self.next_start = now + gap
                return
            await asyncio.sleep(at - now)  # then look again: a throttle signal may have paused the host meanwhile

    # --- feedback ----------------------------------------------------------------------------------------------------

    def throttled(self, status: int, after: float | None, sent: float, source: str) -> None:
        """A response asked us to slow down: pause the host, cut its rate (once per window), maybe give it up."""
        s = self._settings
        now = time.monotonic()
        self.signals[source] += 1
        METRICS.throttle_signals.labels(source, self._label).inc()
        self.last_status = status
        if self.throttled_since is None:
            self.throttled_since = now
        if after is not None:
            pause = min(after, s.backoff_max)
        else:
            pause = min(s.backoff_max, s.backoff_base * 2 ** min(self.windows, 32))
        self.paused_until = max(self.paused_until, now + pause)
        if sent >= self.last_cut:  # the first answer of a new window: react once
            self.last_cut = now
            self.windows += 1
            self.limit = max(1.0, self.limit / 2)
            # At most a quarter of the pause: enough to space a rate-limited host's requests, not so much that a host
            # refusing each URL's first request a while lets only one request through per pause.
            self.extra = min(s.max_crawl_delay, max(2 * self.extra, _THROTTLE_STEP), max(pause / 4, _THROTTLE_STEP))
            self._show()
        if not self.throttling:
            self.throttling, self.throttled_at = True, now
            log.warning(
                "host throttled",
                host=self.host,
                status=status,
                retry_after_s=after,
                pause_s=round(pause, 3),
                concurrency=self.slots,
                delay_s=round(self.gap, 3),
            )
        if self.limit <= 1 and now - self.throttled_since >= s.throttle_budget and not self.given_up:
            self.given_up, self.given_up_until = True, now + s.throttle_budget
            log.error(
                "host given up: throttled past the budget",
                host=self.host,
                budget_s=s.throttle_budget,
                status=status,
                signals=sum(self.signals.values()),
            )
        self._unpark()

    def answered(self, sent: float, latency: float | None) -> None:
        """A good answer (``latency`` given for adaptive sources): grow the rate back, ease a slowing host."""
        self.throttled_since = None
        self.windows = 0
        slowing = False
        if latency is not None:
            ewma = latency if self.ewma is None else 0.8 * self.ewma + 0.2 * latency
            self.ewma = ewma
            base = self.baseline
            # The usual response time: the lowest seen, drifting up slowly so a host that stays slower is accepted.
            base = ewma if base is None else min(ewma, base + 0.01 * (ewma - base))
            self.baseline = base
            slowing = ewma > _SLOW_RATIO * base and ewma - base > _SLOW_MARGIN
        if slowing:
            if sent >= self.last_cut and self.limit > 1:
                self.last_cut = time.monotonic()
                self.limit = max(1.0, self.limit * 0.75)
                self._show()
            return
        if self.limit >= self.cap and not self.extra and not self.throttling:
            return
        before = (self.slots, self.extra)
        if self.limit < self.cap:
            self.limit = min(float(self.cap), self.limit + 1 / self.limit)
        if self.extra:
            self.extra = max(0.0, self.extra - max(0.01, 0.05 * self.extra))
        if (self.slots, self.extra) != before:
            self._show()
        if self.throttling and self.limit >= self.cap and not self.extra:
            self.throttling = False
            log.info(
                "host recovered",
                host=self.host,
                seconds=round(time.monotonic() - self.throttled_at, 3),
                signals=sum(self.signals.values()),
            )
        self._wake()
        self._unpark()


class HostTurn:
    """One request's turn at its host, for every kind (an async context manager, :meth:`Fetcher.turn`).

    Entering waits for the host's gate (its adaptive concurrency, delay and
    ``Crawl-delay``, a throttled host's pause) and passes its breaker (BreakerOpen
    when it is open); with ``park`` a throttled host with no room raises HostBusy
    instead of waiting, and a host given up raises ThrottleBudgetSpent. Leaving
    tells the gate, the breaker and the in-flight/latency/status metrics how the
    request went: :meth:`answered` with the response's status and headers, or the
    FetchError (or TimeoutError) that ends the block. ``ok`` is the breaker's
    verdict (None: neutral, e.g. a cancelled request or a throttle signal).
    """

    __slots__ = (
        "_adaptive",
        "_breaker",
        "_gate",
        "_meters",
        "_park",
        "_probe",
        "_sent",
        "_source",
        "_throttle",
        "_url",
        "ok",
        "status",
    )

    def __init__(
        self,
        gate: _HostGate,
        breaker: HostBreaker,
        url: str,
        source: str,
        *,
        adaptive: bool = True,
        park: bool = False,
    ) -> None:
        self._gate = gate
        self._breaker = breaker
        self._url = url
        self._meters = gate.meters(source)
        self._source = source
        self._adaptive = adaptive
        self._park = park
        self._probe = False
        self._sent = 0.0
        self._throttle: tuple[float | None] | None = None  # (Retry-After,) of a throttle signal
        self.status = 0
        self.ok: bool | None = None

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        """The response's status and headers: a throttle signal, a failure (5xx) or a good answer."""
        self.status = status
        after = retry_after(headers)
        if is_throttle(status, after):
            self._throttle, self.ok = (after,), None
        else:
            self.ok = not is_transient_status(status)

    async def __aenter__(self) -> HostTurn:
        gate = self._gate
        gate.check(self._url)
        if self._park and gate.crowded():
            raise HostBusy(gate.host, self._url, gate.park)
        await gate.acquire()
        try:
            self._probe = self._breaker.admit(self._url)  # after waiting for a slot: it may have opened meanwhile
        except BaseException:
            gate.release()
            raise
        try:
            await gate.wait_turn(self._url, self._park)
        except BaseException:
            self._breaker.release(self._probe)
            gate.release()
            raise
        self._meters.in_flight.inc()
        self._sent = time.monotonic()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gate = self._gate
        try:
            if isinstance(exc, TimeoutError):
                self.ok = False
            elif isinstance(exc, Throttled):
                self._throttle, self.ok = (exc.retry_after,), None
                self.status = exc.status or self.status
            elif isinstance(exc, ProxyFailed | ProxyUnavailable):
                self.ok = None  # the proxy's fault, not the host's: its own breaker counts it
            elif isinstance(exc, FetchError):
                self.ok = not exc.transient
                self.status = exc.status or self.status
            latency = time.monotonic() - self._sent
            self._meters.answered(self.status, latency)
            if self._throttle is not None:
                # Neither a success nor a failure for the breaker (a half-open probe waits for its verdict); the
                # gate pauses and slows the host.
                self._breaker.release(self._probe)
                gate.throttled(self.status, self._throttle[0], self._sent, self._source)
            elif self.ok is None:
                self._breaker.release(self._probe)
            else:
                self._breaker.record(self.ok, self._probe)
                if self.ok:
                    gate.answered(self._sent, latency if self._adaptive else None)
        finally:
            gate.release()


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
        proxy: str | None = None,
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
        # aiohttp resends an idempotent request once on a fresh connection when the server drops one (RFC 9112
        # 9.3.1): a second attempt that trawl's retry loop, breaker and metrics never see. trawl retries itself.
        self._session._retry_connection = False

    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        max_bytes: int,
        *,
        truncate: bool = False,
        method: str = "GET",
        body: bytes | None = None,
        proxy: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            async with self._session.request(
                method, url, headers=headers or None, data=body, allow_redirects=False, proxy=proxy
            ) as resp:
                if proxy is not None and resp.status == 407:
                    raise ProxyFailed(f"proxy {proxy_label(proxy)} refused us (407)", url=url, status=407)
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
                where = f"proxy {proxy_label(proxy)}: " if proxy is not None else ""
                raise BlockedNetworkError(where + str(exc.os_error), url=url) from None
            if proxy is not None:
                raise ProxyFailed(f"proxy {proxy_label(proxy)}: {type(exc).__name__}: {exc}", url=url) from exc
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except aiohttp.ClientHttpProxyError as exc:  # the proxy answered CONNECT with an error (407, 502, ...)
            raise ProxyFailed(f"proxy {proxy_label(proxy or '')}: CONNECT answered {exc.status}", url=url) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if proxy is not None:  # the connection is to the proxy: a target that fails gets a 502 from it
                raise ProxyFailed(f"proxy {proxy_label(proxy)}: {type(exc).__name__}: {exc}", url=url) from exc
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

    def __init__(self, guard: NetworkGuard, limits: httpx.Limits, proxy: str | None = None) -> None:
        super().__init__(limits=limits)
        if proxy is None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=GuardedBackend(guard),
            )
            return
        # As httpx builds its proxy pool, with the guarded backend: the guard checks the proxy's own address.
        p = httpx.Proxy(proxy)
        self._pool = httpcore.AsyncHTTPProxy(
            proxy_url=httpcore.URL(
                scheme=p.url.raw_scheme, host=p.url.raw_host, port=p.url.port, target=p.url.raw_path
            ),
            proxy_auth=p.raw_auth,
            proxy_headers=p.headers.raw,
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
    def __init__(self, settings: Settings, guard: NetworkGuard, proxy: str | None = None) -> None:
        self._proxy = proxy
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            transport=_GuardedHttpxTransport(guard, httpx.Limits(max_connections=settings.total_concurrency), proxy),
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
        proxy: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        # ``proxy`` is this client's own (one client per proxy): httpx sets proxies per client, not per request.
        proxy = self._proxy
        try:
            async with self._client.stream(method, url, headers=dict(headers), content=body) as resp:
                if proxy is not None and resp.status_code == 407:
                    raise ProxyFailed(f"proxy {proxy_label(proxy)} refused us (407)", url=url, status=407)
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
        except (httpx.ProxyError, httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            if proxy is not None:  # the connection is to the proxy: a target that fails gets a 502 from it
                raise ProxyFailed(f"proxy {proxy_label(proxy)}: {type(exc).__name__}: {exc}", url=url) from exc
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except httpx.TransportError as exc:  # connect/read errors, timeouts, truncated bodies
            raise TransientFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise PermanentFetchError(f"{type(exc).__name__}: {exc}", url=url) from exc

    async def close(self) -> None:
        await self._client.aclose()


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
        self._restored: dict[str, dict[str, Any]] = {}  # hosts' rates taken over from another shard, applied lazily
        self._transports: dict[tuple[str, str | None], _Transport] = {}
        self.breakers = breakers or BreakerRegistry(settings.breaker_fail_max, settings.breaker_reset_timeout)
        self.proxy_breakers = BreakerRegistry(settings.breaker_fail_max, settings.breaker_reset_timeout)
        """One breaker per proxy (``proxy scheme://host:port``), shared by every source that uses it."""
        self._pools: dict[tuple[tuple[str, ...], str], ProxyPool] = {}
        self.robots = RobotsCache(
            _agent_token(settings.user_agent),
            unavailable=settings.robots_unavailable,
            failure_ttl=settings.robots_failure_ttl,
        )
        self.resources: dict[str, Any] = {}
        """Things other request paths share through this Fetcher (the browser pool), closed with it."""
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._client_headers: Mapping[str, str] = MappingProxyType(
            {"User-Agent": settings.user_agent, "Accept-Encoding": ACCEPT_ENCODING}
        )
        """What the HTTP clients send on every request themselves (the archive's request records show it)."""

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
        adaptive: bool = True,
        park: bool = False,
    ) -> AsyncIterator[HostTurn]:
        """Hold one request's place under the per-host rules, for a request this Fetcher does not send itself.

        The network guard, robots.txt, then the host's turn (:meth:`turn`), exactly as
        for :meth:`get`: the block runs when the request may go. It may set the turn's
        ``status`` or call its :meth:`HostTurn.answered`; when it ends normally without
        a verdict the request counts as a success.
        """
        await self._guard.check(url, _http_host(url))
        if robots:
            await self._obey_robots(url, concurrency, delay)
        async with self.turn(
            host_of(url), url, concurrency=concurrency, delay=delay, source=source, adaptive=adaptive, park=park
        ) as turn:
            yield turn
            if turn.ok is None:
                turn.ok = True
            turn.status = turn.status or 200

    def turn(
        self,
        host: str,
        url: str,
        *,
        concurrency: int | None,
        delay: float | None,
        source: str,
        adaptive: bool = True,
        park: bool = False,
    ) -> HostTurn:
        """A request's turn at its host (``async with``): gate, breaker and metrics, as for every attempt.

        ``adaptive``: the response time feeds the host's rate (politeness ``adaptive``); ``park``: a throttled host
        with no room raises HostBusy instead of holding the caller.
        """
        gate = self._gate(host, concurrency, delay)
        return HostTurn(gate, self.breakers.get(host), url, source, adaptive=adaptive, park=park)

    def throttle_signals(self, source: str, hosts: set[str]) -> dict[str, int]:
        """Throttle signals (429, 503 with Retry-After) a source's requests met, per host (hosts with none left out)."""
        return {h: n for h in sorted(hosts) if (gate := self._gates.get(h)) is not None and (n := gate.signals[source])}

    def host_state(self, host: str) -> dict[str, Any]:
        """What this process learned of a host, as JSON: its rate (AIMD), its breaker, its robots.txt.

        Saved with the host's lease in a sharded crawl, so the shard that takes the host over starts where this one
        left it (:meth:`restore_host`); times are kept as seconds from now, monotonic clocks differ between machines.
        """
        now = time.monotonic()
        state: dict[str, Any] = {}
        gate = self._gates.get(host)
        if gate is not None:
            state["rate"] = {
                "limit": gate.limit,
                "extra": gate.extra,
                "delay": gate.delay,
                "windows": gate.windows,
                "throttling": gate.throttling,
                "paused_s": max(0.0, gate.paused_until - now),
                "throttled_s": None if gate.throttled_since is None else now - gate.throttled_since,
                "given_up_s": max(0.0, gate.given_up_until - now) if gate.given_up else None,
                "last_status": gate.last_status,
            }
        breaker = self.breakers.known(host)
        if breaker is not None:
            state["breaker"] = breaker.saved()
        robots = self.robots.saved(host)
        if robots:
            state["robots"] = robots
        return state

    def restore_host(self, host: str, state: Mapping[str, Any]) -> None:
        """Take over what another process learned of a host (:meth:`host_state`) before the first request to it."""
        if rate := state.get("rate"):
            self._restored[host] = dict(rate)
            if (gate := self._gates.get(host)) is not None:
                _restore_rate(gate, self._restored.pop(host))
        if breaker := state.get("breaker"):
            self.breakers.get(host).restore(breaker)
        if robots := state.get("robots"):
            self.robots.restore(robots)

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

    def _transport(self, name: TransportName, proxy: str | None = None) -> _Transport:
        # aiohttp takes a proxy per request (one session); httpx per client (one client per proxy).
        key = (name, proxy if name == "httpx" else None)
        if key not in self._transports:
            self._transports[key] = (
                _AiohttpTransport(self._settings, self._guard)
                if name == "aiohttp"
                else _HttpxTransport(self._settings, self._guard, proxy)
            )
        return self._transports[key]

    def proxy_pool(self, proxies: Sequence[str] | None, rotation: ProxyRotation | None = None) -> ProxyPool | None:
        """The pool for a source's ``proxies`` (None: the ``proxies`` setting; empty: none); None without proxies."""
        urls = tuple(self._settings.proxies if proxies is None else proxies)
        if not urls:
            return None
        how = rotation or self._settings.proxy_rotation
        pool = self._pools.get((urls, how))
        if pool is None:
            pool = self._pools[(urls, how)] = ProxyPool(urls, how, self.proxy_breakers)
        return pool

    def _gate(self, host: str, concurrency: int | None, delay: float | None) -> _HostGate:
        gate = self._gates.get(host)
        if gate is None:
            s = self._settings
            gate = _HostGate(
                host, concurrency or s.per_host_concurrency, s.per_host_delay if delay is None else delay, s
            )
            self._gates[host] = gate
            if (saved := self._restored.pop(host, None)) is not None:
                _restore_rate(gate, saved)
        return gate

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self._settings
        sleep = full_jitter(attempt, s.backoff_base, s.backoff_max)
        if retry_after is not None:
            sleep = max(sleep, min(retry_after, s.backoff_max))
        return sleep

    async def check_proxy(self, proxy: Proxy, url: str) -> None:
        """The guard on a proxy's own address (aiohttp connects to an IP-literal proxy without asking the resolver):
        BlockedNetworkError for ``url`` naming the proxy, or ProxyFailed when its name does not resolve."""
        try:
            await self._guard.check(proxy.url, urlsplit(proxy.url).hostname or "")
        except BlockedNetworkError as exc:
            raise BlockedNetworkError(f"proxy {proxy.label}: {exc}", url=url) from None
        except TransientFetchError as exc:
            raise ProxyFailed(f"proxy {proxy.label}: {exc}", url=url) from None

    async def _obey_robots(
        self,
        url: str,
        concurrency: int | None,
        delay: float | None,
        proxies: Sequence[str] | None = None,
        rotation: ProxyRotation | None = None,
    ) -> None:
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
                proxies=proxies,
                proxy_rotation=rotation,
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
            gate.raise_delay(min(crawl_delay, self._settings.max_crawl_delay))

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
        adaptive: bool = True,
        park: bool = False,
        attempts: int = 0,
        started: float | None = None,
        method: str = "GET",
        body: bytes | None = None,
        proxies: Sequence[str] | None = None,
        proxy_rotation: ProxyRotation | None = None,
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

        ``proxies`` (None: the ``proxies`` setting) carry every attempt and hop, one picked
        per request or per host (``proxy_rotation``); robots.txt goes through them too.

        Raises FetchError (with ``attempts`` and ``elapsed_ms`` set) when the URL
        finally fails; a final status other than 2xx or 304 is an error too.
        BreakerOpen means the URL was not (or no longer) requested; so does
        HostBusy, with ``park``, when its host is throttled and has no room now.
        ``attempts`` and ``started`` carry on the count and clock of a URL that was
        parked before (what HostBusy's ``attempts`` and ``elapsed_ms`` said).
        """
        started = time.monotonic() if started is None else started
        scope = frozenset(origins) if origins is not None else frozenset({origin_of(url)})
        if robots:
            try:
                _http_host(url)
            except PermanentFetchError:
                robots = False  # not a URL trawl can request: it fails on its first attempt, no robots.txt asked
        pool = self.proxy_pool(proxies, proxy_rotation)
        if robots:
            try:
                await self._obey_robots(url, concurrency, delay, proxies, proxy_rotation)
            except BlockedNetworkError:
                pass  # robots.txt's host is forbidden: the URL's own attempt meets the guard and says so
            except FetchError as exc:
                exc.attempts, exc.elapsed_ms = attempts, int((time.monotonic() - started) * 1000)
                raise

        async def once(attempt: int) -> Response:
            final_url, status, hdrs, content, sent, proxy = await self._attempt(
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
                adaptive=adaptive,
                park=park,
                method=method,
                body=body,
                pool=pool,
                proxies=proxies,
                rotation=proxy_rotation,
            )
            if 200 <= status < 300 or status == 304:
                elapsed = int((time.monotonic() - started) * 1000)
                return Response(final_url, status, hdrs, content, attempt, elapsed, sent[0], sent[1], proxy=proxy)
            raise status_error(status, final_url, retry_after(hdrs))

        return await self.retrying(once, url=url, source=source, started=started, attempts=attempts)

    async def retrying(
        self,
        attempt: Callable[[int], Awaitable[T]],
        *,
        url: str,
        source: str = "-",
        started: float | None = None,
        attempts: int = 0,
    ) -> T:
        """Run ``attempt(n)`` (n = 1, 2, ...) until it returns: the one retry loop of every kind.

        A transient FetchError is retried up to ``max_retries`` times after a
        backoff with full jitter (at least the error's ``Retry-After``, capped);
        the last error is raised with ``attempts`` and ``elapsed_ms`` set. A
        throttle signal (Throttled) is retried without using one of them: the
        host's gate holds the next attempt until the host's pause is over (and
        ThrottleBudgetSpent ends it when the host is given up). BreakerOpen,
        HostBusy and ThrottleBudgetSpent propagate at once (nothing was sent). ``attempts`` counts attempts
        made before the URL was parked (the next one is ``attempts + 1``).
        """
        started = time.monotonic() if started is None else started
        retries = self._settings.max_retries
        failures = 0
        proxy_failures = 0
        try:
            while True:
                attempts += 1
                try:
                    return await attempt(attempts)
                except (BreakerOpen, HostBusy, ThrottleBudgetSpent):
                    attempts -= 1  # refused before anything was sent
                    raise
                except Throttled:
                    continue  # the host's gate pauses it: the next attempt waits there
                except ProxyFailed as exc:
                    # Through another proxy at once, without using a retry: the failed one's breaker benches it
                    # after a few, and then every proxy benched is ProxyUnavailable (retried with a backoff).
                    proxy_failures += 1
                    if proxy_failures <= _PROXY_RETRIES:
                        log.info("proxy failed, trying another", url=url, error=str(exc))
                        continue
                    raise
                except FetchError as exc:
                    if not exc.transient or failures == retries:
                        raise
                    pause = self._backoff(failures, exc.retry_after)
                    failures += 1
                    METRICS.retries.labels(source, METRICS.host(host_of(exc.url))).inc()
                    log.info("retrying", url=url, attempt=attempts, error=str(exc), sleep_s=round(pause, 3))
                await asyncio.sleep(pause)
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
        adaptive: bool = True,
        park: bool = False,
        method: str = "GET",
        body: bytes | None = None,
        pool: ProxyPool | None = None,
        proxies: Sequence[str] | None = None,
        rotation: ProxyRotation | None = None,
    ) -> tuple[str, int, dict[str, str], bytes, tuple[str, Mapping[str, str]], str | None]:
        s = self._settings
        current = url
        for hop in range(s.max_redirects + 1):
            hostname = _http_host(current)
            await self._guard.check(current, hostname)
            if hop and robots:  # a redirect target answers to its own robots.txt (as in Scrapy)
                await self._obey_robots(current, concurrency, delay, proxies, rotation)
            proxy: Proxy | None = None
            # Credentials stay at home: only the source's own origins get its headers.
            sent = headers if headers and origin_of(current) in origins else _NO_HEADERS
            async with self.turn(
                host_of(current),
                current,
                concurrency=concurrency,
                delay=delay,
                source=source,
                adaptive=adaptive,
                park=park,
            ) as turn:
                try:
                    async with asyncio.timeout(s.total_timeout):
                        if pool is None:  # direct: no proxy to pick and tell (the common case, without a generator)
                            status, hdrs, content = await self._transport(transport).get(
                                current, sent, max_bytes, truncate=truncate, method=method, body=body
                            )
                        else:
                            with _through(pool, current) as proxy:
                                via = proxy.url if proxy is not None else None
                                if proxy is not None:
                                    await self.check_proxy(proxy, current)
                                status, hdrs, content = await self._transport(transport, via).get(
                                    current, sent, max_bytes, truncate=truncate, method=method, body=body, proxy=via
                                )
                except TimeoutError:
                    raise TransientFetchError(f"timed out after {s.total_timeout}s", url=current) from None
                except FetchError:
                    raise
                except Exception as exc:  # whatever else sending this hop raised ends this URL, not its source
                    raise PermanentFetchError(f"{type(exc).__name__}: {exc}", url=current) from exc
                turn.answered(status, hdrs)
            if status in _REDIRECT_STATUS and "location" in hdrs:
                current = _redirect_target(current, hdrs["location"])
                if status == 303 or (status in (301, 302) and method == "POST"):
                    method, body = "GET", None  # as browsers and requests do
                elif body is not None and origin_of(current) not in origins:
                    raise PermanentFetchError(
                        f"{status} redirect to {current}: the request body is not resent to another origin", url=url
                    )
                continue
            return (
                current,
                status,
                hdrs,
                content,
                (method, {**self._client_headers, **sent} if sent else self._client_headers),
                proxy.label if proxy is not None else None,
            )
        raise PermanentFetchError(f"more than {s.max_redirects} redirects", url=url)


@contextlib.contextmanager
def _through(pool: ProxyPool | None, url: str) -> Iterator[Proxy | None]:
    """The proxy a request goes through (None: direct), and its breaker told how it went: ProxyFailed counts
    against it, any answer for it; anything else (the host's failure, a cancellation) says nothing about it."""
    if pool is None:
        yield None
        return
    proxy, probe = pool.pick(host_of(url), url)
    breaker = pool.breaker(proxy)
    try:
        yield proxy
    except ProxyFailed:
        breaker.record(False, probe)
        raise
    except BaseException:
        breaker.release(probe)
        raise
    breaker.record(True, probe)


def _restore_rate(gate: _HostGate, saved: Mapping[str, Any]) -> None:
    """Put a host's learned rate (saved by another process) into this process's gate for it."""
    now = time.monotonic()
    gate.limit = min(float(gate.cap), max(1.0, float(saved.get("limit", gate.cap))))
    gate.extra = float(saved.get("extra", 0.0))
    gate.raise_delay(float(saved.get("delay", 0.0)))
    gate.windows = int(saved.get("windows", 0))
    gate.throttling = bool(saved.get("throttling", False))
    if gate.throttling:
        gate.throttled_at = now
    gate.paused_until = max(gate.paused_until, now + float(saved.get("paused_s", 0.0)))
    if (since := saved.get("throttled_s")) is not None:
        gate.throttled_since = now - float(since)
    if (given_up := saved.get("given_up_s")) is not None:
        gate.given_up, gate.given_up_until = True, now + float(given_up)
    gate.last_status = saved.get("last_status")
    gate._show()


def _http_host(url: str) -> str:
    """The host name of an http(s) URL; PermanentFetchError naming the URL when it is not one trawl can request
    (another scheme, no host, a malformed host or port)."""
    plain = split_plain(url)
    if plain is not None:
        return plain[1]
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
