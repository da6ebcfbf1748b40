"""Crawl one source into staging: connector → record envelopes and outcomes → committed manifest.

This is the engine under the Prefect crawl flow; it knows nothing of Prefect,
so it runs the same under a flow, a test, or a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from trawl.config import AnySource, HtmlSource, SpiderSource
from trawl.connectors import SourceContext, connector_for
from trawl.connectors.base import SourceStats, Validators
from trawl.connectors.html import DurableHtmlConnector, Idle, Settled
from trawl.database import connect_pool, resolve_dsn
from trawl.errors import ConfigError, SourceFailed, StagingError, TrawlError
from trawl.fetch import Fetcher
from trawl.frontier import PgFrontier
from trawl.logs import bind, redact, unbind
from trawl.metrics import METRICS
from trawl.records import Outcome, Record, utcnow
from trawl.settings import Settings
from trawl.staging import SourceStage, StagedPart, Stager, StreamKind, manifest_body

__all__ = [
    "SourceResult",
    "begin_sharded",
    "commit_sharded",
    "crawl_source",
    "merge_stats",
    "new_run_id",
    "source_schema",
    "uses_frontier",
    "whole_frontier",
]

log = structlog.get_logger("trawl.crawler")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random suffix (``20261128T121501Z-3f9a1c``)."""
    return f"{utcnow():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def source_schema(source: AnySource) -> dict[str, Any]:
    """The declared shape the loader builds the table from; written into every manifest."""
    return {
        "key": source.key_fields,
        "fields": {name: f.loader_spec() for name, f in source.fields.items()},
    }


@dataclass(slots=True)
class SourceResult:
    """How one source's crawl went: its counts and where its staged data is."""

    source: str
    status: Literal["complete", "failed"]
    seconds: float
    stats: dict[str, Any]
    error: str | None = None
    manifest: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "manifest": self.manifest,
            **self.stats,
        }


async def crawl_source(
    source: AnySource,
    *,
    run_id: str,
    settings: Settings,
    fetcher: Fetcher,
    stager: Stager,
    flow_run_id: str | None = None,
    validators: Mapping[str, Validators] | None = None,
    stats: SourceStats | None = None,
    resume: bool = False,
    shard: int | None = None,
) -> SourceResult:
    """Crawl one source to a committed manifest; raises SourceFailed (after committing) if it broke off.

    An html source with the durable frontier (``uses_frontier``) keeps its URLs in
    PostgreSQL and checkpoints as it goes; ``resume`` continues such a run that
    died, and ``shard`` crawls one shard of a sharded run (no manifest: the parent
    writes it once every shard is done).
    """
    if uses_frontier(source, settings):
        assert isinstance(source, HtmlSource | SpiderSource)
        return await _crawl_durable(
            source,
            run_id=run_id,
            settings=settings,
            fetcher=fetcher,
            stager=stager,
            flow_run_id=flow_run_id,
            validators=validators,
            stats=stats or SourceStats(),
            resume=resume,
            shard=shard,
        )
    if shard is not None:
        raise ConfigError(f"source {source.name}: only html sources with shards > 1 are crawled in shards")
    started = time.monotonic()
    stage: SourceStage = stager.open_source(source.name, run_id, utcnow())

    async def emit(outcome: Outcome) -> None:
        await stage.outcomes.write(outcome.envelope())

    ctx = SourceContext(run_id, settings, fetcher, emit, stats=stats or SourceStats(), validators=validators or {})
    bind(source=source.name)
    error: str | None = None
    try:
        log.info("source started", kind=source.kind)
        try:
            staged = METRICS.records_staged.labels(source.name)
            async for record in connector_for(source, ctx).fetch():
                await stage.records.write(record.envelope())
                staged.inc()
        except TrawlError as exc:
            error = redact(str(exc))  # it is shown in logs, the UI and the CLI: no tokens from URLs
        except Exception as exc:  # a bug in one source must not take the others down
            log.exception("source crashed")
            error = redact(f"{type(exc).__name__}: {exc}")
        summary = ctx.stats.as_dict()
        summary["breaker_trips"] = sum(fetcher.breakers.trips(host) for host in ctx.stats.hosts)
        status: Literal["complete", "failed"] = "failed" if error else "complete"
        try:
            outcomes, raw = await stage.commit(
                status=status, schema=source_schema(source), stats=summary, error=error, flow_run_id=flow_run_id
            )
        except StagingError as exc:  # e.g. S3 still down: the parts wait in the spool for `trawl stage resume`
            error = redact(str(exc))
            METRICS.source_runs.labels(source.name, "failed").inc()
            log.error("source not committed", error=error)
            raise SourceFailed(
                SourceResult(source.name, "failed", time.monotonic() - started, summary, error)
            ) from None
        for m in (outcomes, raw):
            METRICS.parts_uploaded.labels(source.name, m.kind).inc(len(m.parts))
            METRICS.bytes_staged.labels(source.name).inc(sum(p.bytes for p in m.parts))
        METRICS.source_runs.labels(source.name, status).inc()
        if status == "complete":
            METRICS.source_last_success.labels(source.name).set_to_current_time()
        result = SourceResult(source.name, status, time.monotonic() - started, summary, error, raw.uri)
        log.info(
            "source finished",
            status=status,
            error=error,
            seconds=round(result.seconds, 3),
            parts=len(raw.parts),
            **summary,
        )
    finally:
        unbind("source")
    if error:
        raise SourceFailed(result)
    return result


