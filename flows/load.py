"""The load flow: committed staged runs → PostgreSQL, every part exactly once."""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from datetime import timedelta
from typing import Any

import structlog
from prefect import flow, task
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows._common import current_flow_run_id, flow_metrics, push_sources, retry_if_transient, run_state, settings_for
from flows.params import RunId, SecretBlockName, SourceName, StagingURL, check_run_ids
from sinks.postgres import Loader, PartLoad
from sinks.state import advance_state
from sinks.targets import open_stager
from trawl.database import open_pool
from trawl.logs import bind
from trawl.metrics import METRICS
from trawl.progress import Progress, show_progress
from trawl.settings import Settings
from trawl.staging import Manifest, StagedPart, Stager, StreamKind

__all__ = ["load"]

log = structlog.get_logger("flows.load")

_KINDS: tuple[StreamKind, ...] = ("outcomes", "raw")


def _part_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A part loaded once in this flow run is not loaded again when the flow run is retried.

    The key holds the flow run id, so a new flow run always asks the ledger
    (``trawl._loads``) instead: the cache only spares a retry the round trips.
    """
    part: StagedPart = parameters["part"]
    loader: Loader = parameters["loader"]
    ident = f"{flow_run.id}|{loader.identity}|{part.uri}|{part.sha256}"
    return "trawl-load-" + hashlib.sha256(ident.encode()).hexdigest()[:32]


@task(
    name="load-part",
    task_run_name="load-{source}-{kind}-part-{number}",
    cache_key_fn=_part_cache_key,
    cache_expiration=timedelta(days=7),
    persist_result=True,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
)
async def load_part_task(
    source: str, kind: str, number: int, loader: Loader, manifest: Manifest, part: StagedPart, fields: dict[str, str]
) -> PartLoad:
    """One staged part into PostgreSQL: one transaction with its ledger row."""
    bind(source=source)
    return await loader.load_part(manifest, part, fields)


async def _load_source(
    loader: Loader, manifests: list[Manifest], todo: set[str], progress: Progress | None = None
) -> list[PartLoad]:
    """One source's manifests, part by part in order (parts of one table never race each other); stops at a failure."""
    results: list[PartLoad] = []
    for m in manifests:
        fields = await loader.prepare(m)
        for number, part in enumerate(m.parts, start=1):
            if part.uri not in todo:
                results.append(PartLoad(part.uri, m.source, m.kind, part.rows, skipped=True))
                continue
            loaded = await load_part_task(m.source, m.kind, number, loader, m, part, fields)
            if progress is not None and m.kind == "raw":
                progress.advance(m.source, part.rows)
            if loaded.kind == "raw":  # counted as each part lands, so a scrape during the load sees the rate
                for result in ("inserted", "updated", "unchanged", "rejected"):
                    METRICS.rows_loaded.labels(m.source, result).inc(getattr(loaded, result))
            results.append(loaded)
        await loader.finish(m)
        # Every part of the run is in: now (and only now) its incremental state moves (sinks/state.py).
        await advance_state(loader.pool, loader.schema, m)
    return results


def _totals(loads: list[PartLoad]) -> dict[str, int]:
    records = [p for p in loads if p.kind == "raw"]
    return {
        "parts_loaded": sum(1 for p in loads if not p.skipped),
        "parts_skipped": sum(1 for p in loads if p.skipped),
        "inserted": sum(p.inserted for p in records),
        "updated": sum(p.updated for p in records),
        "unchanged": sum(p.unchanged for p in records),
        "rejected": sum(p.rejected for p in records),
        "outcomes": sum(p.inserted + p.updated for p in loads if p.kind == "outcomes"),
    }


@flow(name="load")
async def load(
    staging: StagingURL | None = None,
    run_ids: list[RunId] | None = None,
    sources: list[SourceName] | None = None,
    database_secret: SecretBlockName | None = None,
    dry_run: bool = False,
) -> Any:
    """Load committed runs from staging: the given run ids, or every run not yet in the ledger.

    The database comes from the Prefect Secret block named ``database_secret``,
    else ``TRAWL_DATABASE_URL``, else the embedded PostgreSQL — never from a plain
    parameter, so a URL with a password never shows in the UI. ``dry_run`` lists
    the parts that would load without loading them.

    The run ends ``Failed`` when every source's load failed, ``Degraded`` (a
    named ``Completed``) when some did; its result is the per-source totals.
    """
    check_run_ids(run_ids=run_ids)
    settings = await settings_for(staging, database_secret=database_secret)
    bind(flow_run_id=current_flow_run_id())
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        manifests = [
            m
            for kind in _KINDS
            for m in await stager.manifests(kind)
            if (not run_ids or m.run_id in run_ids) and (not sources or m.source in sources)
        ]
        async with flow_metrics("load", settings) as measured:
            result = await _load_all(settings, stager, manifests, dry_run)
            errors = {name: f"load failed: {s['error']}" for name, s in result["sources"].items() if s.get("error")}
            measured.failed_sources = len(errors)
            measured.failed = bool(errors) and len(errors) == len(result["sources"])
            await push_sources(settings, loaded=result["sources"])
    return run_state(result, len(result["sources"]), errors)


async def _load_all(settings: Settings, stager: Stager, manifests: list[Manifest], dry_run: bool) -> dict[str, Any]:
    """Every source's manifests side by side, each source's parts in order; the per-source totals."""
    pool = await open_pool(settings, max_size=settings.db_pool_size)
    loader: Loader | None = None
    try:
        loader = Loader(
            pool,
            stager,
            settings.db_schema,
            max_reject_rate=settings.max_reject_rate if settings.max_reject_rate < 1 else None,
            reject_min_rows=settings.reject_min_rows,
        )
        await loader.setup()
        todo = await loader.pending(manifests)
        by_source: dict[str, list[Manifest]] = defaultdict(list)
        for m in manifests:
            by_source[m.source].append(m)
        log.info(
            "load started", staging=stager.uri, runs=sorted({m.run_id for m in manifests}), parts_pending=len(todo)
        )
        if dry_run:
            return {
                "staging": stager.uri,
                "runs": sorted({m.run_id for m in manifests}),
                "dry_run": True,
                "pending": sorted(todo),
                "sources": {},
            }
        progress = Progress("load")
        for name, ms in sorted(by_source.items()):
            progress.load(name, sum(p.rows for m in ms if m.kind == "raw" for p in m.parts if p.uri in todo))
        async with show_progress(progress, settings):
            per_source = await asyncio.gather(
                *(_load_source(loader, ms, todo, progress) for _, ms in sorted(by_source.items())),
                return_exceptions=True,
            )
            for name, loads in zip(sorted(by_source), per_source, strict=True):
                progress.finished(name, "failed" if isinstance(loads, BaseException) else "complete")
        summary: dict[str, dict[str, Any]] = {}
        for name, loads in zip(sorted(by_source), per_source, strict=True):
            if isinstance(loads, BaseException):  # this source's load failed (e.g. its reject rate); others went on
                if not isinstance(loads, Exception):
                    raise loads
                log.error("source load failed", source=name, error=str(loads))
                summary[name] = {**_totals([]), "error": str(loads) or repr(loads)}
            else:
                summary[name] = {**_totals(loads), "error": None}
    finally:
        if loader is not None:
            await loader.close()  # its decoding process
        await pool.close()
    log.info(
        "load finished",
        **{
            f"{k}_total": sum(s[k] for s in summary.values())
            for k in ("parts_loaded", "parts_skipped", "inserted", "updated", "rejected")
        },
    )
    return {"staging": stager.uri, "runs": sorted({m.run_id for m in manifests}), "sources": summary}
