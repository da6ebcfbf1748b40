"""WARC records as trawl writes and reads them: offsets, masking, truncation, and a clear error on bad bytes."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from warcio.archiveiterator import ArchiveIterator

from trawl.archive import Archiver, Exchange, archived_pages, read_member, warc_members
from trawl.errors import StagingError
from trawl.masking import clear_secrets, register_secret

REPO = Path(__file__).resolve().parents[3]
AT = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)


def _exchange(i: int, **kw: object) -> Exchange:
    base: dict[str, object] = {
        "url": f"http://shop.test/p/{i}",
        "status": 200,
        "headers": {"content-type": "text/html", "content-encoding": "gzip", "etag": f'"e{i}"'},
        "body": f"<h1>page {i}</h1>".encode() * 10,
        "request_headers": {"User-Agent": "trawl/0.1", "Authorization": "Bearer abc"},
        "fetched_at": AT,
    }
    return Exchange(**(base | kw))  # type: ignore[arg-type]


def test_offsets_point_at_each_response_and_warcio_agrees() -> None:
    data, offsets = b"", []
    for i in range(5):
        members, length = warc_members(_exchange(i, rendered=b"<dom/>" if i == 2 else None), 1 << 20)
        offsets.append((len(data), length))
        data += members
    pages = list(archived_pages("file:///a.warc.gz", data))
    assert [(p.offset, p.length) for p in pages] == offsets
    assert [p.rendered for p in pages] == [None, None, b"<dom/>", None, None]
    for i, (offset, _) in enumerate(offsets):
        page = read_member(data, offset)
        assert page.url == f"http://shop.test/p/{i}" and page.body == f"<h1>page {i}</h1>".encode() * 10
        assert page.fetched_at == AT and page.headers["etag"] == f'"e{i}"'
        assert "content-encoding" not in page.headers and page.headers["x-trawl-original-content-encoding"] == "gzip"
    types = [r.rec_type for r in ArchiveIterator(io.BytesIO(data))]
    assert types.count("response") == 5 and types.count("request") == 5 and types.count("conversion") == 1


def test_request_headers_are_masked() -> None:
    register_secret("hunter2-very-secret")
    try:
        members, _ = warc_members(
            _exchange(
                1, url="http://shop.test/p?key=hunter2-very-secret", request_headers={"X-Key": "hunter2-very-secret"}
            ),
            1 << 20,
        )
    finally:
        clear_secrets()
    [_, request] = list(ArchiveIterator(io.BytesIO(members)))
    assert b"hunter2" not in request.content_stream().read()
    assert request.http_headers.get_header("X-Key") == "***"
    assert request.rec_headers.get_header("WARC-Target-URI") == "http://shop.test/p?key=***"
    members, _ = warc_members(_exchange(1), 1 << 20)
    [_, request] = list(ArchiveIterator(io.BytesIO(members)))
    assert request.http_headers.get_header("Authorization") == "***"


def test_a_secret_registered_later_is_masked_in_request_headers_archived_before() -> None:
    # The same request headers are built once for many pages: a secret known only later is masked from then on.
    headers = {"X-Key": "later-known-secret"}
    members, _ = warc_members(_exchange(1, request_headers=headers), 1 << 20)
    assert b"later-known-secret" in members  # not a secret yet
    register_secret("later-known-secret")
    try:
        members, _ = warc_members(_exchange(2, request_headers=headers), 1 << 20)
    finally:
        clear_secrets()
    [_, request] = list(ArchiveIterator(io.BytesIO(members)))
    assert request.http_headers.get_header("X-Key") == "***"


def test_a_body_over_the_cap_is_cut_and_marked() -> None:
    members, _ = warc_members(_exchange(1, body=b"x" * 5000), 1024)
    response = next(iter(ArchiveIterator(io.BytesIO(members))))  # read before the iterator moves on
    assert response.rec_headers.get_header("WARC-Truncated") == "length"
    assert len(response.content_stream().read()) == 1024


def test_truncated_or_wrong_bytes_name_the_file_and_offset() -> None:
    members, _ = warc_members(_exchange(1), 1 << 20)
    with pytest.raises(StagingError, match=r"a\.warc\.gz: archive truncated in the gzip member at offset 0"):
        list(archived_pages("a.warc.gz", members[:40]))
    with pytest.raises(StagingError, match=r"a\.warc\.gz: no WARC record at offset 999999"):
        read_member(members, 999999, "a.warc.gz")
    with pytest.raises(StagingError, match="not a gzip member at offset 0"):
        list(archived_pages("a.warc.gz", b"plain text, not gzip"))


def test_prefect_yaml_deploys_the_reextract_flow() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [dep] = [d for d in spec["deployments"] if d["entrypoint"] == "flows/reextract.py:reextract"]
    assert dep["name"] == "demo" and dep["parameters"]["sources_file"] == "examples/demo.yaml"
    from flows.reextract import reextract

    assert reextract.name == "reextract"
    assert set(reextract.parameters.required) == {"run_id"}


class _Sink:
    """An archive stream in memory: appended members, one part."""

    def __init__(self, fail: bool = False) -> None:
        self.data = b""
        self.fail = fail

    async def append(self, members: bytes) -> tuple[str, int]:
        if self.fail:
            raise StagingError("disk full")
        offset = len(self.data)
        self.data += members
        return "mem://part-00001.warc.gz", offset

    def append_nowait(self, members: bytes) -> tuple[str, int] | None:
        return None  # always the awaited path here (the stream's own buffer is tested with the stager)


async def test_archiver_gives_each_page_its_offset_in_order_of_the_stream() -> None:
    sink = _Sink()
    archiver = Archiver(sink, 1 << 20)
    futures = [archiver.write(_exchange(i, rendered=b"<dom/>" if i % 7 == 0 else None)) for i in range(200)]
    where = await asyncio.gather(*futures)
    await archiver.aclose()
    assert archiver.pages == 200 and archiver.bytes == len(sink.data)
    for i, w in enumerate(where):
        page = read_member(sink.data, w["offset"], w["warc"])
        assert page.url == f"http://shop.test/p/{i}" and page.offset == w["offset"] and page.length == w["length"]
        assert page.rendered == (b"<dom/>" if i % 7 == 0 else None)
    assert len(list(ArchiveIterator(io.BytesIO(sink.data)))) == 200 * 2 + len(range(0, 200, 7))


async def test_a_page_queued_while_the_archiver_closes_is_in_the_stream_when_the_close_returns() -> None:
    # A worker still finishing its page writes while a checkpoint's aclose() waits for the stream: that page
    # is appended before the close returns (not after the part it belongs to was closed), and nothing hangs.
    sink = _Sink()
    archiver = Archiver(sink, 1 << 20)
    for round_ in range(20):
        first = archiver.write(_exchange(round_ * 2))
        closing = asyncio.create_task(archiver.aclose())
        await asyncio.sleep(0)  # aclose() is waiting for the first page's append
        late = archiver.write(_exchange(round_ * 2 + 1))
        await asyncio.wait_for(closing, 5)
        assert first.done() and late.done()
        await asyncio.wait_for(archiver.aclose(), 5)
        for i, fut in ((round_ * 2, first), (round_ * 2 + 1, late)):
            w = await fut
            assert read_member(sink.data, w["offset"], w["warc"]).url == f"http://shop.test/p/{i}"
    assert archiver.pages == 40


async def test_archiver_failure_fails_the_pages_and_the_close() -> None:
    archiver = Archiver(_Sink(fail=True), 1 << 20)
    unawaited = archiver.write(_exchange(1))  # a list page: nobody awaits it, the crawl still fails
    with pytest.raises(StagingError, match="disk full"):
        await archiver.write(_exchange(2))
    with pytest.raises(StagingError, match="disk full"):
        await archiver.aclose()
    assert unawaited.done()
