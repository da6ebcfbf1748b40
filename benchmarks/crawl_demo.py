"""Crawl-and-stage throughput on the demo site, in-process (no Prefect), plus load speed when a DB is given.

    python -m benchmarks.crawl_demo [--repeat N] [--database-url DSN]

Prints one JSON line per measurement: pages/s and records/s of the `html` crawl
(aiohttp + selectolax + gzip staging) and the `api` walk (httpx), peak RSS,
and with a database the loader's rows/s. The demo site runs in the same
process and loop, so these figures include serving the pages (a lower bound).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

import orjson

from sinks.stage import LocalStager
from trawl.config import load_sources
from trawl.crawler import crawl_source, new_run_id
from trawl.demo.site import DemoSite
from trawl.fetch import Fetcher
from trawl.logs import configure_logging
from trawl.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _run(repeat: int, database_url: str | None) -> None:
    async with DemoSite() as site:
        spec = load_sources(REPO / "examples" / "demo.yaml", env={"TRAWL_DEMO_URL": site.url})
        settings = Settings(allowed_networks=["127.0.0.0/8"], per_host_concurrency=32, total_concurrency=64)
        with tempfile.TemporaryDirectory() as tmp:
            stager = LocalStager(Path(tmp))
            run_ids = []
            for _ in range(repeat):
                run_id = new_run_id()
                run_ids.append(run_id)
                async with Fetcher(settings) as fetcher:
                    for source in spec.sources:
                        t0 = time.perf_counter()
                        res = await crawl_source(
                            source, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager
                        )
                        dt = time.perf_counter() - t0
                        print(
                            orjson.dumps(
                                {
                                    "bench": f"crawl.{source.kind}",
                                    "source": source.name,
                                    "pages": res.stats["pages"],
                                    "records": res.stats["records"],
                                    "seconds": round(dt, 3),
                                    "pages_per_s": round(res.stats["pages"] / dt, 1),
                                    "records_per_s": round(res.stats["records"] / dt, 1),
                                    "peak_rss_mb": round(_peak_rss_mb(), 1),
                                }
                            ).decode(),
                            flush=True,
                        )
            if database_url:
                await _load(stager, database_url)


async def _load(stager: LocalStager, database_url: str) -> None:
    from sinks.postgres import Loader
    from trawl.database import connect_pool

    pool = await connect_pool(database_url)
    try:
        loader = Loader(pool, stager, schema=f"bench_{int(time.time())}")
        await loader.setup()
        manifests = await stager.manifests("raw")
        t0 = time.perf_counter()
        rows = 0
        for m in manifests:
            rows += sum(p.rows for p in await loader.load_manifest(m) if not p.skipped)
        dt = time.perf_counter() - t0
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{loader.schema}" CASCADE')
            await conn.execute(f'DROP SCHEMA IF EXISTS "{loader.schema}_views" CASCADE')
        print(
            orjson.dumps(
                {"bench": "load", "rows": rows, "seconds": round(dt, 3), "rows_per_s": round(rows / dt, 1)}
            ).decode(),
            flush=True,
        )
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", help="also measure loading into this PostgreSQL (a scratch schema)")
    args = parser.parse_args()
    configure_logging("json", "WARNING")  # only the figures on stdout
    asyncio.run(_run(args.repeat, args.database_url))


if __name__ == "__main__":
    main()
