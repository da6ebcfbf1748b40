"""The bounded body decoder: every coding round-trips at any chunking, and no body inflates past its limit."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest

from trawl.decode import ACCEPT_ENCODING, PIECE, BodyDecoder, codings
from trawl.errors import PermanentFetchError

DATA = os.urandom(3000) * 20 + b"trawl " * 20000


def _raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush()


def _zstd(data: bytes) -> bytes:
    zstd = pytest.importorskip("backports.zstd")
    return bytes(zstd.compress(data))


ENCODED = {
    "gzip": lambda d: gzip.compress(d),
    "x-gzip": lambda d: gzip.compress(d),
    "deflate": lambda d: zlib.compress(d),
    "deflate (raw)": _raw_deflate,
    "br": lambda d: brotli.compress(d),
    "zstd": _zstd,
    "gzip, br": lambda d: brotli.compress(gzip.compress(d)),
    "gzip (two members)": lambda d: gzip.compress(d[:5000]) + gzip.compress(d[5000:]),
    "zstd (two frames)": lambda d: _zstd(d[:5000]) + _zstd(d[5000:]),
    "identity": lambda d: d,
}


def decode_all(encoding: str | None, body: bytes, limit: int, chunk: int) -> bytes:
    decoder = BodyDecoder(encoding, limit, "http://127.0.0.1/x")
    out = [decoder.decode(body[i : i + chunk]) for i in range(0, len(body), chunk)]
    out.append(decoder.flush())
    return b"".join(out)


@pytest.mark.parametrize("chunk", [1, 1000, 10**7])
@pytest.mark.parametrize("name", list(ENCODED))
def test_every_coding_round_trips(name: str, chunk: int) -> None:
    body = ENCODED[name](DATA)
    header = name.split(" (")[0]
    assert decode_all(header, body, len(DATA), chunk if chunk > 1 or len(body) < 20000 else 7) == DATA


def test_unknown_codings_pass_through_and_stop_the_decoding() -> None:
    assert decode_all("compress", DATA, len(DATA), 4096) == DATA
    gz = gzip.compress(DATA)
    decoder = BodyDecoder("compress, gzip", 10**7, "u")
    assert decoder.remaining == ["compress"]
    assert decoder.decode(gz) + decoder.flush() == DATA
    assert BodyDecoder("GZIP , identity", 1, "u").remaining == []
    assert codings(" gzip,  br ,identity") == ["gzip", "br"]
    assert "gzip" in ACCEPT_ENCODING and "br" in ACCEPT_ENCODING


def test_trailing_padding_after_gzip_is_dropped() -> None:
    assert decode_all("gzip", gzip.compress(DATA) + b"\0\0\0", len(DATA), 4096) == DATA


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_a_bomb_stops_at_the_limit_a_piece_at_a_time(coding: str) -> None:
    zeros = b"\0" * (64 * 2**20)
    body = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[coding](zeros)
    del zeros
    decoder = BodyDecoder(coding, 2**20, "http://127.0.0.1/bomb")
    with pytest.raises(PermanentFetchError, match=r"^body larger than 1048576 bytes$") as info:
        decoder.decode(body)  # one raw chunk that holds the whole bomb
    assert info.value.url == "http://127.0.0.1/bomb"
    assert decoder.size <= 2**20 + 2 * PIECE  # counted piece by piece: at most one piece past the limit


def test_the_raw_size_is_capped_too() -> None:
    decoder = BodyDecoder(None, 100, "u")
    decoder.decode(b"x" * 100)
    with pytest.raises(PermanentFetchError, match="body larger than 100 bytes"):
        decoder.decode(b"x")


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_a_body_that_is_not_its_coding_is_a_permanent_error(coding: str) -> None:
    decoder = BodyDecoder(coding, 10**6, "http://127.0.0.1/x")
    with pytest.raises(PermanentFetchError, match=f"cannot decode {coding} body"):
        decoder.decode(b"\xff" * 64 + b"definitely not compressed" * 10)