def uses_frontier(source: AnySource, settings: Settings) -> bool:
    """Whether a source's crawl keeps its URLs in PostgreSQL: html and spider sources with it chosen (the
    source's ``frontier``, else the setting), and sharded html sources."""
    if isinstance(source, HtmlSource):
        return source.shards > 1 or (source.frontier or settings.frontier) == "postgres"
    return isinstance(source, SpiderSource) and (source.frontier or settings.frontier) == "postgres"


async def open_frontier(source: AnySource, run_id: str, settings: Settings, *, shard: int | None) -> PgFrontier:
    """The source's frontier for this run in the configured (or embedded) PostgreSQL, tables created."""
    dsn = await asyncio.to_thread(resolve_dsn, settings)
    pool = await connect_pool(dsn, min_size=1, max_size=3)
    shards = source.shards if isinstance(source, HtmlSource) else 1
    frontier = PgFrontier(
        pool,
        settings.db_schema,
        run_id,
        source.name,
        shard=shard,
        shards=shards,
        lease_seconds=settings.frontier_lease_seconds,
    )
    try:
        await frontier.setup()
    except BaseException:
        await pool.close()
        raise
    return frontier


class _Checkpoints:
    """Makes a durable crawl's progress durable: closed parts plus the URLs whose data is in them, at once."""

    def __init__(self, frontier: PgFrontier, stage: SourceStage, stats: SourceStats, interval: float) -> None:
        self.frontier = frontier
        self.stage = stage
        self.stats = stats
        self.interval = interval
        self.done: list[int] = []
        self.recorded = {"raw": len(stage.records.parts), "outcomes": len(stage.outcomes.parts)}
        self.last = time.monotonic()

    async def settled(self, marker: Settled) -> None:
        self.done.append(marker.key)
        if time.monotonic() - self.last >= self.interval:
            await self.checkpoint()

    async def checkpoint(self) -> None:
        self.last = time.monotonic()
        streams: tuple[tuple[StreamKind, Any], ...] = (("outcomes", self.stage.outcomes), ("raw", self.stage.records))
        closed = [(kind, await writer.close()) for kind, writer in streams]
        for _, writer in streams:
            if not await writer.wait_durable():
                log.warning("checkpoint deferred: parts still on their way to the staging target")
                return
        new: list[tuple[StreamKind, int, StagedPart]] = []
        for kind, parts in closed:
            new += [(kind, seq, p) for seq, p in enumerate(parts, 1) if seq > self.recorded[kind]]
        done, self.done = self.done, []
        try:
            await self.frontier.checkpoint(new, done, _saved(self.stats))
        except BaseException:
            self.done[:0] = done
            raise
        for kind, parts in closed:
            self.recorded[kind] = len(parts)
        log.debug("checkpoint", done=len(done), parts=len(new))


def _saved(stats: SourceStats) -> dict[str, Any]:
    """What a resumed crawl carries on counting from."""
    return {
        "pages": stats.pages,
        "records": stats.records,
        "bytes": stats.bytes,
        "discovered": stats.discovered,
        "outcomes": dict(stats.outcomes),
    }


def _restore(stats: SourceStats, saved: Mapping[str, Any]) -> None:
    stats.pages += saved.get("pages", 0)
    stats.records += saved.get("records", 0)
    stats.bytes += saved.get("bytes", 0)
    stats.discovered += saved.get("discovered", 0)
    stats.outcomes.update(saved.get("outcomes", {}))


