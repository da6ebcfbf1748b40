"""Response bodies inflated by a bounded decoder, the same on every transport.

Every transport (aiohttp for ``html``, httpx for ``api``, Scrapy's download
handler for ``spider``) reads a body *raw* and passes it through one
:class:`BodyDecoder`, which undoes its ``Content-Encoding`` (gzip, deflate —
zlib-wrapped or raw —, brotli, zstd) a piece at a time. No step produces more
than :data:`PIECE` bytes at once, and the decoder stops with ``body larger than N
bytes`` as soon as the raw or the inflated size passes the limit: a few KB that
inflate to gigabytes cost no more memory than the limit itself.

Codings the decoder does not know are passed through undecoded (as aiohttp,
httpx and Scrapy do); :data:`ACCEPT_ENCODING` announces only the ones it knows.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

import brotli

from trawl.errors import PermanentFetchError

_ZSTD: Any
if sys.version_info >= (3, 14):  # pragma: no cover - the stdlib's module from 3.14 on
    from compression import zstd as _ZSTD
else:
    try:
        from backports import zstd as _ZSTD
    except ImportError:  # pragma: no cover - Scrapy depends on it; without it zstd is not asked for
        _ZSTD = None

__all__ = ["ACCEPT_ENCODING", "PIECE", "BodyDecoder", "body_too_large", "codings"]

PIECE = 64 * 1024
"""The most a decoding step produces at once (bytes)."""


class _Stage(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...

    def flush(self) -> Iterator[bytes]: ...


class _Gzip:
    """gzip, members one after another (RFC 1952); anything after the last member that is no gzip member is dropped."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._after = b""  # the first byte after a member, until the next tells whether another member starts
        self._done = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data and not self._done:
            if self._d.eof:
                data, self._after = self._after + data, b""
                if len(data) < 2:
                    self._after = data
                    return
                if not data.startswith(b"\x1f\x8b"):
                    self._done = True  # trailing padding after the last member: dropped
                    return
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = self._d.decompress(data, PIECE)
            data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            if out:
                yield out

    def flush(self) -> Iterator[bytes]:
        if not self._d.eof and (out := self._d.flush()):
            yield out


class _Deflate:
    """HTTP's ``deflate``: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send it."""

    def __init__(self) -> None:
        self._d: Any = None
        self._head = b""

    def _start(self, head: bytes) -> None:
        # A zlib header: compression method 8 and a header checksum that divides by 31 (RFC 1950).
        wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._d is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._start(data)
        while data and not self._d.eof:  # data after the end of the stream is dropped
            out = self._d.decompress(data, PIECE)
            data = self._d.unconsumed_tail
            if out:
                yield out

    def flush(self) -> Iterator[bytes]:
        if self._d is None:
            if not self._head:
                return
            self._start(self._head)
            yield from self.feed(b"")
            return
        if not self._d.eof and (out := self._d.flush()):
            yield out


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        out = self._d.process(data, output_buffer_limit=PIECE)
        if out:
            yield out
        # Output held back by the limit comes out with empty input, a piece at a time (a piece may overshoot
        # PIECE by one growth of brotli's buffer: ~1.5x).
        while out := self._d.process(b"", output_buffer_limit=PIECE):
            yield out

    def flush(self) -> Iterator[bytes]:
        yield from ()


class _Zstd:
    """zstd frames one after another (RFC 8878)."""

    def __init__(self) -> None:
        self._d = _ZSTD.ZstdDecompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._d.eof:
                data = self._d.unused_data + data
                if not data:
                    return
                self._d = _ZSTD.ZstdDecompressor()
            out = self._d.decompress(data, PIECE)
            data = b""
            if out:
                yield out
            if self._d.needs_input and not self._d.eof:
                return

    def flush(self) -> Iterator[bytes]:
        yield from ()


_STAGES: dict[str, type[_Stage]] = {"gzip": _Gzip, "x-gzip": _Gzip, "deflate": _Deflate, "br": _Brotli}
if _ZSTD is not None:
    _STAGES["zstd"] = _Zstd

_ERRORS: tuple[type[Exception], ...] = (zlib.error, brotli.error, *((_ZSTD.ZstdError,) if _ZSTD else ()))

