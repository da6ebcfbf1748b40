"""Scrapy's scheduler on the durable frontier: a `spider` source's pending requests in PostgreSQL.

With ``frontier: postgres`` a spider's requests do not wait in Scrapy's memory
queues but in :mod:`trawl.frontier`'s table, one row per request: the request
as JSON in ``payload`` (:func:`encode_request`), its fingerprint as the 64-bit
key, so the table is the dupefilter (``dont_filter`` requests get a random key:
never deduplicated), priority from ``Request.priority`` and depth from
``meta["depth"]``.

The payload is data, never code: JSON of ``Request.to_dict`` with bytes in
base64, callbacks by the name of a spider method, ``meta`` and ``cb_kwargs``
JSON values only, the class one of Scrapy's own (``Request``, ``FormRequest``,
``JsonRequest``). No pickle: a row anyone with UPDATE on the table rewrote is
read as JSON, and one that is not exactly what trawl writes is refused (logged,
counted in the ``scheduler/refused`` stat and ``frontier/refused``, marked
done), never run. Requests that do not fit stay in Scrapy's memory, as with
Scrapy's own disk queues: so do requests that carry credentials (an
``Authorization``, ``Cookie`` or ``Proxy-Authorization`` header, ``cookies=``,
a body — a login form's password — or ``meta["trawl_credentials"]`` true; a
request with a body and ``meta["trawl_credentials"] = False`` says its body is
no secret), which are never written to the database.

Scrapy calls its scheduler synchronously and asyncpg is async, so
:class:`PgScheduler` keeps small local buffers and one background task in the
crawl's loop moves them: enqueued requests go in batches (``ON CONFLICT DO
NOTHING``), batches are claimed (``FOR UPDATE SKIP LOCKED``) before the engine
runs dry, and finished requests are marked done.

*Done* means Scrapy has finished with the request: downloaded (after retries
and redirects, which come back as new requests), its callback or errback run,
its items through the pipelines and the requests it yielded handed to the
scheduler. The one place Scrapy tracks exactly that is the engine's set of
requests in progress (the set ``scrapy.utils.engine.get_engine_status`` reports);
no signal covers it (``response_received`` fires before the callback, and a
failed download sends none), so the scheduler checks which of the requests it
handed out have left that set. A request is thus marked done in the same
transaction as, or after, the requests it yielded are inserted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import inspect
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import orjson
import scrapy
import structlog
from scrapy.core.scheduler import BaseScheduler
from scrapy.http import JsonRequest
from scrapy.utils.defer import deferred_from_coro

from trawl.frontier.postgres import ClaimedRequest, PgFrontier, QueuedRequest
from trawl.urls import host_of

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred

__all__ = ["CREDENTIALS_META", "NotStorable", "PgScheduler", "decode_request", "encode_request", "request_key"]

log = structlog.get_logger("trawl.frontier.scheduler")

_INT4 = 2**31 - 1
_ATTR = "trawl_frontier"
_ATTR_FINISHED = "trawl_frontier_finished"
_RETRIES = 3
"""Rounds with the database retried before the crawl is stopped (asyncpg's pool replaces a broken connection)."""

CREDENTIALS_META = "trawl_credentials"
"""``meta`` key: true keeps a request out of the frontier (in memory); false lets a request with a body in."""
_FORMAT = "trawl/scrapy-request/1"
_CLASSES: dict[str, type[scrapy.Request]] = {
    "Request": scrapy.Request,
    "FormRequest": scrapy.FormRequest,
    "JsonRequest": JsonRequest,
}
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "class": str,
    "url": str,
    "method": str,
    "headers": list,
    "body": str,
    "meta": dict,
    "cb_kwargs": dict,
    "callback": (str, type(None)),
    "errback": (str, type(None)),
    "encoding": str,
    "priority": int,
    "dont_filter": bool,
    "flags": list,
}


