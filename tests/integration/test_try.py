"""`trawl try`: one page through the real request path, printed; no Prefect, staging or database."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from sinks.stage import LocalStager
from tests.helpers.hostile import Hostile
from trawl.cli import main
from trawl.config import HtmlSource
from trawl.crawler import crawl_source
from trawl.demo.site import DemoSite
from trawl.fetch import Fetcher
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

TRAWL = str(Path(sys.executable).parent / "trawl")

FIELDS = {
    "sku": {"selector": "span.sku", "required": True},
    "price": {"selector": "p.price", "type": "float"},
}


def _page(sku: str, price: str, links: int = 3) -> str:
    anchors = "".join(f'<a href="/p/{i}">{i}</a><a href="/other/{i}">o</a>' for i in range(links))
    return f'<html><body><span class="sku">{sku}</span><p class="price">{price}</p>{anchors}</body></html>'


class Site:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests[request.path] += 1
        if request.path == "/robots.txt":
            return web.Response(text="User-agent: *\nDisallow: /private\n")
        if request.path == "/bad":
            return web.Response(text=_page("B-1", "twelve"), content_type="text/html")
        return web.Response(text=_page("A-1", "12.50"), content_type="text/html")


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()
    app = web.Application()
    app.router.add_get("/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    s.url = f"http://127.0.0.1:{tcp._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield s
    await runner.cleanup()


def _write(path: Path, sources: list[dict[str, Any]]) -> str:
    path.write_text(yaml.safe_dump({"sources": sources}))
    return str(path)


def _html(url: str, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "html",
        "name": "shop",
        "start_urls": [f"{url}/"],
        "follow": {"allow": [r"/p/\d+$"]},
        "key": "sku",
        "fields": FIELDS,
    } | spec


async def _try(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["try", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        TRAWL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_html_page_answers_in_under_two_seconds(site: Site, tmp_path: Path) -> None:
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [_html(site.url)])
    started = time.monotonic()
    code, out, err = await _cli("try", sources, "--source", "shop", f"{site.url}/p/0")
    seconds = time.monotonic() - started
    assert code == 0 and "record 1: key 'A-1': valid" in out, err
    print(f"trawl try, html page, whole process: {seconds:.2f} s")
    assert seconds < 2.0


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_STAGING", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv("TRAWL_LOG_FORMAT", "json")


async def test_html_page_record_verdict_links_and_outcome(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [_html(site.url)])
    started = time.monotonic()
    code, out, err = await _try(capsys, sources, "--source", "shop", f"{site.url}/p/0")
    assert time.monotonic() - started < 2.0  # in-process, without the interpreter's start
    assert code == 0, err
    assert "outcome: fetched (HTTP 200, 1 attempt(s)" in out
    assert "record 1: key 'A-1': valid" in out and '  price: "12.50"' in out
    assert "links the follow rules keep: 3" in out and f"{site.url}/p/2" in out and "/other/" not in out
    assert site.requests["/p/0"] == 1
    code, out, err = await _try(capsys, sources, "--source", "shop", f"{site.url}/p/0", "--json")
    result = json.loads(out)
    assert code == 0 and result["outcome"] == "fetched" and result["http_status"] == 200
    assert result["records"][0]["valid"] is True and result["records"][0]["data"]["sku"] == "A-1"
    assert sorted(result["links"]) == [f"{site.url}/p/{i}" for i in range(3)]
    assert not await asyncio.to_thread((tmp_path / "staging").exists)  # nothing staged


async def test_page_whose_fields_fail_validation_shows_the_verdict(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [_html(site.url)])
    code, out, _ = await _try(capsys, sources, "--source", "shop", f"{site.url}/bad")
    assert code == 1
    assert "outcome: fetched" in out and "record 1: key 'B-1': REJECTED: price:" in out and "twelve" in out
    code, out, _ = await _try(capsys, sources, "--source", "shop", f"{site.url}/bad", "--json")
    [record] = json.loads(out)["records"]
    assert record["valid"] is False and record["reasons"][0].startswith("price:")


async def test_page_blocked_by_robots_says_so_and_fetches_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [_html(site.url)])
    code, out, _ = await _try(capsys, sources, "--source", "shop", f"{site.url}/private/1")
    assert code == 1
    assert "outcome: skipped_robots" in out and "disallowed by robots.txt" in out
    assert "records: none from this page" in out
    assert site.requests["/private/1"] == 0 and site.requests["/robots.txt"] == 1


async def test_guarded_address_is_refused(
    hostile: Hostile, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", json.dumps(hostile.allowed))
    url = hostile.forbidden.url("/")
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [_html(url.rstrip("/"), robots=False)])
    code, out, _ = await _try(capsys, sources, "--source", "shop", url)
    assert code == 1 and "outcome: blocked_network" in out
    assert hostile.forbidden.hits == 0


async def test_browser_page(demo_site: DemoSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {
        "kind": "browser",
        "name": "js",
        "start_urls": [f"{demo_site.url}/js/"],
        "follow": {"allow": [r"/js/products/\d+$"]},
        "key": "sku",
        "fields": {"sku": {"selector": "span.sku", "required": True}, "name": {"selector": "h1.name"}},
        "wait_for": {"selector": "span.sku"},
    }
    sources = await asyncio.to_thread(_write, tmp_path / "s.yaml", [spec])
    # As a user runs it (a process of its own: Playwright drives Chromium from the command's event loop).
    code, out, err = await _cli("try", sources, "--source", "js", f"{demo_site.url}/js/products/3", "--json")
    result = json.loads(out)
    assert code == 0, err
    assert result["via"] == "http+browser" and result["outcome"] == "fetched"
    assert result["records"][0]["valid"] and result["records"][0]["data"]["sku"]


async def test_from_archive_fetches_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _html(site.url, fields={"sku": {"selector": "span.nothing"}}, key="url")
    settings = Settings(staging=f"file://{tmp_path / 'staging'}", allowed_networks=["127.0.0.0/8"])
    stager = await asyncio.to_thread(LocalStager, tmp_path / "staging")
    async with Fetcher(settings) as fetcher:
        await crawl_source(
            HtmlSource.model_validate({**spec, "follow": {"allow": [], "max_depth": 0}}),
            run_id="run-a",
            settings=settings,
            fetcher=fetcher,
            stager=stager,
        )
    served = sum(site.requests.values())
    fixed = await asyncio.to_thread(_write, tmp_path / "fixed.yaml", [_html(site.url)])
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", "[]")
    code, out, err = await _try(capsys, fixed, "--source", "shop", f"{site.url}/", "--from-archive", "run-a", "--json")
    result = json.loads(out)
    assert code == 0, err
    assert result["via"] == "archive" and result["records"][0]["data"]["sku"] == "A-1"
    assert result["archive"]["warc"].endswith(".warc.gz")
    assert sum(site.requests.values()) == served
    code, _out, err = await _try(capsys, fixed, "--source", "shop", f"{site.url}/nope", "--from-archive", "run-a")
    assert code == 2 and "is not in the archive of run run-a" in err
