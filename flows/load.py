"""The load flow: committed staged runs → PostgreSQL, every part exactly once."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._common import current_flow_run_id, settings_for
from sinks.postgres import Loader, PartLoad
from sinks.stage import Manifest, StreamKind, open_stager
from trawl.database import connect_pool, resolve_dsn
from trawl.logs import bind

__all__ = ["load"]

log = structlog.get_logger("flows.load")

_KINDS: tuple[StreamKind, ...] = ("outcomes", "raw")


@task(name="load-source", task_run_name="load-{name}", cache_policy=NO_CACHE)
async def load_source_task(name: str, loader: Loader, manifests: list[Manifest], todo: set[str]) -> list[PartLoad]:
    """Load one source's committed manifests (outcomes and records) part by part; stops at its first failure."""
    bind(source=name)
    results: list[PartLoad] = []
    for m in manifests:
        results.extend(await loader.load_manifest(m, todo))
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
    staging: str | None = None,
    run_ids: list[str] | None = None,
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Load committed runs from staging: the given run ids, or every run not yet in the ledger.

    The database comes from ``TRAWL_DATABASE_URL`` (never a flow parameter, so it
    never shows in the UI), else the embedded PostgreSQL.
    """
    settings = settings_for(staging)
    bind(flow_run_id=current_flow_run_id())
    stager = open_stager(settings.staging)
    manifests = [
        m
        for kind in _KINDS
        for m in await stager.manifests(kind)
        if (not run_ids or m.run_id in run_ids) and (not sources or m.source in sources)
    ]
    pool = await connect_pool(resolve_dsn(settings), max_size=settings.db_pool_size)
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
        # With return_state=True Prefect returns awaitable states; its overloads type them as plain States.
        states = await asyncio.gather(
            *(
                load_source_task(name, loader, ms, todo, return_state=True)  # type: ignore[call-overload]
                for name, ms in sorted(by_source.items())
            )
        )
        summary: dict[str, dict[str, Any]] = {}
        for name, state in zip(sorted(by_source), states, strict=True):
            value = await state.aresult(raise_on_failure=False)
            if isinstance(value, BaseException):  # this source's load failed; the others went on
                log.error("source load failed", source=name, error=str(value))
                summary[name] = {**_totals([]), "error": str(value) or repr(value)}
            else:
                summary[name] = {**_totals(value), "error": None}
    finally:
        await pool.close()
    log.info(
        "load finished",
        **{
            f"{k}_total": sum(s[k] for s in summary.values())
            for k in ("parts_loaded", "parts_skipped", "inserted", "updated", "rejected")
        },
    )
    return {"staging": stager.uri, "runs": sorted({m.run_id for m in manifests}), "sources": summary}
