"""`scrapy crawl NAME` from the repo root: the spiders in spiders/ stay a plain Scrapy project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from trawl.demo.site import PRODUCT_COUNT, DemoSiteThread, product

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def test_scrapy_crawl_books_from_the_repo_root(tmp_path: Path) -> None:
    out = tmp_path / "books.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCRAPY_", "TRAWL_"))}
    # Nothing from the internet: the public suffix list comes from tldextract's bundled copy (spiders/settings.py),
    # and a proxy that does not exist would make any stray request fail loudly.
    env |= {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}
    with DemoSiteThread() as site:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "scrapy",
                "crawl",
                "books",
                "-a",
                f"base_url={site.url}",
                "-O",
                str(out),
                "-s",
                "LOG_LEVEL=INFO",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        requests = dict(site.requests)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'finish_reason': 'finished'" in done.stderr
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines() if line.strip()]
    assert len(rows) == PRODUCT_COUNT
    by_sku = {r["sku"]: r for r in rows}
    assert len(by_sku) == PRODUCT_COUNT and by_sku[product(7).sku]["price"] == product(7).price
    assert requests.get("/robots.txt") == 1  # plain Scrapy's own robots.txt handling (ROBOTSTXT_OBEY)
