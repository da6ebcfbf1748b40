"""One shard of a sharded crawl in its own process, for the tests that take a shard's process away (kill -9).

    python -m tests.integration.shard_child SOURCE_JSON RUN_ID SHARD   (settings from TRAWL_* variables)

Prints ``started`` once its crawl is under way, then crawls until it ends (or is killed).
"""

from __future__ import annotations

import asyncio
import sys

from sinks.targets import open_stager
from trawl.config import HtmlSource
from trawl.crawler import crawl_source
from trawl.fetch import Fetcher
from trawl.settings import Settings


async def main(source_json: str, run_id: str, shard: int) -> None:
    settings = Settings()
    source = HtmlSource.model_validate_json(source_json)
    async with (
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        Fetcher(settings) as fetcher,
    ):
        sys.stdout.write("started\n")
        sys.stdout.flush()
        await crawl_source(source, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, shard=shard)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
