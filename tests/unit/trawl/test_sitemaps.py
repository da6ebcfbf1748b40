"""Sitemap parsing: urlset and index, gzip, relative and odd entries, the protocol's limits, memory kept flat."""

from __future__ import annotations

import gc
import gzip
import os
from pathlib import Path

import pytest

from tests.helpers.sitemap_site import sitemap_xml, urlset
from trawl.sitemaps import MAX_URLS, SitemapEntry, SitemapError, parse_sitemap, sitemap_entries


def test_urlset_entries_with_lastmod_in_order() -> None:
    body = urlset([("http://a.test/1", "2026-01-01"), ("http://a.test/2", None), ("/3", "2026-02-02T10:00:00Z")])
    assert list(parse_sitemap(body, "http://a.test/sitemap.xml")) == [
        SitemapEntry("http://a.test/1", "2026-01-01"),
        SitemapEntry("http://a.test/2", None),
        SitemapEntry("http://a.test/3", "2026-02-02T10:00:00Z"),  # relative: against the sitemap's URL
    ]


def test_gzip_is_inflated_without_content_encoding() -> None:
    body = gzip.compress(urlset([("http://a.test/1", None)]))
    assert [e.url for e in parse_sitemap(body, "http://a.test/s.xml.gz")] == ["http://a.test/1"]


def test_index_entries_are_marked() -> None:
    body = sitemap_xml(["http://a.test/s1.xml", "http://a.test/s2.xml.gz"])
    entries = list(parse_sitemap(body, "http://a.test/index.xml"))
    assert [(e.url, e.index) for e in entries] == [("http://a.test/s1.xml", True), ("http://a.test/s2.xml.gz", True)]


def test_non_http_entries_skipped_and_whitespace_stripped() -> None:
    body = urlset([("mailto:x@a.test", None), ("  http://a.test/ok  ", None), ("javascript:void(0)", None)])
    assert [e.url for e in parse_sitemap(body, "http://a.test/s.xml")] == ["http://a.test/ok"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html><body>not a sitemap</body></html>", "root element <html>"),
        (b"\x1f\x8bnot gzip at all", "bad gzip data"),
        (b"", "not a sitemap"),
    ],
)
def test_unreadable_sitemaps_name_the_url_and_why(body: bytes, error: str) -> None:
    with pytest.raises(SitemapError, match=error) as info:
        list(parse_sitemap(body, "http://a.test/broken.xml"))
    assert "http://a.test/broken.xml" in str(info.value)


def test_entities_are_not_expanded() -> None:
    body = (
        b'<?xml version="1.0"?><!DOCTYPE urlset [<!ENTITY x "http://evil.test/">]>'
        b'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><url><loc>&x;1</loc></url></urlset>'
    )
    assert all("evil" not in e.url for e in parse_sitemap(body, "http://a.test/s.xml"))


def test_url_count_capped_at_the_protocol_limit() -> None:
    body = gzip.compress(urlset([(f"http://a.test/{i}", None) for i in range(MAX_URLS + 25)]), 1)
    entries = list(parse_sitemap(body, "http://a.test/s.xml.gz"))
    assert len(entries) == MAX_URLS
    assert entries[-1].url == f"http://a.test/{MAX_URLS - 1}"


def test_uncompressed_size_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trawl.sitemaps.MAX_BYTES", 10_000)
    body = gzip.compress(urlset([(f"http://a.test/{i}", None) for i in range(2_000)]))
    with pytest.raises(SitemapError, match="more than 10000 bytes uncompressed"):
        list(parse_sitemap(body, "http://a.test/s.xml.gz"))


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _growth(n: int) -> tuple[int, int]:
    """RSS growth while streaming an n-URL gzip'd sitemap (sampled every 1,000 entries), and the XML's size."""
    xml = urlset([(f"http://a.test/products/{i:08d}", "2026-11-01T00:00:00+00:00") for i in range(n)])
    body = gzip.compress(xml, 1)
    size = len(xml)
    del xml
    gc.collect()
    before = peak = _rss()
    count = 0
    for count, _ in enumerate(parse_sitemap(body, "http://a.test/s.xml.gz"), 1):
        if count % 1000 == 0:
            peak = max(peak, _rss())
    assert count == n
    return peak - before, size


def test_a_50000_url_sitemap_is_streamed_not_held_as_a_tree() -> None:
    small, _ = _growth(5_000)
    big, size = _growth(MAX_URLS)
    # A tree of 50,000 <url> elements costs lxml tens of MB; streamed, memory stays flat with the sitemap's size.
    assert big < size / 4, (big, size)
    assert big < small + 4 * 1024 * 1024, (small, big)


async def test_indexes_nested_followed_once_each() -> None:
    docs = {
        "http://a.test/index.xml": sitemap_xml(["http://a.test/inner.xml", "http://a.test/s1.xml"]),
        "http://a.test/inner.xml": sitemap_xml(["http://a.test/s2.xml.gz", "http://a.test/index.xml"]),
        "http://a.test/s1.xml": urlset([("http://a.test/1", "d1")]),
        "http://a.test/s2.xml.gz": gzip.compress(urlset([("http://a.test/2", None)])),
    }
    fetched: list[str] = []

    async def fetch(url: str) -> bytes | None:
        fetched.append(url)
        return docs.get(url)

    got = [e async for e in sitemap_entries(["http://a.test/index.xml", "http://a.test/missing.xml"], fetch)]
    assert got == [SitemapEntry("http://a.test/2", None), SitemapEntry("http://a.test/1", "d1")]
    assert sorted(fetched) == sorted([*docs, "http://a.test/missing.xml"])  # each once: the loop is not re-read
