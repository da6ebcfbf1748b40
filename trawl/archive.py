"""The page archive: what a source fetched, kept as WARC/1.1 records (ISO 28500) next to its staged parts.

Every response an ``html``, ``browser`` or ``spider`` source fetched (an ``api``
source's when it asks) is written as a ``response`` record followed by the
``request`` record that asked for it (``WARC-Concurrent-To``), as Heritrix
writes them; a browser page adds its rendered DOM as a ``conversion`` record
that refers to the response (``WARC-Refers-To``). Each record is its own gzip
member, so a reader can seek to any record's offset and inflate just that one:
lineage stores ``{"warc": uri, "offset": n, "length": n}`` of the response.

The body stored is the body trawl received after its bounded decoder inflated it
(trawl never keeps the compressed bytes), so the stored ``Content-Encoding`` is
dropped (kept as ``X-Trawl-Original-Content-Encoding``) and ``Content-Length``
says the stored length. A body over the source's ``archive_max_bytes`` is cut
there and the record says ``WARC-Truncated: length``. Request headers are masked
like everything trawl writes (:mod:`trawl.masking`); credentials configured for
a source are never stored (``Authorization``, ``Cookie`` and the source's own
header names are replaced by ``***``).

The records are built on the event loop: the masked HTTP headers (~14 µs of
Python per page) and ISA-L's level-1 compression of the response (~50 µs for a
22 KB page); the loop appends the members of the pages queued meanwhile to the
archive part in one go. The WARC header is written here, not by warcio or
fastwarc (fastwarc ~30 µs, warcio ~250 µs of Python per page, ``python -m
benchmarks.archive``): no WARC digests (optional in ISO 28500; each member's
CRC-32 and each part's sha256 in the manifest cover the bytes), the small
request record as a stored gzip member, record ids from a seeded PRNG rather
than ``os.urandom``. A writer thread was measured and dropped: beside a CPU-bound
loop on 2 cores its GIL hand-overs cost the loop as much as the compression it
took away.
"""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from isal import isal_zlib

from trawl.errors import StagingError
from trawl.masking import MASK, generation, mask_text, mask_url

__all__ = [
    "ArchiveSink",
    "ArchivedPage",
    "Archiver",
    "Exchange",
    "archived_pages",
    "read_member",
    "warc_members",
]

_SENSITIVE = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_DROPPED = frozenset({"content-encoding", "transfer-encoding", "content-length"})


class ArchiveSink(Protocol):
    """Where archive members go: one stream of ``*.warc.gz`` parts per source and run (:mod:`sinks.stage`)."""

    async def append(self, members: bytes) -> tuple[str, int]:
        """Append whole gzip members; returns (part uri, offset of the first member in it)."""
        ...

    def append_nowait(self, members: bytes) -> tuple[str, int] | None:
        """:meth:`append` when it needs no wait (the members only go into a buffer); None: ``await append()``."""
        ...


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its response, as the archive keeps them."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    method: str = "GET"
    request_headers: Mapping[str, str] = field(default_factory=dict)
    secret_headers: frozenset[str] = frozenset()
    """Lower-cased names of headers that carry a source's configured credentials: stored as ``***``."""
    rendered: bytes | None = None
    """A browser page's rendered DOM (UTF-8): a ``conversion`` record after the response."""
    fetched_at: datetime | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _warc_date(at: datetime) -> str:
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return at.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"  # strftime: 5x slower


def _header_value(name: str, value: str, secret: frozenset[str]) -> str:
    if name in _SENSITIVE or name in secret:
        return MASK
    return mask_text(value).replace("\r", " ").replace("\n", " ")


_GZIP_LEVEL = 1
"""ISA-L (``isal``) level 1: compression is nearly all of the archive's CPU, beside a crawl that is CPU-bound on
2 cores. A 22 KB page: 45 µs and 6.2 KB, where zlib takes 157 µs at level 1 (6.4 KB) and 591 µs at 6 (5.7 KB).
The output is a standard gzip member; ISA-L releases the GIL while it compresses."""


@dataclass(slots=True)
class _Job:
    """One exchange ready to be written: every header already built and masked."""

    url: str
    at: str
    head: bytes
    """The response's HTTP status line and headers (``\r\n\r\n`` included)."""
    body: bytes | memoryview
    truncated: bool
    request: bytes
    rendered: bytes | None