def merge_stats(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from the summaries of a sharded crawl's shards (counts add up)."""
    out: dict[str, Any] = {"pages": 0, "records": 0, "bytes": 0, "discovered": 0, "failures": 0}
    outcomes: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    for st in shards:
        for k in out:
            out[k] += st.get(k, 0)
        outcomes.update(st.get("outcomes", {}))
        errors += st.get("top_errors", [])
    out["outcomes"] = dict(outcomes)
    out["top_errors"] = sorted(errors, key=lambda e: -e.get("count", 0))[:10]
    out["shards"] = len(shards)
    return out


def _durable_items(
    source: HtmlSource | SpiderSource, ctx: SourceContext, frontier: PgFrontier
) -> AsyncIterator[Record | Settled | Idle]:
    """A durable crawl's stream: records, and markers of the URLs (requests) whose data has all been handed on."""
    if isinstance(source, HtmlSource):
        return DurableHtmlConnector(source, ctx, frontier).fetch()
    from trawl.connectors.spider import SpiderConnector  # Scrapy is imported only when needed

    return SpiderConnector(source, ctx, frontier).fetch_settled()


async def _crawl_durable(
    source: HtmlSource | SpiderSource,
    *,
    run_id: str,
    settings: Settings,
    fetcher: Fetcher,
    stager: Stager,
    flow_run_id: str | None,
    validators: Mapping[str, Validators] | None,
    stats: SourceStats,
    resume: bool,
    shard: int | None,
) -> SourceResult:
    started = time.monotonic()
    sharded = isinstance(source, HtmlSource) and source.shards > 1
    if sharded and shard is None:
        raise ConfigError(f"source {source.name} has shards: the crawl flow fans it out")
    frontier = await open_frontier(source, run_id, settings, shard=shard or 0)
    bind(source=source.name, **({"shard": shard} if sharded else {}))
    error: str | None = None
    try:
        run = await frontier.run()
        if run is None:
            if resume or sharded:
                raise ConfigError(f"source {source.name}: run {run_id} is not in the frontier, nothing to resume")
            # A spider's start requests come through its scheduler (PgScheduler) instead of seeds.
            seeds = list(source.urls) + list(source.start_urls) if isinstance(source, HtmlSource) else []
            run = await frontier.begin(utcnow(), seeds)
        elif not resume and not sharded:
            raise ConfigError(
                f"source {source.name}: run {run_id} is already in the frontier; continue it with "
                f"`trawl crawl --resume {run_id}`"
            )
        if sharded:
            await frontier.set_shards([shard or 0], "running")
        if resume:
            released = await frontier.release()
            log.info("run resumed", run_id=run_id, released_leases=released, **await frontier.counts())
        stage = stager.open_source(source.name, run_id, run.started_at)
        tag = f"s{shard:02d}-" if sharded and shard is not None else ""
        for kind, writer in (("raw", stage.records), ("outcomes", stage.outcomes)):
            writer.resume_from([p for _, _, p in await frontier.parts(kind)], tag)  # type: ignore[arg-type]
        saved = (await frontier.saved_stats()).get(shard or 0)
        if saved:
            _restore(stats, saved)
        ctx = SourceContext(
            run_id,
            settings,
            fetcher,
            lambda o: stage.outcomes.write(o.envelope()),
            stats=stats,
            validators=validators or {},
        )
        checkpoints = _Checkpoints(frontier, stage, stats, settings.frontier_checkpoint_seconds)
        log.info("source started", kind=source.kind, frontier="postgres", resume=resume)
        try:
            staged = METRICS.records_staged.labels(source.name)
            async for item in _durable_items(source, ctx, frontier):
                if isinstance(item, Settled):
                    await checkpoints.settled(item)
                    continue
                if isinstance(item, Idle):
                    if checkpoints.done:
                        await checkpoints.checkpoint()
                    continue
                await stage.records.write(item.envelope())
                staged.inc()
        except TrawlError as exc:
            error = redact(str(exc))
        except Exception as exc:
            log.exception("source crashed")
            error = redact(f"{type(exc).__name__}: {exc}")
        await checkpoints.checkpoint()
        summary = stats.as_dict()
        summary["breaker_trips"] = sum(fetcher.breakers.trips(host) for host in stats.hosts)
        if error:
            # No manifest: the run is not complete. What is checkpointed stays; `--resume` carries on from there.
            METRICS.source_runs.labels(source.name, "failed").inc()
            log.error("source stopped; resume it with `trawl crawl --resume`", error=error, **summary)
            raise SourceFailed(
                SourceResult(
                    source.name,
                    "failed",
                    time.monotonic() - started,
                    summary,
                    f"{error} (checkpointed: `trawl crawl --resume {run_id}` continues it)",
                )
            )
        if sharded:
            log.info("shard finished", seconds=round(time.monotonic() - started, 3), **summary)
            return SourceResult(source.name, "complete", time.monotonic() - started, summary)
        try:
            _, raw = await stage.commit(
                status="complete", schema=source_schema(source), stats=summary, flow_run_id=flow_run_id
            )
        except StagingError as exc:
            error = redact(str(exc))
            METRICS.source_runs.labels(source.name, "failed").inc()
            raise SourceFailed(
                SourceResult(source.name, "failed", time.monotonic() - started, summary, error)
            ) from None
        await frontier.finish("complete")
        METRICS.source_runs.labels(source.name, "complete").inc()
        METRICS.source_last_success.labels(source.name).set_to_current_time()
        result = SourceResult(source.name, "complete", time.monotonic() - started, summary, None, raw.uri)
        log.info(
            "source finished", status="complete", seconds=round(result.seconds, 3), parts=len(raw.parts), **summary
        )
        return result
    finally:
        unbind("source")
        if sharded:
            unbind("shard")
        try:  # URLs this crawler claimed and did not finish go back at once (else at their lease's expiry)
            async with asyncio.timeout(10):
                await frontier.give_back()
                if sharded:
                    await frontier.set_shards([shard or 0], "finished")
        except Exception as exc:
            log.warning("leases not given back; they expire", error=str(exc))
        await frontier.pool.close()


@contextlib.asynccontextmanager
async def whole_frontier(source: AnySource, run_id: str, settings: Settings) -> AsyncIterator[PgFrontier]:
    """The whole-run view of a source's frontier (every shard): what the parent of a sharded crawl works on."""
    frontier = await open_frontier(source, run_id, settings, shard=None)
    try:
        yield frontier
    finally:
        await frontier.pool.close()


async def begin_sharded(frontier: PgFrontier, source: HtmlSource, *, resume: bool) -> None:
    """The parent of a sharded crawl: register the run and queue its seeds (each to its host's shard)."""
    run = await frontier.run()
    if resume and run is None:
        raise ConfigError(f"source {source.name}: run {frontier.run_id} is not in the frontier, nothing to resume")
    if not resume and run is not None:
        raise ConfigError(f"source {source.name}: run {frontier.run_id} is already in the frontier; use --resume")
    if run is None:
        await frontier.begin(utcnow(), list(source.urls) + list(source.start_urls))


async def commit_sharded(
    frontier: PgFrontier, source: HtmlSource, stager: Stager, *, flow_run_id: str | None
) -> SourceResult:
    """Once every shard is done: one manifest per stream listing every shard's parts (the commit)."""
    started = time.monotonic()
    run_id = frontier.run_id
    run = await frontier.run()
    if run is None:
        raise ConfigError(f"source {source.name}: run {run_id} is not in the frontier")
    left = await frontier.pending()
    if left:
        raise StagingError(f"source {source.name}: {left} URLs of run {run_id} are not done; nothing committed")
    shard_stats = list((await frontier.saved_stats()).values())
    summary = merge_stats(shard_stats)
    uri = ""
    now = utcnow()
    kinds: tuple[StreamKind, ...] = ("outcomes", "raw")
    for kind in kinds:
        parts = [p for _, _, p in await frontier.parts(kind)]
        body = manifest_body(
            kind,
            source.name,
            run_id,
            run.dt,
            status="complete",
            error=None,
            started_at=run.started_at,
            finished_at=now,
            flow_run_id=flow_run_id,
            schema=source_schema(source),
            stats=summary,
            parts=parts,
        )
        m = await stager.write_manifest(kind, source.name, run.dt, run_id, body)
        uri = m.uri
    await frontier.finish("complete")
    METRICS.source_runs.labels(source.name, "complete").inc()
    METRICS.source_last_success.labels(source.name).set_to_current_time()
    return SourceResult(source.name, "complete", time.monotonic() - started, summary, None, uri)
