"""A loader in its own process, for the kill -9 and concurrent-loader tests.

    python loader_child.py DSN STAGING_DIR

Loads every committed manifest (outcomes, then records) and prints one JSON line
per part it loaded itself (``skipped`` false) or found done (``skipped`` true).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from sinks.postgres import Loader
from sinks.stage import LocalStager
from trawl.database import connect_pool


async def main(dsn: str, staging: str) -> None:
    stager = LocalStager(Path(staging))
    pool = await connect_pool(dsn, max_size=2)
    try:
        loader = Loader(pool, stager)
        await loader.setup()
        for kind in ("outcomes", "raw"):
            for manifest in await stager.manifests(kind):  # type: ignore[arg-type]
                for res in await loader.load_manifest(manifest):
                    line = {"part": res.staged_object, "skipped": res.skipped, "inserted": res.inserted}
                    sys.stdout.write(orjson.dumps(line).decode() + "\n")
                    sys.stdout.flush()
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
