"""The ceiling: the simplest fast crawler doing the same crawl, aiohttp + selectolax in one process.

    python -m benchmarks.minimal --url http://127.0.0.1:PORT/index.html --out DIR [--concurrency 64]

What it does is what the other contenders do, nothing more: reads robots.txt
once and checks every URL against it, fetches every page (64 in flight on one
keep-alive pool), parses it with Lexbor, takes the four fields of product pages,
follows the allowed links of every page (a 64-bit hash per seen URL), and writes
one JSON line per record. What it leaves out is what makes a crawler a product:
retries, per-host politeness, a network guard, circuit breakers, staging with
manifests, structured logs.

Writes ``DIR/records.jsonl`` and ``DIR/report.json`` (timing of the crawl itself,
without interpreter start-up, pages per HTTP status, the process's peak RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
from protego import Protego
from selectolax.lexbor import LexborHTMLParser

from benchmarks.rss import peak_rss_mb
from benchmarks.site import FIELD_SELECTORS, FOLLOW_ALLOW, RECORD_URLS

__all__ = ["crawl", "main"]

_SKIP = ("#", "mailto:", "javascript:", "tel:", "data:")
_AGENT = "trawl-bench-minimal"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Crawl:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        seeds: list[str],
        allow: str,
        record: str,
        fields: dict[str, tuple[str, str | None]],
        out: BinaryIO,
    ) -> None:
        self.session = session
        self.allow = re.compile(allow)
        self.record = re.compile(record)
        self.fields = fields
        self.out = out
        self.origins = {f"{p.scheme}://{p.netloc}" for p in map(urlsplit, seeds)}
        self.robots: dict[str, Protego] = {}
        self.seen: set[int] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.statuses: dict[str, Counter[str]] = {origin: Counter() for origin in self.origins}
        self.records = 0
        for url in seeds:
            self.schedule(url)

    def schedule(self, url: str) -> None:
        h = hash(url)
        if h not in self.seen:
            self.seen.add(h)
            self.queue.put_nowait(url)

    async def load_robots(self) -> None:
        for origin in self.origins:
            text = ""  # unavailable or not there: allow everything, as Scrapy and trawl's default do
            try:
                async with self.session.get(f"{origin}/robots.txt") as resp:
                    if resp.status == 200:
                        text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.robots[origin] = Protego.parse(text)

    def links(self, tree: LexborHTMLParser, url: str, origin: str) -> None:
        same_host = origin + "/"
        for a in tree.css("a[href]"):
            href = (a.attributes.get("href") or "").strip()
            if not href or href.startswith(_SKIP):
                continue
            # Root-relative links are the common case and a string join; urljoin costs ~18 us here.
            link = origin + href if href[0] == "/" and href[1:2] != "/" and "/." not in href else urljoin(url, href)
            link = link.partition("#")[0]
            if link.startswith(same_host) and self.allow.search(link):
                self.schedule(link)

    def extract(self, tree: LexborHTMLParser, url: str) -> None:
        row: dict[str, Any] = {"url": url}
        for name, (selector, attr) in self.fields.items():
            node = tree.css_first(selector)
            if node is None:
                row[name] = None
            elif attr:
                row[name] = node.attributes.get(attr)
            else:
                row[name] = " ".join(node.text().split())
        self.out.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
        self.records += 1

    async def page(self, url: str) -> None:
        origin = url[: url.index("/", url.index("//") + 2)]
        if not self.robots[origin].can_fetch(url, _AGENT):
            self.statuses[origin]["robots"] += 1
            return
        try:
            async with self.session.get(url) as resp:
                status = resp.status
                ctype = resp.content_type
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[origin][type(exc).__name__] += 1
            return
        self.statuses[origin][str(status)] += 1
        if status != 200 or ctype != "text/html":
            return
        tree = LexborHTMLParser(body)
        if self.record.search(url):
            self.extract(tree, url)
        self.links(tree, url, origin)

    async def worker(self) -> None:
        while True:
            url = await self.queue.get()
            try:
                await self.page(url)
            finally:
                self.queue.task_done()


async def crawl(
    seeds: list[str],
    out_dir: Path,
    *,
    allow: str,
    record: str,
    fields: dict[str, tuple[str, str | None]],
    concurrency: int = 64,
) -> dict[str, Any]:
    """Crawl from ``seeds`` into ``out_dir/records.jsonl``; returns the report."""
    t0, c0 = time.perf_counter(), _cpu()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    with (out_dir / "records.jsonl").open("wb") as out:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"User-Agent": _AGENT}) as s:
            c = _Crawl(s, seeds, allow, record, fields, out)
            await c.load_robots()
            workers = [asyncio.create_task(c.worker()) for _ in range(concurrency)]
            await c.queue.join()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return {
        "contender": "minimal",
        "crawl_seconds": time.perf_counter() - t0,
        "crawl_cpu_s": _cpu() - c0,
        "pages": sum(n["200"] for n in c.statuses.values()),
        "statuses_by_origin": {origin: dict(n) for origin, n in c.statuses.items()},
        "records": c.records,
        "discovered": len(c.seen),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", required=True, help="start URL (repeat for more seeds)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(
        crawl(
            args.url,
            args.out,
            allow=FOLLOW_ALLOW,
            record=RECORD_URLS,
            fields=FIELD_SELECTORS,
            concurrency=args.concurrency,
        )
    )
    (args.out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
