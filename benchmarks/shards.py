"""A sharded crawl against the same crawl in one process: `make bench-shards`.

    python -m benchmarks.shards [--pages 20000] [--hosts 4] [--shards 2] [--concurrency 16]
        [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

The generated benchmark site (``benchmarks.site``, 20,000 pages, links relative,
so they stay on their host) served by one nginx per host (``--hosts`` ports on
127.0.0.1: each port is a host to trawl), ``politeness: {concurrency: 16}``.
In one run, one after the other, on the same machine:

1. *one process*: ``crawl_source`` of the source without shards (the in-memory
   frontier, as ``trawl crawl`` runs it), in a fresh subprocess;
2. *sharded*: the same source with ``shards: N``, as the crawl flow runs it with
   one worker: one process does what the crawl flow does (registers the run,
   crawls as shard 0, then writes the manifest once every URL is done) while
   N-1 processes each crawl one shard (what the shard flow runs do). Hosts are
   leased from the PostgreSQL frontier. Prefect's own part (starting the shard
   flow runs: ~2 s with the worker's 2 s poll) is not in the figure.

Reported: wall time of each (sharded: from the start of the processes to the
manifest), pages, pages per shard, and the ratio sharded / one process, with
the machine's load average before and after: on a shared machine, read the
ratio against the load. Every page must be fetched once in each contender.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.nginx import Nginx
from benchmarks.site import FIELD_SELECTORS, FOLLOW_ALLOW, RECORD_URLS, SiteParams, ensure_site
from tests.helpers.databases import scratch_database

__all__ = ["main"]


def _source(bases: list[str], shards: int, concurrency: int) -> dict[str, Any]:
    return {
        "name": "bench_shards",
        "kind": "html",
        "start_urls": [f"{b}/index.html" for b in bases],
        "follow": {"allow": [FOLLOW_ALLOW], "max_depth": 50},
        "record_urls": RECORD_URLS,
        "key": "sku",
        "fields": {
            name: {"selector": sel, **({"attr": attr} if attr else {})} for name, (sel, attr) in FIELD_SELECTORS.items()
        },
        "politeness": {"concurrency": concurrency},
        "robots": False,
        **({"shards": shards} if shards > 1 else {}),
    }


async def _child(opts: dict[str, Any]) -> dict[str, Any]:
    from pydantic import SecretStr

    from sinks.targets import open_stager
    from trawl.config import HtmlSource
    from trawl.crawler import begin_sharded, commit_sharded, crawl_source, whole_frontier
    from trawl.fetch import Fetcher
    from trawl.settings import Settings

    settings = Settings(
        staging=opts["staging"],
        database_url=SecretStr(opts["dsn"]),
        allowed_networks=["127.0.0.0/8"],
        log_level="WARNING",
        total_concurrency=max(64, opts["concurrency"] * opts["hosts"]),
    )
    src = HtmlSource.model_validate(opts["source"])
    run_id, role = opts["run_id"], opts["role"]
    t0 = time.perf_counter()
    async with (
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        Fetcher(settings) as fetcher,
    ):
        if role == "single":
            res = await crawl_source(src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager)
            return {"seconds": time.perf_counter() - t0, "pages": res.stats["pages"]}
        if role == "parent":
            async with whole_frontier(src, run_id, settings) as whole:
                await begin_sharded(whole, src, resume=False)
                await whole.set_shards(list(range(src.shards)), "scheduled")
        else:
            while not await _begun(src, run_id, settings):  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.05)
        res = await crawl_source(
            src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, shard=opts["shard"]
        )
        out = {"seconds": time.perf_counter() - t0, "pages": res.stats["pages"], "shard": opts["shard"]}
        if role == "parent":
            async with whole_frontier(src, run_id, settings) as whole:
                while await whole.pending():  # noqa: ASYNC110 - the other shards' last checkpoints
                    await asyncio.sleep(0.05)
                committed = await commit_sharded(whole, src, stager, flow_run_id=None, settings=settings)
            out |= {"seconds": time.perf_counter() - t0, "total_pages": committed.stats["pages"]}
        return out


async def _begun(src: Any, run_id: str, settings: Any) -> bool:
    from trawl.crawler import whole_frontier

    async with whole_frontier(src, run_id, settings) as whole:
        return await whole.run() is not None


def _spawn(opts: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.shards", "--child", orjson.dumps(opts).decode()],
        stdout=subprocess.PIPE,
        env={**os.environ, "TRAWL_LOG_LEVEL": "WARNING"},
    )


def _result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"a crawl process failed ({proc.returncode})")
    return dict(orjson.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TRAWL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--pages", type=int, default=20_000, help="pages per host")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="politeness concurrency per host")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(orjson.dumps(asyncio.run(_child(orjson.loads(args.child)))).decode())
        return 0
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    site, _ = ensure_site(SiteParams(pages=args.pages))
    servers = [Nginx(site.root, workers=1) for _ in range(args.hosts)]
    load_before = os.getloadavg()
    try:
        for s in servers:
            s.start()
        bases = [s.url for s in servers]
        total = args.pages * args.hosts
        with scratch_database(args.database_url, "trawl_bench") as dsn, tempfile.TemporaryDirectory() as tmp:
            common = {"dsn": dsn, "concurrency": args.concurrency, "hosts": args.hosts}
            single_src = _source(bases, 1, args.concurrency)
            t0 = time.perf_counter()
            one = _result(
                _spawn(
                    {
                        **common,
                        "role": "single",
                        "source": single_src,
                        "run_id": "one",
                        "staging": f"file://{Path(tmp) / 'one'}",
                    }
                )
            )
            one_wall = time.perf_counter() - t0
            sharded_src = _source(bases, args.shards, args.concurrency)
            staging = f"file://{Path(tmp) / 'sharded'}"
            t0 = time.perf_counter()
            procs = [
                _spawn(
                    {
                        **common,
                        "role": "parent" if k == 0 else "shard",
                        "shard": k,
                        "source": sharded_src,
                        "run_id": "sharded",
                        "staging": staging,
                    }
                )
                for k in range(args.shards)
            ]
            results = [_result(p) for p in procs]
            sharded_wall = time.perf_counter() - t0
    finally:
        for s in servers:
            s.stop()
    load_after = os.getloadavg()
    ok = one["pages"] == total == results[0]["total_pages"]
    ratio = sharded_wall / one_wall
    print(
        f"## trawl sharded crawl: {args.hosts} hosts x {args.pages:,} pages, politeness concurrency "
        f"{args.concurrency}, {os.cpu_count()} CPUs\n"
    )
    print("| crawl | wall s | pages | pages/s | pages per shard |")
    print("|---|--:|--:|--:|:--|")
    print(f"| one process | {one_wall:.1f} | {one['pages']:,} | {one['pages'] / one_wall:,.0f} | - |")
    shares = ", ".join(f"{r['shard']}: {r['pages']:,} ({r['pages'] / total:.0%})" for r in results)
    print(
        f"| `shards: {args.shards}` | {sharded_wall:.1f} | {results[0]['total_pages']:,} | "
        f"{results[0]['total_pages'] / sharded_wall:,.0f} | {shares} |"
    )
    print(
        f"\nsharded / one process: **{ratio:.2f}x** (target <= 0.65x); load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f}; every page fetched: {'yes' if ok else 'NO'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
