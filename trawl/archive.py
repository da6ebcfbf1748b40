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

Writing is fastwarc (compiled; building a record ~30-60 µs where warcio's writer
spends ~250 µs of Python, see ``python -m benchmarks.archive``) with ISA-L gzip,
on a worker thread: the event loop only appends the finished gzip members to the
archive part.
"""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastwarc.warc import WarcRecord, WarcRecordType
from isal import isal_zlib

from trawl.errors import StagingError
from trawl.masking import MASK, mask_text, mask_url

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
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _header_value(name: str, value: str, secret: frozenset[str]) -> str:
    if name in _SENSITIVE or name in secret:
        return MASK
    return mask_text(value).replace("\r", " ").replace("\n", " ")


_GZIP_LEVEL = 1
"""ISA-L (``isal``) level 1: compression is nearly all of the archive's CPU, beside a crawl that is CPU-bound on
2 cores. A 22 KB page: 45 µs and 6.2 KB, where zlib takes 157 µs at level 1 (6.4 KB) and 591 µs at 6 (5.7 KB).
The output is a standard gzip member."""


def _member(record: WarcRecord) -> bytes:
    buf = io.BytesIO()
    record.write(buf, checksum_data=True)
    return isal_zlib.compress(buf.getvalue(), _GZIP_LEVEL, wbits=31)  # wbits 31: one gzip member per record


def _record(kind: WarcRecordType, url: str, at: str, content_type: str, block: bytes) -> WarcRecord:
    rec = WarcRecord()
    rec.init_headers(kind)
    rec.headers["WARC-Date"] = at
    rec.headers["WARC-Target-URI"] = url
    rec.headers["Content-Type"] = content_type
    rec.set_bytes_content(block)
    return rec


def warc_members(ex: Exchange, max_bytes: int) -> tuple[bytes, int]:
    """The gzip members of one exchange (response, request, conversion) and the response member's length.

    Runs on a worker thread (compression); the response comes first, so the offset of the
    returned bytes is the response's.
    """
    url = mask_url(ex.url)
    at = _warc_date(ex.fetched_at or _now())
    body = ex.body
    truncated = len(body) > max_bytes
    if truncated:
        body = body[:max_bytes]
    try:
        reason = HTTPStatus(ex.status).phrase
    except ValueError:
        reason = ""
    head = [f"HTTP/1.1 {ex.status} {reason}".rstrip()]
    for name, value in ex.headers.items():
        low = name.lower()
        if low == "content-encoding":
            head.append(f"X-Trawl-Original-Content-Encoding: {value}")
        elif low not in _DROPPED:
            head.append(f"{name}: {_header_value(low, value, frozenset())}")
    head.append(f"Content-Length: {len(body)}")
    block = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "replace") + body
    response = _record(WarcRecordType.response, url, at, "application/http; msgtype=response", block)
    if truncated:
        response.headers["WARC-Truncated"] = "length"
    response_id = response.record_id or ""
    parts = urlsplit(ex.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    req = [f"{ex.method} {mask_text(target)} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}"]
    secret = ex.secret_headers
    req += [
        f"{name}: {_header_value(name.lower(), value, secret)}"
        for name, value in ex.request_headers.items()
        if name.lower() != "host"
    ]
    request = _record(
        WarcRecordType.request, url, at, "application/http; msgtype=request", ("\r\n".join(req) + "\r\n\r\n").encode()
    )
    request.headers["WARC-Concurrent-To"] = response_id
    first = _member(response)
    out = [first, _member(request)]
    if ex.rendered is not None:
        conversion = _record(WarcRecordType.conversion, url, at, "text/html; charset=utf-8", ex.rendered)
        conversion.headers["WARC-Refers-To"] = response_id
        out.append(_member(conversion))
    return b"".join(out), len(first)


class Archiver:
    """Writes one source's exchanges into its archive stream; returns where each response landed."""

    def __init__(self, sink: ArchiveSink, max_bytes: int) -> None:
        self._sink = sink
        self._max_bytes = max_bytes
        self.pages = 0
        self.bytes = 0

    async def write(self, ex: Exchange) -> dict[str, Any]:
        """Archive one exchange (built and compressed off the event loop); its response's location."""
        members, length = await asyncio.to_thread(warc_members, ex, self._max_bytes)
        uri, offset = await self._sink.append(members)
        self.pages += 1
        self.bytes += len(members)
        return {"warc": uri, "offset": offset, "length": length}


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
