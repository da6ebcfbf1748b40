"""The pipeline flow: crawl, then load what this run staged — the two as subflows."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.crawl import crawl
from flows.load import load

__all__ = ["pipeline"]


@flow(name="pipeline")
async def pipeline(
    sources_file: str,
    sources: list[str] | None = None,
    staging: str | None = None,
) -> dict[str, Any]:
    """Crawl SOURCES_FILE into staging and load the run into PostgreSQL.

    Sources that failed are still loaded as far as they got (with their outcomes),
    so the tables and ``_outcomes`` say what happened.
    """
    crawled = await crawl(sources_file, sources, staging)
    loaded = await load(staging, [crawled["run_id"]], None)
    return {
        "run_id": crawled["run_id"],
        "crawl_flow_run_id": crawled["flow_run_id"],
        "staging": crawled["staging"],
        "crawl": crawled["sources"],
        "load": loaded["sources"],
    }
