"""The page archive: what html, browser and spider sources fetched, read back with a standard WARC reader."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from warcio.archiveiterator import ArchiveIterator

from sinks.stage import LocalStager
from trawl.archive import read_member
from trawl.config import BrowserSource, HtmlSource, SpiderSource
from trawl.crawler import crawl_source
from trawl.demo.site import DemoSite
from trawl.fetch import Fetcher
from trawl.masking import clear_secrets, register_secret
from trawl.settings import Settings
from trawl.staging import Manifest

pytestmark = [pytest.mark.integration]

FIELDS = {
    "sku": {"selector": "span.sku", "required": True},
    "name": {"selector": "h1.name", "required": True},
    "price": {"selector": "p.price", "attr": "data-amount", "type": "float"},
}


def _html(site: DemoSite, **spec: Any) -> HtmlSource:
    base = {
        "kind": "html",
        "name": "products",
        "start_urls": [f"{site.url}/catalogue/page/1"],
        "follow": {"allow": [r"/catalogue/page/1$", r"/products/\d+$"], "max_depth": 1},
        "record_urls": r"/products/\d+$",
        "key": "sku",
        "fields": FIELDS,
        "robots": False,
    }
    return HtmlSource.model_validate(base | spec)


async def crawl(source: Any, settings: Settings, root: Path, run_id: str = "run-1") -> tuple[LocalStager, Manifest]:
    stager = await asyncio.to_thread(LocalStager, root)
    async with Fetcher(settings) as fetcher:
        await crawl_source(source, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager)
    [manifest] = [m for m in await stager.manifests("raw") if m.run_id == run_id]
    return stager, manifest


def _warc_records(data: bytes) -> list[dict[str, Any]]:
    """Every record, as warcio (the standard reader) sees it."""
    out = []
    for rec in ArchiveIterator(io.BytesIO(data)):
        entry: dict[str, Any] = {
            "type": rec.rec_type,
            "uri": rec.rec_headers.get_header("WARC-Target-URI"),
            "id": rec.rec_headers.get_header("WARC-Record-ID"),
            "refers_to": rec.rec_headers.get_header("WARC-Refers-To"),
            "concurrent_to": rec.rec_headers.get_header("WARC-Concurrent-To"),
            "version": rec.rec_headers.protocol,
        }
        if rec.http_headers is not None:
            if rec.rec_type == "response":
                entry["status"] = int(rec.http_headers.get_statuscode())
            entry["headers"] = {k.lower(): v for k, v in rec.http_headers.headers}
        entry["body"] = rec.content_stream().read()
        out.append(entry)
    return out


async def _read(stager: LocalStager, manifest: Manifest) -> tuple[bytes, list[dict[str, Any]]]:
    data = b"".join([await stager.read_bytes(p.uri) for p in manifest.archive])
    return data, _warc_records(data)


async def test_every_response_reads_back_with_warcio(demo_site: DemoSite, settings: Settings, tmp_path: Path) -> None:
    source = _html(demo_site)
    stager, manifest = await crawl(source, settings, tmp_path / "staging")
    assert manifest.archive, "the records manifest lists the archive parts"
    for part in manifest.archive:
        assert part.uri.endswith(".warc.gz") and "/archive/source=products/" in part.uri
        raw = await stager.read_bytes(part.uri)
        assert hashlib.sha256(raw).hexdigest() == part.sha256 and len(raw) == part.bytes
    _data, records = await _read(stager, manifest)
    responses = [r for r in records if r["type"] == "response"]
    requests = [r for r in records if r["type"] == "request"]
    assert len(responses) == len(requests) == manifest.stats["pages"] > 1
    assert all(r["version"] == "WARC/1.1" for r in records)
    ids = {r["id"] for r in responses}
    assert {r["concurrent_to"] for r in requests} == ids
    async with aiohttp.ClientSession() as session:
        for r in responses:
            async with session.get(r["uri"]) as live:  # the demo site answers the same bytes every time
                body = await live.read()
                ctype = live.headers["Content-Type"]
            assert r["status"] == 200
            assert r["body"] == body, r["uri"]
            assert r["headers"]["content-type"] == ctype
            assert int(r["headers"]["content-length"]) == len(body)
    # Each record's row points at its response: the offset reads back the page it was extracted from.
    rows = [orjson.loads(line) for p in manifest.parts async for line in stager.read_part(p)]
    assert rows and all(row["archive"]["warc"] in {p.uri for p in manifest.archive} for row in rows)
    for row in rows:
        ptr = row["archive"]
        page = read_member(await stager.read_bytes(ptr["warc"]), ptr["offset"], ptr["warc"])
        assert page.url == row["url"] and row["data"]["sku"].encode() in page.body
        assert page.fetched_at.isoformat() == row["fetched_at"].replace("Z", "+00:00")


async def test_masked_secret_never_in_the_archive(demo_site: DemoSite, settings: Settings, tmp_path: Path) -> None:
    secret = "s3cr3t-token-value-42"
    register_secret(secret)
    try:
        source = _html(
            demo_site,
            urls=[f"{demo_site.url}/products/1?token={secret}"],
            start_urls=[],
            headers={"Authorization": f"Bearer {secret}", "X-Api-Token": secret, "Accept-Language": "en"},
        )
        stager, manifest = await crawl(source, settings, tmp_path / "staging")
        data, records = await _read(stager, manifest)
    finally:
        clear_secrets()
    inflated = gzip.decompress(data)  # every member: gzip reads them all
    assert secret.encode() not in data and secret.encode() not in inflated
    [request] = [r for r in records if r["type"] == "request"]
    assert request["headers"]["authorization"] == "***" and request["headers"]["x-api-token"] == "***"
    assert request["headers"]["accept-language"] == "en"
    assert "token=***" in request["uri"]


async def test_archive_off_and_size_cap(demo_site: DemoSite, settings: Settings, tmp_path: Path) -> None:
    stager, manifest = await crawl(_html(demo_site, archive=False), settings, tmp_path / "a")
    assert manifest.archive == () and not await asyncio.to_thread((tmp_path / "a" / "archive").exists)
    stager, manifest = await crawl(_html(demo_site, archive_max_bytes=1024), settings, tmp_path / "b")
    data = b"".join([await stager.read_bytes(p.uri) for p in manifest.archive])
    for rec in ArchiveIterator(io.BytesIO(data)):
        if rec.rec_type == "response":
            assert rec.rec_headers.get_header("WARC-Truncated") == "length"
            assert len(rec.content_stream().read()) == 1024


@pytest.mark.slow
async def test_browser_page_has_a_conversion_record(demo_site: DemoSite, tmp_path: Path) -> None:
    settings = Settings(allowed_networks=["127.0.0.0/8"], browser_wait_timeout=5.0, browser_navigation_timeout=10.0)
    source = BrowserSource.model_validate(
        {
            "kind": "browser",
            "name": "js",
            "key": "sku",
            "fields": FIELDS,
            "urls": [f"{demo_site.url}/js/products/3"],
            "render": "always",
            "wait_for": {"selector": "span.sku"},
            "robots": False,
        }
    )
    stager, manifest = await crawl(source, settings, tmp_path / "staging")
    _data, records = await _read(stager, manifest)
    [response] = [r for r in records if r["type"] == "response"]
    [conversion] = [r for r in records if r["type"] == "conversion"]
    assert conversion["refers_to"] == response["id"] and conversion["uri"] == response["uri"]
    assert b'<span class="sku">' not in response["body"] and b"Loading" in response["body"]  # as served
    assert b'<span class="sku">' in conversion["body"]  # the rendered DOM
    rows = [orjson.loads(line) for p in manifest.parts async for line in stager.read_part(p)]
    [row] = rows
    page = read_member(await stager.read_bytes(row["archive"]["warc"]), row["archive"]["offset"])
    assert page.rendered is not None and row["data"]["sku"].encode() in page.rendered


async def test_spider_responses_are_archived(demo_site: DemoSite, settings: Settings, tmp_path: Path) -> None:
    source = SpiderSource.model_validate(
        {
            "kind": "spider",
            "name": "books",
            "spider": "spiders.books:BooksSpider",
            "args": {"base_url": demo_site.url},
            "settings": {"CLOSESPIDER_PAGECOUNT": 8},
            "fields": {"sku": {"type": "text"}},
            "key": "sku",
            "robots": False,
        }
    )
    stager, manifest = await crawl(source, settings, tmp_path / "staging")
    _data, records = await _read(stager, manifest)
    responses = [r for r in records if r["type"] == "response"]
    assert len(responses) == manifest.stats["pages"] > 0
    rows = [orjson.loads(line) for p in manifest.parts async for line in stager.read_part(p)]
    assert rows and all("archive" in row for row in rows)
    for row in rows[:5]:
        page = read_member(await stager.read_bytes(row["archive"]["warc"]), row["archive"]["offset"])
        assert page.status == 200 and str(row["data"]["sku"]).encode() in page.body
