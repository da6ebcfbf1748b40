"""Browser sources on the demo site: rendering throughput, and adaptive mode against rendering everything.

    python -m benchmarks.browser [--pages 500] [--pool N]

1. ``render: always`` on N JS-rendered product pages (``/js/products/{i}``), the
   pool at its default size: pages/s and the peak RSS of the whole process tree
   (Python + Playwright's driver + Chromium's processes, sampled every 0.2 s).
2. A mix of 90% static and 10% JS pages (N in all), crawled with ``render: auto``
   and with ``render: always``: seconds each and the speed-up (target >= 5x).

Every run is checked: one record per page with the generator's SKU. Results go
to ``.trawl/bench/browser.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from trawl.config import BrowserSource
from trawl.connectors import SourceContext, SourceStats
from trawl.connectors.browser import BrowserConnector
from trawl.demo.site import DemoSiteThread
from trawl.fetch import Fetcher
from trawl.logs import configure_logging
from trawl.records import Outcome
from trawl.settings import Settings

__all__ = ["main"]

OUT = Path(".trawl/bench/browser.json")
FIELDS = {
    "sku": {"selector": "span.sku", "required": True},
    "name": {"selector": "h1.name", "required": True},
    "price": {"selector": "p.price", "attr": "data-amount", "type": "float"},
}


def _tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total = 0
    for pid in rss:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += rss[pid]
    return total / 1e6


class _PeakRss:
    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mb(me))
            self._stop.wait(0.2)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _crawl(urls: list[str], render: str, settings: Settings) -> dict[str, Any]:
    source = BrowserSource.model_validate(
        {
            "kind": "browser",
            "name": "bench",
            "urls": urls,
            "key": "sku",
            "fields": FIELDS,
            "render": render,
            "wait_for": {"selector": "span.sku"},
        }
    )
    outcomes: list[Outcome] = []

    async def emit(o: Outcome) -> None:
        outcomes.append(o)

    stats = SourceStats()
    records = 0
    t0 = time.perf_counter()
    async with Fetcher(settings) as fetcher:
        connector = BrowserConnector(source, SourceContext("bench", settings, fetcher, emit, stats))
        skus = set()
        async for record in connector.fetch():
            records += 1
            skus.add(record.data["sku"])
        navigations = sum(connector.pool.navigations.values())
    seconds = time.perf_counter() - t0
    return {
        "render": render,
        "pages": len(urls),
        "records": records,
        "unique_skus": len(skus),
        "seconds": round(seconds, 2),
        "pages_per_s": round(len(urls) / seconds, 1),
        "navigations": navigations,
        "paths": dict(stats.render),
        "outcomes": dict(stats.outcomes),
        "ok": len(skus) == len(urls) and stats.outcomes.get("fetched", 0) == len(urls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--pool", type=int, default=None, help="pages rendering at once (default: the setting's)")
    args = parser.parse_args(argv)
    configure_logging("json", "WARNING")
    overrides: dict[str, Any] = {"allowed_networks": ["127.0.0.0/8"], "per_host_concurrency": 16}
    if args.pool:
        overrides["browser_pages"] = args.pool
    settings = Settings(**overrides)
    n = args.pages
    with DemoSiteThread() as site:
        js = [f"{site.url}/js/products/{i}" for i in range(1, n + 1)]
        with _PeakRss() as rss:
            rendered = asyncio.run(_crawl(js, "always", settings))
        rendered["peak_tree_rss_mb"] = round(rss.peak, 0)
        n_js = n // 10
        mix = [f"{site.url}/products/{i}" for i in range(1, n - n_js + 1)]
        mix += [f"{site.url}/js/products/{i}" for i in range(n - n_js + 1, n + 1)]
        auto = asyncio.run(_crawl(mix, "auto", settings))
        always = asyncio.run(_crawl(mix, "always", settings))
    speedup = always["seconds"] / auto["seconds"] if auto["seconds"] else 0.0
    result = {
        "pool_size": settings.browser_pages,
        "js_pages": rendered,
        "mix": {"static": n - n_js, "js": n_js, "auto": auto, "always": always, "speedup": round(speedup, 2)},
        "ok": rendered["ok"] and auto["ok"] and always["ok"],
    }
    print(
        f"render always, {n} JS pages, pool {settings.browser_pages}: {rendered['pages_per_s']} pages/s, "
        f"peak RSS of the process tree {rendered['peak_tree_rss_mb']:.0f} MB ({'ok' if rendered['ok'] else 'FAILED'})"
    )
    print(
        f"mix {n - n_js} static + {n_js} JS: auto {auto['seconds']}s ({auto['navigations']} renders, "
        f"paths {auto['paths']}), always {always['seconds']}s -> adaptive {speedup:.1f}x faster (target >= 5x)"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {OUT}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
