"""The pipeline flow: crawl, then load what this run staged — the two as subflows.

Local debugging runs the same code with no server (Prefect's ephemeral mode)::

    python -m flows.pipeline examples/demo.yaml [--source NAME] [--staging URL] [--dry-run]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import orjson
import structlog
from prefect import flow

from flows._common import current_flow_run_id, failed_sources, flow_metrics, flow_result, run_state, settings_for
from flows.artifacts import publish_summary
from flows.crawl import crawl
from flows.load import load
from flows.params import (
    IncrementalOverride,
    Politeness,
    RunId,
    SecretBlockName,
    SourceName,
    SourcesPath,
    StagingURL,
    check_run_ids,
    check_sources,
)
from trawl.database import open_pool

__all__ = ["main", "pipeline"]

log = structlog.get_logger("flows.pipeline")


@flow(name="pipeline")
async def pipeline(
    sources_file: SourcesPath = "examples/demo.yaml",
    sources: list[SourceName] | None = None,
    staging: StagingURL | None = None,
    database_secret: SecretBlockName | None = None,
    politeness: Politeness | None = None,
    dry_run: bool = False,
    resume_run_id: RunId | None = None,
    incremental: IncrementalOverride | None = None,
) -> Any:
    """Crawl SOURCES_FILE into staging and load the run into PostgreSQL.

    Sources that failed are still loaded as far as they got (with their outcomes),
    so the tables and ``_outcomes`` say what happened. Every parameter is checked
    before the first request: an unknown source, a bad staging URL or a missing
    Secret block fails the run at once, naming the parameter. ``dry_run`` checks
    the parameters, the sources file and the database and stops there.
    ``resume_run_id`` continues a run that died (see the crawl flow) and loads it.
    ``incremental`` overrides the incremental window (see the crawl flow); the load
    moves a source's stored state only when its run is complete and its load committed.

    The run ends ``Failed`` when every source failed (its crawl or its load),
    ``Degraded`` (a named ``Completed``) when some did, its message listing them.
    """
    check_run_ids(resume_run_id=resume_run_id)
    selected = await asyncio.to_thread(check_sources, sources_file, sources)  # reads the sources file
    settings = await settings_for(staging, politeness, database_secret)
    if dry_run:
        pool = await open_pool(settings, max_size=1)
        await pool.close()
    async with flow_metrics("pipeline", settings) as measured:
        result = await _crawl_and_load(
            sources_file, sources, staging, database_secret, politeness, dry_run, resume_run_id, incremental
        )
        failed = failed_sources(result["crawl"]) if not dry_run else {}
        for name, loaded in result["load"].items():
            if loaded.get("error"):
                failed.setdefault(name, f"load failed: {loaded['error']}")
        measured.failed_sources = len(failed)
        measured.failed = bool(selected) and len(failed) >= len(selected)
    return run_state(result, len(selected), failed)


async def _crawl_and_load(
    sources_file: str,
    sources: list[str] | None,
    staging: str | None,
    database_secret: str | None,
    politeness: Politeness | None,
    dry_run: bool,
    resume_run_id: str | None = None,
    incremental: IncrementalOverride | None = None,
) -> dict[str, Any]:
    crawled = await flow_result(
        await crawl(
            sources_file,
            sources,
            staging,
            politeness,
            dry_run,
            publish=False,
            resume_run_id=resume_run_id,
            database_secret=database_secret,
            incremental=incremental,
            return_state=True,
        )
    )
    if dry_run:
        return {
            "run_id": crawled["run_id"],
            "dry_run": True,
            "staging": crawled["staging"],
            "crawl": crawled["sources"],
            "load": {},
        }
    loaded = await flow_result(await load(staging, [crawled["run_id"]], None, database_secret, return_state=True))
    await publish_summary(crawled["run_id"], crawled["sources"], loaded["sources"])
    return {
        "run_id": crawled["run_id"],
        "flow_run_id": current_flow_run_id(),
        "crawl_flow_run_id": crawled["flow_run_id"],
        "staging": crawled["staging"],
        "crawl": crawled["sources"],
        "load": loaded["sources"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.pipeline SOURCES_FILE``: the pipeline flow in this process, no server needed."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=main.__doc__)
    parser.add_argument("sources_file")
    parser.add_argument("--source", action="append", dest="sources", help="run only this source (repeatable)")
    parser.add_argument("--staging", help="file://DIR or s3://BUCKET/PREFIX")
    parser.add_argument("--dry-run", action="store_true", help="check everything, fetch nothing")
    args = parser.parse_args(argv)
    import prefect  # noqa: F401  - logging is configured after Prefect's own

    from trawl.logs import configure_logging
    from trawl.settings import Settings

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    result = asyncio.run(
        flow_result(pipeline(args.sources_file, args.sources, args.staging, dry_run=args.dry_run, return_state=True))
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 1 if any(s.get("status") == "failed" for s in result["crawl"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
