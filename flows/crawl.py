"""The crawl flow: every selected source concurrently, in one event loop, into staging."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._common import current_flow_run_id, settings_for
from sinks.postgres import load_validators
from sinks.stage import Stager, open_stager
from trawl.config import ApiSource, HtmlSource, load_sources, select_sources
from trawl.connectors.base import Validators
from trawl.crawler import SourceFailed, SourceResult, crawl_source, new_run_id
from trawl.database import connect_pool
from trawl.errors import DatabaseUnavailable
from trawl.fetch import Fetcher
from trawl.logs import bind
from trawl.settings import Settings

__all__ = ["crawl"]

log = structlog.get_logger("flows.crawl")


@task(name="crawl-source", task_run_name="crawl-{name}", cache_policy=NO_CACHE)
async def crawl_source_task(
    name: str,
    source: HtmlSource | ApiSource,
    run_id: str,
    settings: Settings,
    fetcher: Fetcher,
    stager: Stager,
) -> SourceResult:
    """One source's crawl, as its own task run in the UI (failed sources show as failed tasks)."""
    return await crawl_source(
        source,
        run_id=run_id,
        settings=settings,
        fetcher=fetcher,
        stager=stager,
        flow_run_id=current_flow_run_id(),
        validators=await _validators(settings, name),
    )


async def _validators(settings: Settings, source: str) -> dict[str, Validators]:
    """ETag / Last-Modified from earlier runs, when there is a database to remember them (else none)."""
    dsn = settings.database_dsn()
    if not dsn:
        return {}
    try:
        pool = await connect_pool(dsn, max_size=1)
    except DatabaseUnavailable as exc:
        log.warning("no conditional requests: database unavailable", source=source, error=str(exc))
        return {}
    try:
        return await load_validators(pool, settings.db_schema, source)
    finally:
        await pool.close()


@flow(name="crawl", log_prints=True)
async def crawl(
    sources_file: str,
    sources: list[str] | None = None,
    staging: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Crawl the sources of SOURCES_FILE (all enabled ones, or those named) and stage them.

    Returns ``{"run_id", "flow_run_id", "staging", "sources": [per-source result]}``; a failed
    source does not stop the others, its task shows as failed and its status in
    the result says why.
    """
    settings = settings_for(staging)
    selected = select_sources(load_sources(sources_file), sources)
    run_id = run_id or new_run_id()
    bind(run_id=run_id, flow_run_id=current_flow_run_id())
    stager = open_stager(
        settings.staging, part_max_records=settings.part_max_records, part_max_bytes=settings.part_max_bytes
    )
    log.info("crawl started", sources=[s.name for s in selected], staging=stager.uri)
    async with Fetcher(settings) as fetcher:
        # With return_state=True Prefect returns awaitable states; its overloads type them as plain States.
        states = await asyncio.gather(
            *(
                crawl_source_task(s.name, s, run_id, settings, fetcher, stager, return_state=True)  # type: ignore[call-overload]
                for s in selected
            )
        )
    results = []
    for src, state in zip(selected, states, strict=True):
        value = await state.aresult(raise_on_failure=False)
        if isinstance(value, SourceFailed):
            results.append(value.result.as_dict())
        elif isinstance(value, SourceResult):
            results.append(value.as_dict())
        else:  # the task itself broke (e.g. cancelled) before a result existed
            results.append({"source": src.name, "status": "failed", "error": repr(value), "seconds": 0.0})
    log.info("crawl finished", failed=[r["source"] for r in results if r["status"] != "complete"])
    return {"run_id": run_id, "flow_run_id": current_flow_run_id(), "staging": stager.uri, "sources": results}
