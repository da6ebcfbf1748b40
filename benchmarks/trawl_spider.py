"""A Scrapy spider run as a trawl `spider` source vs the same spider run by plain Scrapy: `make bench`.

    python -m benchmarks.trawl_spider [--pages 20000] [--repeat 1]

The spider is the Scrapy baseline of ``benchmarks.run`` (``benchmarks/scrapy_baseline.py``,
64 requests in flight, robots.txt obeyed). On the same generated site behind
nginx, one after the other, each in its own subprocess:

- ``scrapy``: ``scrapy runspider benchmarks/scrapy_baseline.py -O items.jsonl``, as people run it;
- ``trawl-spider``: the same class as a ``kind: spider`` source through
  ``crawl_source`` (``--child``): Scrapy without a reactor in trawl's loop, every
  request through the fetch layer's gate, breaker, network guard and robots
  cache, an outcome per URL, items staged as gzip JSON Lines, JSON logs at INFO.
  trawl's Scrapy settings apply (``CONCURRENT_ITEMS=10``, see FIELD-NOTES).

Both outputs are checked like ``benchmarks.run`` checks them (every page once,
every product record once with the generator's values). The target is the
issue's: trawl's overhead on top of Scrapy under 15% in pages/s. Results go to
``.trawl/bench/trawl_spider.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.nginx import Nginx, NginxError
from benchmarks.run import (
    BENCH_DIR,
    REPO,
    RunResult,
    _check_scrapy,
    _check_trawl,
    _machine,
    _median,
    _spawn,
    _warm,
)
from benchmarks.site import (
    DEFAULT_DIR,
    DEFAULT_PAGES,
    DEFAULT_SEED,
    FOLLOW_ALLOW,
    RECORD_URLS,
    SiteParams,
    ensure_site,
    page_path,
)

__all__ = ["main"]

CONTENDERS = ("scrapy", "trawl-spider")
MAX_OVERHEAD = 0.15
_CONCURRENCY = 64


async def _child(seed: str, out: Path) -> dict[str, Any]:
    """The trawl contender, in this process: the baseline spider as a `spider` source."""
    from benchmarks.trawl_crawl import bench_settings, measured_crawl
    from trawl.config import SpiderSource

    source = SpiderSource.model_validate(
        {
            "kind": "spider",
            "name": "bench",
            "spider": "benchmarks.scrapy_baseline:BenchSpider",
            # The spider writes its own report into a subfolder; this process reports the crawl.
            "args": {"start_url": seed, "out": str(out / "spider"), "allow": FOLLOW_ALLOW, "record": RECORD_URLS},
            "key": "sku",
            "fields": {"sku": {"type": "text", "required": True}, "price": {"type": "float"}},
        }
    )
    return await measured_crawl("trawl-spider", source, bench_settings(_CONCURRENCY), out)


def _command(contender: str, seed: str, out: Path) -> list[str]:
    py = sys.executable
    if contender == "trawl-spider":
        return [py, "-m", "benchmarks.trawl_spider", "--child", f"--url={seed}", f"--out={out}"]
    return [
        *(py, "-m", "scrapy", "runspider", str(REPO / "benchmarks" / "scrapy_baseline.py")),
        *("-O", str(out / "items.jsonl"), "-a", f"start_url={seed}", "-a", f"out={out}"),
        *("-a", f"allow={FOLLOW_ALLOW}", "-a", f"record={RECORD_URLS}"),
    ]


def _run(contender: str, repeat: int, site: Any, server: Nginx, seed: str, timeout: float) -> RunResult:
    out = BENCH_DIR.resolve() / "spider-runs" / f"{contender}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.with_suffix(".log")
    nginx_cpu = server.cpu_seconds()
    code, wall, cpu, rss = _spawn(_command(contender, seed, out), log, timeout)
    result = RunResult(contender, repeat, code, round(wall, 3), round(cpu, 3), round(rss, 1))
    result.nginx_cpu_s = round(server.cpu_seconds() - nginx_cpu, 3)
    if code != 0:
        result.problems.append(f"exit code {code} (log: {log})")
    report_file = out / "report.json"
    report: dict[str, Any] = orjson.loads(report_file.read_bytes()) if report_file.exists() else {}
    if not report:
        result.problems.append(f"no report.json (log: {log})")
    result.crawl_s = round(float(report.get("crawl_seconds", 0.0)), 3)
    result.crawl_cpu_s = round(float(report.get("crawl_cpu_s", 0.0)), 3)
    base = seed.rsplit("/", 1)[0]
    try:
        if contender == "trawl-spider":
            _check_trawl(result, out, report, site, base, True)
        else:
            _check_scrapy(result, out, report, site, base, True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.problems.append(f"unreadable output: {type(exc).__name__}: {exc}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--site-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # the trawl contender's own process
        from trawl.logs import configure_logging

        configure_logging("json", "INFO")
        report = asyncio.run(_child(args.url, args.out))
        (args.out / "report.json").write_bytes(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2))
        return 0 if report["status"] == "complete" else 1

    site, made = ensure_site(SiteParams(args.pages, args.seed), args.site_dir)
    print(f"site: {site.params.pages:,} pages in {site.root} ({'generated' if made else 'reused'})", flush=True)
    _warm(site.root)
    runs: list[RunResult] = []
    try:
        with Nginx(site.root) as server:
            seed = f"{server.url}{page_path(0)}"
            for repeat in range(1, args.repeat + 1):
                for contender in CONTENDERS:
                    print(f"run {repeat}/{args.repeat}: {contender} ...", end=" ", flush=True)
                    r = _run(contender, repeat, site, server, seed, args.timeout)
                    runs.append(r)
                    verdict = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
                    print(f"{r.pages_per_s:,.0f} pages/s in {r.crawl_s:.1f}s, {verdict}", flush=True)
    except NginxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    summary = {c: _median([r for r in runs if r.contender == c]) for c in CONTENDERS}
    scrapy, trawl = summary["scrapy"], summary["trawl-spider"]
    ratio = trawl.pages_per_s / scrapy.pages_per_s if scrapy.pages_per_s else 0.0
    cpu_ratio = trawl.cpu_s_per_1k / scrapy.cpu_s_per_1k if scrapy.cpu_s_per_1k else 0.0
    print()
    print(f"{'contender':<14}{'pages':>8}{'pages/s':>10}{'CPU s/1k':>10}{'peak RSS MB':>13}")
    for r in summary.values():
        print(f"{r.contender:<14}{r.pages:>8}{r.pages_per_s:>10.0f}{r.cpu_s_per_1k:>10.2f}{r.peak_rss_mb:>13.0f}")
    meets = ratio >= 1 - MAX_OVERHEAD
    valid = scrapy.ok and trawl.ok
    mark = ("meets" if meets else "MISSES") if valid else "INVALID, a run failed its checks; vs"
    print(
        f"\ntrawl-spider/scrapy: {ratio:.2f}x pages/s ({mark} target >= {1 - MAX_OVERHEAD:.2f}x); CPU per page {cpu_ratio:.2f}x"
    )
    for r in runs:
        for note in r.notes:
            print(f"note: {r.contender} run {r.repeat}: {note}")
    results = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "site": {"pages": site.params.pages, "seed": site.params.seed},
        "concurrency": _CONCURRENCY,
        "summary": {c: r.as_dict() for c, r in summary.items()},
        "ratio": {"pages_per_s": round(ratio, 3), "cpu_per_page": round(cpu_ratio, 3), "target": 1 - MAX_OVERHEAD},
        "meets_target": valid and meets,
        "runs": [r.as_dict() for r in runs],
    }
    path = BENCH_DIR / "trawl_spider.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