class NotStorable(ValueError):
    """A request that is not written to the frontier (kept in memory) or a payload that is not one trawl wrote."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise NotStorable(f"{what} is not base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NotStorable(f"{what} is not base64") from None


def _json_only(value: Any, where: str) -> None:
    """Refuse anything JSON would not give back as it was (tuples, bytes, objects, NaN, non-string keys)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotStorable(f"{where} is {value}, not a JSON number")
        return
    if type(value) is list:
        for i, v in enumerate(value):
            _json_only(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if not isinstance(k, str):
                raise NotStorable(f"{where} has the key {k!r}, not a string")
            _json_only(v, f"{where}.{k}")
        return
    raise NotStorable(f"{where} is a {type(value).__name__}, not a JSON value")


def _credentials(request: scrapy.Request) -> str | None:
    """Why a request counts as carrying credentials, or None."""
    marked = request.meta.get(CREDENTIALS_META)
    if marked:
        return f"meta[{CREDENTIALS_META!r}]"
    names = {bytes(k).lower() for k in request.headers}
    if names & _CREDENTIAL_HEADERS:
        return "a " + ", ".join(sorted(n.decode() for n in names & _CREDENTIAL_HEADERS)) + " header"
    if request.cookies:
        return "cookies"
    if request.body and marked is not False:
        return f"a body (set meta[{CREDENTIALS_META!r}] = False if it holds no secret)"
    return None


def encode_request(request: scrapy.Request, spider: Spider | None) -> bytes:
    """The frontier payload of a request: JSON only; NotStorable if it does not fit or carries credentials."""
    reason = _credentials(request)
    if reason is not None:
        raise NotStorable(f"carries credentials ({reason}): kept in memory, never written")
    cls = next((name for name, c in _CLASSES.items() if type(request) is c), None)
    if cls is None:
        raise NotStorable(f"{type(request).__qualname__} is not one of Scrapy's request classes")
    d = request.to_dict(spider=spider)  # ValueError: a callback that is no method of the spider
    _json_only(d["meta"], "meta")
    _json_only(d["cb_kwargs"], "cb_kwargs")
    _json_only(d["flags"], "flags")
    payload = {
        "format": _FORMAT,
        "class": cls,
        "url": d["url"],
        "method": d["method"],
        "headers": [[_b64(bytes(k)), [_b64(bytes(v)) for v in vs]] for k, vs in d["headers"].items()],
        "body": _b64(d["body"]),
        "meta": d["meta"],
        "cb_kwargs": d["cb_kwargs"],
        "callback": d["callback"],
        "errback": d["errback"],
        "encoding": d["encoding"],
        "priority": d["priority"],
        "dont_filter": d["dont_filter"],
        "flags": d["flags"],
    }
    return orjson.dumps(payload)


def _spider_method(spider: Spider | None, name: str | None, what: str) -> Callable[..., Any] | None:
    if name is None:
        return None
    if spider is None or not name.isidentifier() or name.startswith("__"):
        raise NotStorable(f"{what} {name!r} is not a method of the spider")
    method = getattr(spider, name, None)
    if not inspect.ismethod(method) or method.__self__ is not spider:
        raise NotStorable(f"{what} {name!r} is not a method of the spider")
    return method


def decode_request(payload: bytes, spider: Spider | None) -> scrapy.Request:
    """A request from a payload :func:`encode_request` wrote; NotStorable for anything else (never run)."""
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise NotStorable("the payload is not JSON") from None
    if not isinstance(d, dict) or d.get("format") != _FORMAT:
        raise NotStorable("the payload is not a request trawl wrote")
    if set(d) != set(_FIELDS):
        raise NotStorable(f"the payload's keys are not a request's: {sorted(set(d) ^ set(_FIELDS))}")
    for key, kind in _FIELDS.items():
        if not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
            raise NotStorable(f"the payload's {key} is a {type(d[key]).__name__}")
    cls = _CLASSES.get(d["class"])
    if cls is None:
        raise NotStorable(f"the payload's class {d['class']!r} is not one of Scrapy's request classes")
    headers: dict[bytes, list[bytes]] = {}
    for item in d["headers"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            raise NotStorable("the payload's headers are malformed")
        headers[_unb64(item[0], "a header name")] = [_unb64(v, "a header value") for v in item[1]]
    if {k.lower() for k in headers} & _CREDENTIAL_HEADERS:
        raise NotStorable("the payload carries a credentials header, which trawl never writes")
    for key in ("meta", "cb_kwargs", "flags"):
        _json_only(d[key], key)
    try:
        return cls(
            url=d["url"],
            method=d["method"],
            headers=headers,
            body=_unb64(d["body"], "the body"),
            meta=d["meta"],
            cb_kwargs=d["cb_kwargs"],
            callback=_spider_method(spider, d["callback"], "callback"),
            errback=_spider_method(spider, d["errback"], "errback"),
            encoding=d["encoding"],
            priority=d["priority"],
            dont_filter=d["dont_filter"],
            flags=d["flags"],
        )
    except (TypeError, ValueError, LookupError) as exc:  # a bad URL, encoding, ...
        raise NotStorable(f"the payload is not a valid request: {exc}") from None


def request_key(fingerprint: bytes) -> int:
    """A request fingerprint as the frontier's 64-bit key (signed, for ``bigint``); any fingerprint length."""
    return int.from_bytes(hashlib.blake2b(fingerprint, digest_size=8).digest(), "big", signed=True)


def _unique_key() -> int:
    return int.from_bytes(os.urandom(8), "big", signed=True)


def _engine(crawler: Crawler) -> Any:
    """The crawler's engine, or None before its crawl starts (or for a scheduler used on its own)."""
    try:
        return crawler.engine
    except (AttributeError, RuntimeError):
        return None


def _wake_engine(crawler: Crawler) -> None:
    """Have the engine ask for requests now rather than at its next 5 s heartbeat."""
    slot = getattr(_engine(crawler), "_slot", None)
    nextcall = getattr(slot, "nextcall", None)
    if nextcall is not None:
        nextcall.schedule()


def _in_progress(crawler: Crawler) -> set[scrapy.Request] | None:
    """The engine's requests in progress (downloading or being scraped), or None without a running engine."""
    slot = getattr(_engine(crawler), "_slot", None)
    inprogress = getattr(slot, "inprogress", None)
    return inprogress if isinstance(inprogress, set) else None


class PgScheduler(BaseScheduler):
    """A Scrapy scheduler whose queue and seen set are the run's rows in :class:`~trawl.frontier.PgFrontier`.

    Any number of schedulers may share one run: each claims its own batches, and
    a scheduler reports pending requests while any row of the run is queued or
    leased by another, since those may still lead to more.
    """

    def __init__(self, frontier: PgFrontier, crawler: Crawler, *, batch: int = 200, poll: float = 0.25) -> None:
        self.frontier = frontier
        self.crawler = crawler
        self.batch = max(1, batch)
        self.poll = poll
        self.spider: Spider | None = None
        self.error: BaseException | None = None
        """Why the frontier could not be used (the crawl was stopped), if it could not."""
        self._new: list[QueuedRequest] = []  # enqueued, not in the database yet
        self._new_keys: set[int] = set()
        self._ready: deque[tuple[scrapy.Request, int]] = deque()  # claimed, waiting for the engine
        self._out: dict[int, tuple[scrapy.Request, int]] = {}  # id(request) -> (request, key): with the engine
        self._held: set[int] = set()  # keys in _ready or _out (a lease of ours)
        self._done: list[int] = []  # finished, not marked yet
        self._memory: deque[scrapy.Request] = deque()  # not serializable: kept in memory, as Scrapy's scheduler does
        self._memory_seen: set[int] = set()
        self._remote = 0  # rows of the run neither done nor ours, as last counted
        self._busy = False  # a round with the database is under way
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closer: asyncio.Future[Any] | None = None
        self._closing = False
        self._renewed = time.monotonic()
        self._logged_unserializable = False
        self.on_finished: Callable[[int], None] | None = None
        self.counts = {
            "enqueued": 0,
            "inserted": 0,
            "claimed": 0,
            "done": 0,
            "done_at_close": 0,
            "given_back": 0,
            "refused": 0,
        }

    # ---- wiring ----------------------------------------------------------------------------------------------

    @staticmethod
    def attach(crawler: Crawler, frontier: PgFrontier, on_finished: Callable[[int], None] | None = None) -> None:
        """Give a crawler (before its crawl starts) the frontier its ``SCHEDULER = PgScheduler`` will use.

        With ``on_finished`` the scheduler does not mark finished requests done itself: it hands their keys to
        it, after the requests they led to are in the frontier, and the crawl marks them done at a checkpoint,
        once their items and outcomes are staged (what makes a spider run resumable).
        """
        setattr(crawler, _ATTR, frontier)
        setattr(crawler, _ATTR_FINISHED, on_finished)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        frontier = getattr(crawler, _ATTR, None)
        if not isinstance(frontier, PgFrontier):
            raise RuntimeError("PgScheduler needs a frontier: PgScheduler.attach(crawler, frontier) before the crawl")
        scheduler = cls(frontier, crawler, batch=crawler.settings.getint("TRAWL_FRONTIER_BATCH", 200))
        scheduler.on_finished = getattr(crawler, _ATTR_FINISHED, None)
        crawler.trawl_scheduler = scheduler  # type: ignore[attr-defined]  # the connector asks it how it went
        return scheduler

    def open(self, spider: Spider) -> None:
        self.spider = spider
        if _engine(self.crawler) is not None and _in_progress(self.crawler) is None:
            log.warning("this Scrapy has no engine._slot.inprogress: requests are marked done only at the end")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="trawl-frontier")
        self._wake.set()  # claim at once: another scheduler of the run may have queued requests already

    def close(self, reason: str) -> Deferred[None]:
        return deferred_from_coro(self._close(reason))

    # ---- Scrapy's interface (synchronous) --------------------------------------------------------------------

    def has_pending_requests(self) -> bool:
        if self.error is not None:
            return False  # the crawl is being stopped
        return bool(self._memory or self._ready or self._new or self._busy or self._remote > 0)

    def enqueue_request(self, request: scrapy.Request) -> bool:
        if self.error is not None or self._closing:
            return False
        stats = self.crawler.stats
        key = (
            _unique_key()
            if request.dont_filter
            else request_key(self.crawler.request_fingerprinter.fingerprint(request))
        )
        try:
            payload = encode_request(request, self.spider)
        except Exception as exc:  # credentials, a callback that is no spider method, a meta value JSON cannot hold
            return self._enqueue_in_memory(request, key, exc)
        if key in self._new_keys:  # the same request twice before the batch went in
            stats.inc_value("dupefilter/filtered")
            return False
        self._new_keys.add(key)
        depth = request.meta.get("depth", 0)
        self._new.append(
            QueuedRequest(
                key,
                request.url,
                host_of(request.url),
                depth if isinstance(depth, int) else 0,
                max(-_INT4, min(_INT4, request.priority)),
                payload,
            )
        )
        self.counts["enqueued"] += 1
        stats.inc_value("scheduler/enqueued/postgres")
        stats.inc_value("scheduler/enqueued")
        self._wake.set()
        return True

    def next_request(self) -> scrapy.Request | None:
        self._sweep()
        stats = self.crawler.stats
        if self._memory:
            stats.inc_value("scheduler/dequeued/memory")
            stats.inc_value("scheduler/dequeued")
            return self._memory.popleft()
        if self.error is not None or not self._ready:
            # No wake-up here: the task claims after every insert and polls while others hold requests. Waking it
            # on every empty answer would keep it busy (so pending) whenever the engine looks, and never let it close.
            return None
        request, key = self._ready.popleft()
        self._out[id(request)] = (request, key)
        if len(self._ready) <= self.batch // 2:
            self._wake.set()
        stats.inc_value("scheduler/dequeued/postgres")
        stats.inc_value("scheduler/dequeued")
        return request

    def __len__(self) -> int:
        return len(self._memory) + len(self._ready) + len(self._new) + self._remote

    def _enqueue_in_memory(self, request: scrapy.Request, key: int, exc: Exception) -> bool:
        stats = self.crawler.stats
        if not request.dont_filter:
            if key in self._memory_seen:
                stats.inc_value("dupefilter/filtered")
                return False
            self._memory_seen.add(key)
        if not self._logged_unserializable:  # like Scrapy's SCHEDULER_DEBUG: once, then only counted
            self._logged_unserializable = True
            log.warning(
                "request not written to the frontier, kept in memory",
                url=request.url,
                error=f"{type(exc).__name__}: {exc}",
            )
        stats.inc_value("scheduler/unserializable")
        stats.inc_value("scheduler/enqueued/memory")
        stats.inc_value("scheduler/enqueued")
        self._memory.append(request)
        return True

    def _sweep(self) -> None:
        """Move the requests Scrapy has finished with (no longer in the engine's in-progress set) to ``_done``."""
        if not self._out:
            return
        progress = _in_progress(self.crawler)
        if progress is None:
            return
        for ident, (request, key) in list(self._out.items()):
            if request not in progress:
                del self._out[ident]
                self._held.discard(key)
                self._done.append(key)
        if self._done:
            self._wake.set()

    # ---- the background task ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            waiting = self._out or self._remote > 0  # something to notice without being told
            # A timer that sets the event rather than asyncio.timeout: 3.11's can leave a cancellation pending on this
            # task when the event and the deadline come together, and it would then hit a query mid-protocol.
            alarm = asyncio.get_running_loop().call_later(
                self.poll if waiting else self.frontier.lease_seconds / 3, self._wake.set
            )
            try:
                await self._wake.wait()
            finally:
                alarm.cancel()
            self._wake.clear()
            if self._closing:
                return
            try:
                await self._round()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures < _RETRIES:
                    log.warning("frontier round failed, retrying", error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2 * 2**failures)
                    self._wake.set()
                    continue
                self._fail(exc)
                return
            finally:
                _wake_engine(self.crawler)

    async def _round(self) -> None:
        """One exchange with the database: insert new requests and done marks, claim a batch if running low, and
        count what is left elsewhere when nothing more could be claimed."""
        self._sweep()
        self._busy = True
        new, self._new, self._new_keys = self._new, [], set()
        done, self._done = self._done, []
        try:
            renew = bool(self._held) and time.monotonic() - self._renewed > self.frontier.lease_seconds / 3
            deferred = self.on_finished is not None
            if new or (done and not deferred) or renew:
                inserted = await self.frontier.push_requests(new, done=[] if deferred else done, renew=renew)
                if renew:
                    self._renewed = time.monotonic()
                self._count(inserted=inserted, done=0 if deferred else len(done))
                self.crawler.stats.inc_value("dupefilter/filtered", len(new) - inserted)
            if deferred:
                self._hand_over(done)
            new, done = [], []
            want = self.batch - len(self._ready)
            if want >= (self.batch + 1) // 2:
                claimed = await self.frontier.claim_requests(want)
                self._take(claimed)
                if len(claimed) < want:  # nothing more to claim now: what is left is leased by others
                    self._remote = await self.frontier.not_mine()
        except BaseException:
            # Nothing of a failed transaction happened: try the same again next round (inserts and done marks are
            # idempotent, so an ambiguous commit does no harm either).
            self._new = new + self._new
            self._new_keys.update(r.key for r in new)
            self._done = done + self._done
            raise
        finally:
            self._busy = False

    def _take(self, claimed: list[ClaimedRequest]) -> None:
        self._renewed = time.monotonic() if claimed and not self._held else self._renewed
        for c in claimed:
            if c.key in self._held:  # our own lease ran out and came back: we have it already
                continue
            try:
                if c.payload is None:  # a bare URL queued by ``begin``
                    request = scrapy.Request(c.url, meta={"depth": c.depth})
                else:
                    request = decode_request(c.payload, self.spider)
            except NotStorable as exc:  # not what trawl wrote (or its callback is gone): refused, never run
                log.error("frontier row refused", url=c.url, key=c.key, error=str(exc))
                self.crawler.stats.inc_value("scheduler/refused")
                self._count(refused=1)
                self._done.append(c.key)
                continue
            except Exception as exc:
                log.error("request in the frontier cannot be loaded", url=c.url, error=f"{type(exc).__name__}: {exc}")
                self.crawler.stats.inc_value("scheduler/unloadable")
                self._done.append(c.key)
                continue
            self._held.add(c.key)
            self._ready.append((request, c.key))
        self._count(claimed=len(claimed))

    def _hand_over(self, keys: list[int]) -> None:
        """Finished requests whose children are in the frontier: to the crawl, which checkpoints them done."""
        assert self.on_finished is not None
        for key in keys:
            self.on_finished(key)
        self._count(done=len(keys))

    def _count(self, **n: int) -> None:
        for k, v in n.items():
            self.counts[k] += v

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        log.error("frontier failed, stopping the spider", error=f"{type(exc).__name__}: {exc}")
        engine = _engine(self.crawler)
        if engine is not None and getattr(engine, "_slot", None) is not None:
            self._closer = asyncio.ensure_future(engine.close_spider_async(reason="frontier_error"))

    async def _close(self, reason: str) -> None:
        """The engine is idle (nothing in progress): everything handed out is done, everything claimed and not
        handed out goes back to the queue, everything enqueued goes in."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        for _, key in self._out.values():
            self._done.append(key)
            self._held.discard(key)
        self._out.clear()
        self.counts["done_at_close"] = len(self._done)  # the last few; most were marked as they finished
        give_back = [key for _, key in self._ready]
        self._ready.clear()
        self._held.clear()
        try:
            deferred = self.on_finished is not None
            if self._new or (self._done and not deferred) or give_back:
                marks = [] if deferred else self._done
                inserted = await self.frontier.push_requests(self._new, done=marks, give_back=give_back)
                self._count(inserted=inserted, done=len(marks), given_back=len(give_back))
            if deferred:
                self._hand_over(self._done)
            self._new, self._done = [], []
        except Exception as exc:
            self.error = self.error or exc
            log.error("frontier not updated at close", error=f"{type(exc).__name__}: {exc}")
        for k, v in self.counts.items():
            self.crawler.stats.set_value(f"frontier/{k}", v)
        log.info(
            "frontier closed",
            reason=reason,
            error=None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            in_memory_lost=len(self._memory),
            **self.counts,
        )
