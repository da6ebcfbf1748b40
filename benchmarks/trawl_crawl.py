"""trawl's contender: the full `html` crawl in-process, as a flow task runs it (without Prefect).

    python -m benchmarks.trawl_crawl --url http://127.0.0.1:PORT/index.html --out DIR > trawl.log

An ``HtmlSource`` (start URL, follow pattern, record pattern, four fields, key
``sku``) crawled by ``crawl_source`` through one ``Fetcher`` (robots.txt,
network guard, per-host gate, breaker, retries) into a ``LocalStager`` (gzip
JSON Lines parts and manifests under ``DIR/staging``), JSON logs at INFO on
stdout. Per-host politeness allows 64 in flight, like the other contenders.

Writes ``DIR/report.json``: timing of the crawl itself (without interpreter
start-up and imports) and the source's stats.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.site import FIELD_SELECTORS, FOLLOW_ALLOW, RECORD_URLS
from sinks.stage import LocalStager
from trawl.config import AnySource, FollowRules, HtmlField, HtmlSource
from trawl.crawler import crawl_source, new_run_id
from trawl.errors import SourceFailed
from trawl.fetch import Fetcher
from trawl.logs import configure_logging
from trawl.settings import Settings

__all__ = ["bench_settings", "bench_source", "crawl", "main"]

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
        **result.stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", required=True, help="start URL (repeat for more seeds)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--settings", type=orjson.loads, default={}, help="JSON object of Settings overrides")
    parser.add_argument("--no-archive", action="store_true", help="the source with `archive: false`")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging("json", "INFO")
    report = asyncio.run(
        crawl(args.url, args.out, concurrency=args.concurrency, overrides=args.settings, archive=not args.no_archive)
    )
    (args.out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
