"""The crawl flow: every selected source concurrently, in one event loop, into staging."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._common import current_flow_run_id, flow_metrics, retry_if_transient, settings_for, source_lock
from flows.artifacts import crawl_progress, publish_crawl, publish_summary
from flows.params import Politeness, SourceName, SourcesPath, StagingURL, check_sources
from sinks.postgres import load_validators
from sinks.stage import Stager, open_stager
from trawl.config import AnySource, ApiSource, HtmlSource
from trawl.connectors.base import SourceStats, Validators
from trawl.crawler import SourceFailed, SourceResult, crawl_source, new_run_id
from trawl.database import connect_pool
from trawl.errors import DatabaseUnavailable
from trawl.fetch import Fetcher
from trawl.logs import bind
from trawl.settings import Settings

__all__ = ["crawl"]

log = structlog.get_logger("flows.crawl")


@task(
    name="crawl-source",
    task_run_name="crawl-{name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
)
async def crawl_source_task(
    name: str,
    source: AnySource,
    run_id: str,
    settings: Settings,
    fetcher: Fetcher,
    stager: Stager,
    stats: SourceStats,
) -> SourceResult:
    """One source's crawl, as its own task run in the UI (failed sources show as failed tasks).

    Holds the source's concurrency slot (``trawl-source-NAME``) while it runs.
    """
    async with source_lock(name, settings):
        return await crawl_source(
            source,
            run_id=run_id,
            settings=settings,
            fetcher=fetcher,
            stager=stager,
            flow_run_id=current_flow_run_id(),
            validators=await _validators(settings, name),
            stats=stats,
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


def _plan(source: AnySource) -> dict[str, Any]:
    if isinstance(source, HtmlSource):
        seeds = source.start_urls
    elif isinstance(source, ApiSource):
        seeds = [source.url]
    else:  # a spider's start URLs are its own business (they may depend on its arguments)
        return {"source": source.name, "kind": source.kind, "status": "planned", "spider": source.spider}
    return {"source": source.name, "kind": source.kind, "status": "planned", "seeds": seeds}


@flow(name="crawl", log_prints=True)
async def crawl(
    sources_file: SourcesPath = "examples/demo.yaml",
    sources: list[SourceName] | None = None,
    staging: StagingURL | None = None,
    politeness: Politeness | None = None,
    dry_run: bool = False,
    run_id: str | None = None,
    publish: bool = True,
) -> dict[str, Any]:
    """Crawl the sources of SOURCES_FILE (all enabled ones, or those named) and stage them.

    Returns ``{"run_id", "flow_run_id", "staging", "sources": [per-source result]}``; a failed
    source does not stop the others, its task shows as failed and its status in
    the result says why. ``dry_run`` checks the parameters and the sources file and
    returns the plan without a request. ``publish`` adds the run summary artifact
    (the pipeline publishes its own, with the load's rejects).
    """
    selected = check_sources(sources_file, sources)
    settings = await settings_for(staging, politeness)
    stager = open_stager(settings.staging, settings=settings)
    run_id = run_id or new_run_id()
    bind(run_id=run_id, flow_run_id=current_flow_run_id())
    if dry_run:
        log.info("dry run: nothing fetched", sources=[s.name for s in selected], staging=stager.uri)
        return {
            "run_id": run_id,
            "flow_run_id": current_flow_run_id(),
            "staging": stager.uri,
            "dry_run": True,
            "sources": [_plan(s) for s in selected],
        }
    async with (
        flow_metrics("crawl", settings, "+".join(sorted(s.name for s in selected))) as measured,
        stager,
    ):
        await _resume_spooled(stager)
        results = await _crawl_all(selected, run_id, settings, stager)
        measured.failed = any(r["status"] != "complete" for r in results)
    await publish_crawl(run_id, stager.uri, results)
    if publish:
        await publish_summary(run_id, results, None)
    return {"run_id": run_id, "flow_run_id": current_flow_run_id(), "staging": stager.uri, "sources": results}


async def _resume_spooled(stager: Stager) -> None:
    """Runs an earlier crawl left in the S3 spool (S3 was down) are finished first, when S3 answers now."""
    from sinks.s3 import S3Stager

    if not isinstance(stager, S3Stager):
        return
    try:
        for r in await stager.resume():
            log.info("earlier run resumed", run_id=r.run_id, source=r.source, kind=r.kind, result=r.message)
    except Exception as exc:  # S3 still down, or a spooled part is bad: this crawl spools too, and says so at the end
        log.warning("spooled runs not resumed", staging=stager.uri, error=str(exc))


async def _crawl_all(
    selected: list[AnySource], run_id: str, settings: Settings, stager: Stager
) -> list[dict[str, Any]]:
    """Every source as its own task, all at once in this loop, sharing one Fetcher; their results in order."""
    log.info("crawl started", sources=[s.name for s in selected], staging=stager.uri)
    stats = [SourceStats() for _ in selected]
    async with Fetcher(settings) as fetcher, crawl_progress(run_id, stats, settings.progress_interval):
        # With return_state=True Prefect returns awaitable states; its overloads type them as plain States.
        states = await asyncio.gather(
            *(
                crawl_source_task(s.name, s, run_id, settings, fetcher, stager, st, return_state=True)  # type: ignore[call-overload]
                for s, st in zip(selected, stats, strict=True)
            )
        )
    results = []
    for src, state in zip(selected, states, strict=True):
        value = await state.aresult(raise_on_failure=False)
        if isinstance(value, SourceFailed):
            results.append(value.result.as_dict())
        elif isinstance(value, SourceResult):
            results.append(value.as_dict())
        else:  # the task itself broke (e.g. cancelled, or its source busy) before a result existed
            error = str(value) if isinstance(value, BaseException) else repr(value)
            results.append({"source": src.name, "status": "failed", "error": error, "seconds": 0.0})
    log.info("crawl finished", failed=[r["source"] for r in results if r["status"] != "complete"])
    return results