def _prepare(ex: Exchange, max_bytes: int) -> _Job:
    """The Python side of archiving one exchange (status line, masked headers): cheap, on the event loop."""
    body: bytes | memoryview = ex.body
    truncated = len(body) > max_bytes
    if truncated:
        body = memoryview(ex.body)[:max_bytes]  # no copy: compressed from the response's bytes
    head = [f"HTTP/1.1 {ex.status} {_REASONS.get(ex.status, '')}".rstrip()]
    for name, value in ex.headers.items():
        low = name.lower()
        if low == "content-encoding":
            head.append(f"X-Trawl-Original-Content-Encoding: {value}")
        elif low not in _DROPPED:
            head.append(f"{name}: {_header_value(low, value, frozenset())}")
    head.append(f"Content-Length: {len(body)}\r\n\r\n")
    parts = urlsplit(ex.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    req = f"{ex.method} {mask_text(target)} HTTP/1.1\r\nHost: {parts.netloc.rpartition('@')[2]}\r\n"
    req += _request_lines(ex.request_headers, ex.secret_headers)
    return _Job(
        mask_url(ex.url).replace("\r", "%0D").replace("\n", "%0A").replace(" ", "%20"),
        _warc_date(ex.fetched_at or _now()),
        "\r\n".join(head).encode("utf-8", "replace"),
        body,
        truncated,
        req.encode("utf-8", "replace"),
        ex.rendered,
    )


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_request_cache: dict[tuple[tuple[tuple[str, str], ...], frozenset[str], int], str] = {}


def _request_lines(headers: Mapping[str, str], secret: frozenset[str]) -> str:
    """A request's header lines after ``Host`` (masked), ending the head: most requests of a crawl send the same
    headers, so each set is built once per state of the secret registry (its generation is part of the key)."""
    key = (tuple(headers.items()), secret, generation())
    lines = _request_cache.get(key)
    if lines is None:
        if len(_request_cache) > 256:  # bounded: old generations' entries go too
            _request_cache.clear()
        lines = "".join(
            f"{name}: {_header_value(name.lower(), value, secret)}\r\n"
            for name, value in headers.items()
            if name.lower() != "host"
        )
        _request_cache[key] = lines = lines + "\r\n"
    return lines


def _warc(
    kind: str,
    record_id: str,
    job: _Job,
    content_type: str,
    chunks: tuple[bytes | memoryview, ...],
    extra: str = "",
    *,
    stored: bool = False,
) -> bytes:
    """One WARC/1.1 record as a gzip member: header, block (``chunks``), the two closing CRLFs.

    No WARC-Block-Digest / WARC-Payload-Digest (both optional in ISO 28500): hashing a page twice costs the
    loop two more passes over each page; each member's CRC-32 and each part's
    sha256 in the manifest already say whether the bytes are the ones written. ``stored``: a small record
    (the request) goes into an uncompressed gzip member built here.
    """
    length = sum(len(c) for c in chunks)
    header = (
        f"WARC/1.1\r\nWARC-Type: {kind}\r\nWARC-Record-ID: {record_id}\r\nWARC-Date: {job.at}\r\n"
        f"WARC-Target-URI: {job.url}\r\nContent-Type: {content_type}\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    record = b"".join((header, *chunks, b"\r\n\r\n"))
    if stored and len(record) < 4096:
        return _stored_member(record)
    return isal_zlib.compress(record, _GZIP_LEVEL, wbits=31)  # one gzip member; ISA-L releases the GIL meanwhile


_GZIP_HEAD = bytes((0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF))  # deflate, no flags, no mtime, unknown OS


def _stored_member(data: bytes) -> bytes:
    """``data`` (under 64 KB) as a gzip member of one stored (uncompressed) deflate block (RFC 1951 3.2.4)."""
    n = len(data)
    return b"".join(
        (
            _GZIP_HEAD,
            bytes((1, n & 0xFF, n >> 8, ~n & 0xFF, (~n >> 8) & 0xFF)),  # final stored block: LEN, NLEN
            data,
            struct.pack("<II", zlib.crc32(data), n),  # crc32 keeps the GIL for small inputs
        )
    )


_ids = random.Random()


_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def _record_id() -> str:
    """A random (version 4, RFC 9562) UUID URN, spelled as ``uuid.UUID`` would, without building one (~4x faster)."""
    h = f"{_ids.getrandbits(128) & _V4_CLEAR | _V4_SET:032x}"
    return f"<urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}>"


def _compress(job: _Job) -> tuple[bytes, int]:
    """The gzip members of one exchange (response, request, conversion) and the response member's length.

    The response comes first, so the offset of the returned bytes is the response's.
    """
    extra = "WARC-Truncated: length\r\n" if job.truncated else ""
    response_id = _record_id()
    response = _warc("response", response_id, job, "application/http; msgtype=response", (job.head, job.body), extra)
    concurrent = f"WARC-Concurrent-To: {response_id}\r\n"
    request = _warc(
        "request", _record_id(), job, "application/http; msgtype=request", (job.request,), concurrent, stored=True
    )
    out = [response, request]
    if job.rendered is not None:
        refers = f"WARC-Refers-To: {response_id}\r\n"
        out.append(_warc("conversion", _record_id(), job, "text/html; charset=utf-8", (job.rendered,), refers))
    return b"".join(out), len(response)


def warc_members(ex: Exchange, max_bytes: int) -> tuple[bytes, int]:
    """The gzip members of one exchange (response, request, conversion) and the response member's length."""
    return _compress(_prepare(ex, max_bytes))


_Done = tuple[Any, Any, int]  # (future, members or the exception building them, response member length)


class Archiver:
    """Writes one source's exchanges into its archive stream; tells each page where its response landed.

    Each page's members are built and compressed on the event loop as it is queued (``write``: ~80 µs for a
    22 KB page, ISA-L level 1); the loop appends what was queued meanwhile to the stream in one go, soon after,
    so each response's offset is known before any record points at it. A record is written only after its
    page's offset is known and a checkpoint closes the records before the archive, so a closed records part
    never points into an archive part that is still open.

    Measured against a writer thread (``python -m benchmarks.archive``): on 2 cores with a CPU-bound loop the
    thread's every GIL hand-over cost the loop as much as the compression it took off it, and the crawl was
    slower (1,031 vs 1,138 pages/s) for more CPU (1.05 vs 0.89 ms per page).
    """

    def __init__(self, sink: ArchiveSink, max_bytes: int) -> None:
        self._sink = sink
        self._max_bytes = max_bytes
        self._appending: set[asyncio.Task[None]] = set()
        self._done: list[_Done] = []
        self._failure: StagingError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pages = 0
        self.bytes = 0

    def write(self, ex: Exchange) -> asyncio.Future[dict[str, Any]]:
        """Queue one exchange for the archive; resolves to its response's location (``warc``, ``offset``,
        ``length``) once its members are in the stream."""
        loop = self._loop
        if loop is None:  # an archiver serves one crawl in one loop (get_running_loop costs a getpid() syscall)
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        try:
            members, length = _compress(_prepare(ex, self._max_bytes))
            item: _Done = (fut, members, length)
        except Exception as exc:
            item = (fut, exc, 0)
        else:
            where = None if self._done or self._failure else self._sink.append_nowait(members)
            if where is not None:  # the common case: into the stream's buffer at once, the page need not wait
                self.pages += 1
                self.bytes += len(members)
                fut.set_result({"warc": where[0], "offset": where[1], "length": length})
                return fut
        if not self._done:
            loop.call_soon(self._drain)  # after the pages the loop is at now: one append for all of them
        self._done.append(item)
        return fut

    async def aclose(self) -> None:
        """Wait until every page queued so far is in the stream (before the stream closes: nothing is appended to
        an archive part after its checkpoint); raises the archive's failure, if it had one."""
        while True:
            self._drain()  # pages queued since (a worker finishing its page) too
            pending = [t for t in self._appending if not t.done()]
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        if self._failure is not None:  # also for pages nobody awaited (a list page gives no records)
            raise self._failure

    def _drain(self) -> None:
        batch, self._done = self._done, []
        if batch:
            self._deliver(batch)

    def _fail(self, fut: asyncio.Future[dict[str, Any]], exc: StagingError) -> None:
        self._failure = self._failure or exc
        if not fut.done():
            fut.set_exception(exc)
            fut.exception()  # retrieved: a page that never awaits it (no records) must not log it at exit; the
            # crawl fails with it all the same (``aclose``)

    def _deliver(self, batch: list[_Done]) -> None:
        task = asyncio.ensure_future(self._append(batch))
        self._appending.add(task)
        task.add_done_callback(self._appending.discard)

    async def _append(self, batch: list[_Done]) -> None:
        ready = [(fut, out, length) for fut, out, length in batch if isinstance(out, bytes)]
        for fut, out, _ in batch:
            if isinstance(out, BaseException):
                self._fail(fut, StagingError(f"page archive: {type(out).__name__}: {out}"))
        if not ready:
            return
        data = b"".join(members for _, members, _ in ready)
        try:
            uri, offset = await self._sink.append(data)
        except Exception as exc:
            failure = exc if isinstance(exc, StagingError) else StagingError(f"page archive: {exc}")
            for fut, _, _ in ready:
                self._fail(fut, failure)
            return
        self.pages += len(ready)
        self.bytes += len(data)
        for fut, members, length in ready:
            if not fut.done():
                fut.set_result({"warc": uri, "offset": offset, "length": length})
            offset += len(members)


@dataclass(frozen=True, slots=True)
class ArchivedPage:
    """A response read back from the archive (with its rendered DOM, for a browser page)."""

    url: str
    status: int
    headers: dict[str, str]
    body: bytes
    fetched_at: datetime
    warc: str
    offset: int
    length: int
    rendered: bytes | None = None

    @property
    def pointer(self) -> dict[str, Any]:
        return {"warc": self.warc, "offset": self.offset, "length": self.length}


def _parse_http(block: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = block.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _members(data: bytes, uri: str) -> Iterator[tuple[int, int, bytes]]:
    """(offset, length, inflated bytes) of each gzip member: the offsets lineage points at."""
    view, pos, n = memoryview(data), 0, len(data)
    while pos < n:
        start, z, out = pos, zlib.decompressobj(31), []
        while not z.eof:
            if pos >= n:
                raise StagingError(f"{uri}: archive truncated in the gzip member at offset {start}")
            chunk = view[pos : pos + 65536]
            try:
                out.append(z.decompress(chunk))
            except zlib.error as exc:
                raise StagingError(f"{uri}: not a gzip member at offset {start}: {exc}") from None
            pos += len(chunk)
        pos -= len(z.unused_data)
        yield start, pos - start, b"".join(out)


def _warc_record(raw: bytes, uri: str, offset: int) -> tuple[dict[str, str], bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    if not sep or not lines[0].startswith("WARC/"):
        raise StagingError(f"{uri}: no WARC record at offset {offset}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        raise StagingError(f"{uri}: WARC record at offset {offset} has no Content-Length") from None
    return headers, rest[:length]


def _fetched(headers: Mapping[str, str]) -> datetime:
    try:
        return datetime.fromisoformat(headers.get("warc-date", "").replace("Z", "+00:00"))
    except ValueError:
        return _now()


def archived_pages(uri: str, data: bytes, *, base: int = 0) -> Iterator[ArchivedPage]:
    """Every response of one archive part (``data``: its bytes, from ``base`` on) with its offset, in order.

    A response followed by a ``conversion`` record referring to it comes with that DOM.
    """
    pending: ArchivedPage | None = None
    pending_id = ""
    for offset, length, raw in _members(data, uri):
        headers, block = _warc_record(raw, uri, base + offset)
        kind = headers.get("warc-type")
        if kind == "response":
            if pending is not None:
                yield pending
            status, http_headers, body = _parse_http(block)
            url = headers.get("warc-target-uri", "")
            pending = ArchivedPage(url, status, http_headers, body, _fetched(headers), uri, base + offset, length)
            pending_id = headers.get("warc-record-id", "")
        elif kind == "conversion" and pending is not None and headers.get("warc-refers-to") == pending_id:
            pending = ArchivedPage(**{**_fields(pending), "rendered": block})
    if pending is not None:
        yield pending


def _fields(page: ArchivedPage) -> dict[str, Any]:
    return {name: getattr(page, name) for name in page.__slots__}


def read_member(data: bytes, offset: int, uri: str = "") -> ArchivedPage:
    """The response record at ``offset`` of an archive part (``data``), with its conversion if one follows."""
    if offset < 0 or offset >= len(data):
        raise StagingError(f"{uri}: no WARC record at offset {offset} ({len(data)} bytes)")
    for page in archived_pages(uri, data[offset:], base=offset):
        return page
    raise StagingError(f"{uri}: no WARC response record at offset {offset}")
