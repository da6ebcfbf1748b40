"""trawl's contender: the full `html` crawl in-process, as a flow task runs it (without Prefect).

    python -m benchmarks.trawl_crawl --url http://127.0.0.1:PORT/index.html --out DIR > trawl.log
    python -m benchmarks.trawl_crawl --frontier-memory 20000,1000000

An ``HtmlSource`` (start URL, follow pattern, record pattern, four fields, key
``sku``) crawled by ``crawl_source`` through one ``Fetcher`` (robots.txt,
network guard, per-host gate, breaker, retries) into a ``LocalStager`` (gzip
JSON Lines parts and manifests under ``DIR/staging``), JSON logs at INFO on
stdout. Per-host politeness allows 64 in flight, like the other contenders.

Writes ``DIR/report.json``: timing of the crawl itself (without interpreter
start-up and imports), the process's peak RSS and the source's stats.

``--frontier-memory N[,N...]`` measures instead what the in-memory frontier
costs per URL, with ``tracemalloc``, and prints it as JSON: the seen set (a
``set[int]`` of ``url_hash`` values, as ``HtmlConnector`` keeps it) grown to N
URLs, then a ``MemoryFrontier`` with the same N URLs queued. The URL strings are
made before tracing starts: the seen set does not keep them, and a queued
URL's string is reported on its own (its size depends on the site, not on
trawl).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from benchmarks.rss import peak_rss_mb
from benchmarks.site import FIELD_SELECTORS, FOLLOW_ALLOW, RECORD_URLS
from sinks.stage import LocalStager
from trawl.config import AnySource, FollowRules, HtmlField, HtmlSource
from trawl.crawler import crawl_source, new_run_id
from trawl.errors import SourceFailed
from trawl.fetch import Fetcher
from trawl.logs import configure_logging
from trawl.settings import Settings

__all__ = ["bench_settings", "bench_source", "crawl", "frontier_memory", "main"]

_FIELD_TYPES = {"price": "float"}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_source(seeds: list[str], *, archive: bool = True) -> HtmlSource:
    """The benchmark crawl as a trawl source (what a user would put in a sources file)."""
    fields = {
        name: HtmlField.model_validate(
            {"selector": selector, "attr": attr, "type": _FIELD_TYPES.get(name, "text"), "required": name == "sku"}
        )
        for name, (selector, attr) in FIELD_SELECTORS.items()
    }
    return HtmlSource(
        kind="html",
        name="bench",
        start_urls=seeds,
        follow=FollowRules(allow=[FOLLOW_ALLOW], max_depth=1000),
        record_urls=RECORD_URLS,
        key="sku",
        fields=fields,
        archive=archive,
    )


def bench_settings(concurrency: int, overrides: dict[str, Any] | None = None) -> Settings:
    """Politeness opened up to ``concurrency`` in flight to the one host; loopback allowed."""
    # The runner starts this process without TRAWL_* variables, so nothing else comes from the environment.
    return Settings(
        per_host_concurrency=concurrency,
        total_concurrency=concurrency,
        allowed_networks=["127.0.0.0/8"],
        **(overrides or {}),
    )


async def crawl(
    seeds: list[str],
    out_dir: Path,
    *,
    concurrency: int = 64,
    overrides: dict[str, Any] | None = None,
    archive: bool = True,
) -> dict[str, Any]:
    """Crawl the benchmark source into ``out_dir/staging``; returns the report."""
    source = bench_source(seeds, archive=archive)
    return await measured_crawl("trawl", source, bench_settings(concurrency, overrides), out_dir)


async def measured_crawl(contender: str, source: AnySource, settings: Settings, out_dir: Path) -> dict[str, Any]:
    """One source crawled in this process into ``out_dir/staging``: its stats, wall and CPU seconds."""
    stager = LocalStager(out_dir / "staging")
    started_at = time.time()
    t0, c0, l0 = time.perf_counter(), _cpu(), time.thread_time()
    async with Fetcher(settings) as fetcher:
        try:
            result = await crawl_source(source, run_id=new_run_id(), settings=settings, fetcher=fetcher, stager=stager)
        except SourceFailed as exc:  # staged and committed all the same; the runner reports it
            result = exc.result
    return {
        "contender": contender,
        "started_at": started_at,
        "crawl_seconds": time.perf_counter() - t0,
        "crawl_cpu_s": _cpu() - c0,
        "loop_cpu_s": time.thread_time() - l0,  # the event loop's thread alone (the process's other threads not)
        "status": result.status,
        "error": result.error,
        "manifest": result.manifest,
        "peak_rss_mb": peak_rss_mb(),
        **result.stats,
    }


def frontier_memory(n: int) -> dict[str, Any]:
    """Bytes per URL of the in-memory frontier at ``n`` distinct URLs: seen set, queue, the URL strings."""
    from trawl.connectors.base import url_hash
    from trawl.frontier.memory import MemoryFrontier

    # Shaped like a crawl's URLs; built before tracing, as a crawl's parser builds them before they are scheduled.
    urls = [f"https://shop-{i % 7}.example.com/p/{i:07d}.html" for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        seen: set[int] = set()
        for url in urls:
            seen.add(url_hash(url))
        seen_bytes = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        frontier = MemoryFrontier("bench", "run")
        for url in urls:
            frontier.add(url, 1)
        queued_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return {
        "urls": n,
        "seen_set_bytes_per_url": seen_bytes / n,
        "queued_bytes_per_url": queued_bytes / n,  # the queue's entry for a URL not yet fetched
        "url_str_bytes": sum(map(sys.getsizeof, urls)) / n,  # kept alive by the queue, not by the seen set
        "avg_url_chars": sum(map(len, urls)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", default=[], help="start URL (repeat for more seeds)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--settings", type=orjson.loads, default={}, help="JSON object of Settings overrides")
    parser.add_argument("--no-archive", action="store_true", help="the source with `archive: false`")
    parser.add_argument(
        "--frontier-memory",
        metavar="N[,N...]",
        help="print the in-memory frontier's bytes per URL at N distinct URLs as JSON (no crawl)",
    )
    args = parser.parse_args()
    if args.frontier_memory:
        sizes = [int(n) for n in args.frontier_memory.split(",")]
        print(orjson.dumps([frontier_memory(n) for n in sizes]).decode())
        return
    if not args.url or args.out is None:
        parser.error("--url and --out are required for a crawl")
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging("json", "INFO")
    report = asyncio.run(
        crawl(args.url, args.out, concurrency=args.concurrency, overrides=args.settings, archive=not args.no_archive)
    )
    (args.out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