ACCEPT_ENCODING = ", ".join(c for c in ("gzip", "deflate", "br", "zstd") if c in _STAGES)
"""The ``Accept-Encoding`` every transport sends: exactly the codings :class:`BodyDecoder` undoes."""


def codings(content_encoding: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` value, in the order they were applied (``identity`` left out)."""
    if not content_encoding:
        return []
    return [c for c in (p.strip().lower() for p in content_encoding.split(",")) if c and c != "identity"]


def body_too_large(url: str, limit: int) -> PermanentFetchError:
    """The one error for a body over the size limit (raw or inflated)."""
    return PermanentFetchError(f"body larger than {limit} bytes", url=url)


class BodyDecoder:
    """Undoes a body's ``Content-Encoding`` as it streams, within ``limit`` bytes (raw and inflated).

    ``decode(chunk)`` returns the inflated bytes of the next raw chunk, ``flush()``
    what is left at the end. Both raise PermanentFetchError ``body larger than
    {limit} bytes`` the moment either size passes ``limit`` (at most one
    :data:`PIECE` later), and ``cannot decode {coding} body: ...`` for data that
    is not what its coding says. Codings it does not know stop the decoding there:
    the body is kept as it came (still within the limit). With ``truncate`` a body
    over the limit is cut at ``limit`` bytes instead (``full`` says when), as
    robots.txt is read.
    """

    __slots__ = ("_limit", "_names", "_raw", "_stages", "_truncate", "_url", "full", "remaining", "size")

    def __init__(self, content_encoding: str | None, limit: int, url: str, *, truncate: bool = False) -> None:
        self._url = url
        self._limit = limit
        self._truncate = truncate
        self._raw = 0
        self.size = 0
        """Bytes handed out so far."""
        self.full = False
        """With ``truncate``: the limit was reached, the body is cut there and the rest need not be read."""
        applied = codings(content_encoding)
        undo: list[str] = []
        for coding in reversed(applied):  # the last applied is undone first
            if coding not in _STAGES:
                break
            undo.append(coding)
        self._names = undo
        self.remaining = applied[: len(applied) - len(undo)]
        """The codings left on the body it hands out (the ones it does not know, and those applied before them)."""
        self._stages: list[_Stage] = [_STAGES[c]() for c in undo]

    @property
    def identity(self) -> bool:
        """Whether the body passes through as it came (nothing to undo)."""
        return not self._stages

    def _through(self, data: bytes, i: int, *, final: bool) -> Iterator[bytes]:
        if i == len(self._stages):
            if data:
                yield data
            return
        stage = self._stages[i]
        try:
            pieces = list(stage.flush()) if final else None
            produced = iter(pieces) if pieces is not None else stage.feed(data)
            for piece in produced:
                yield from self._through(piece, i + 1, final=False)
        except _ERRORS as exc:
            raise PermanentFetchError(f"cannot decode {self._names[i]} body: {exc}", url=self._url) from None
        if final:
            yield from self._through(b"", i + 1, final=True)

    def _collect(self, pieces: Iterator[bytes]) -> bytes:
        out = []
        for piece in pieces:
            self.size += len(piece)
            if self.size > self._limit:
                if not self._truncate:
                    raise body_too_large(self._url, self._limit)
                out.append(piece[: len(piece) - (self.size - self._limit)])
                self.size, self.full = self._limit, True
                break
            out.append(piece)
        return b"".join(out)

    def decode(self, chunk: bytes) -> bytes:
        """The inflated bytes of the next raw chunk (may be empty)."""
        if self.full:
            return b""
        self._raw += len(chunk)
        if self._raw > self._limit:
            if not self._truncate:
                raise body_too_large(self._url, self._limit)
            chunk = chunk[: len(chunk) - (self._raw - self._limit)]
            self._raw = self._limit
            if not self._stages:
                self.full = True
        if not self._stages:
            self.size += len(chunk)
            return chunk
        return self._collect(self._through(chunk, 0, final=False))

    def flush(self) -> bytes:
        """What the decoders still hold at the end of the body."""
        if not self._stages or self.full:
            return b""
        return self._collect(self._through(b"", 0, final=True))
