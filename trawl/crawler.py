"""Crawl one source into staging: connector → record envelopes and outcomes → committed manifest.

This is the engine under the Prefect crawl flow; it knows nothing of Prefect,
so it runs the same under a flow, a test, or a benchmark.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from trawl.archive import Archiver
from trawl.config import AnySource, HtmlSource
from trawl.connectors import SourceContext, connector_for
from trawl.connectors.base import SourceStats, Validators
from trawl.errors import ConfigError, SourceFailed, StagingError, TrawlError
from trawl.fetch import Fetcher
from trawl.frontier import Frontier, Idle, PgFrontier, Settled, open_frontier, open_store
from trawl.incremental import CursorWindow
from trawl.logs import bind, redact, unbind
from trawl.metrics import METRICS
from trawl.records import Outcome, OutcomeKind, utcnow
from trawl.settings import Settings
from trawl.staging import SourceStage, Stager, StreamKind, manifest_body

__all__ = [
    "FAILING_OUTCOMES",
    "SourceResult",
    "begin_sharded",
    "commit_sharded",
    "crawl_source",
    "merge_stats",
    "new_run_id",
    "source_schema",
    "verdict",
    "whole_frontier",
]

log = structlog.get_logger("trawl.crawler")


FAILING_OUTCOMES: Final = frozenset(
    {OutcomeKind.FAILED.value, OutcomeKind.SKIPPED_BREAKER.value, OutcomeKind.BLOCKED_NETWORK.value}
)
"""URL outcomes that count against a source (``skipped_robots`` and ``filtered`` are the source's own rules)."""
_GOT: Final = (OutcomeKind.FETCHED.value, OutcomeKind.NOT_MODIFIED.value)


def verdict(summary: Mapping[str, Any], max_failed_ratio: float) -> str | None:
    """Why a crawl that ran to its end failed all the same; None when it did not. The one source-status rule.

    A source fails when no URL was fetched (or not modified) and at least one
    failed, or when the failed share of its URLs exceeds ``max_failed_ratio``
    (1: off). Failed means :data:`FAILING_OUTCOMES`; the reason names the most
    frequent error.
    """
    outcomes: Mapping[str, int] = summary.get("outcomes") or {}
    failed = sum(n for k, n in outcomes.items() if k in FAILING_OUTCOMES)
    if not failed:
        return None
    done = sum(outcomes.values())
    errors = [e for e in summary.get("top_errors") or [] if e.get("outcome") in FAILING_OUTCOMES]
    why = f"most often {errors[0]['outcome']}: {errors[0]['error']} ({errors[0]['count']} URLs)" if errors else ""
    if not any(outcomes.get(k) for k in _GOT):
        return f"no URL fetched, {failed} of {done} failed" + (f"; {why}" if why else "")
    ratio = failed / done
    if max_failed_ratio < 1 and ratio > max_failed_ratio:
        return f"{failed} of {done} URLs failed ({ratio:.0%}, above max_failed_ratio {max_failed_ratio:g})" + (
            f"; {why}" if why else ""
        )
    return None


def failed_ratio_limit(source: AnySource, settings: Settings) -> float:
    """The source's own ``max_failed_ratio``, else the setting's."""
    own = source.max_failed_ratio
    return settings.max_failed_ratio if own is None else own


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
    incremental: CursorWindow | None = None,
    lastmods: Mapping[str, str] | None = None,
) -> SourceResult:
    """Crawl one source to a committed manifest; raises SourceFailed (after committing) if it broke off or
    failed all the same (:func:`verdict`).

    The one source driver of every kind. The source's frontier (:func:`trawl.frontier.open_frontier`)
    decides what a failure leaves behind: an in-memory crawl commits what it staged
    with ``status: failed``; a durable one (PostgreSQL) checkpoints instead and is
    continued with ``resume``. ``shard`` crawls one shard of a sharded run (no
    manifest: the parent writes it once every shard is done).
    ``incremental``: the window an ``api`` source with ``incremental`` asks for (from
    the stored state); its largest value seen goes into the manifest's stats.
    ``lastmods``: sitemap ``lastmod`` per URL as of its last fetch (an unchanged URL is not fetched again).
    """
    started = time.monotonic()
    stats = stats or SourceStats()
    bind(source=source.name)
    try:
        async with open_frontier(source, run_id, settings, resume=resume, shard=shard, hosts=fetcher) as frontier:
            stage = await frontier.open_stage(stager, stats, utcnow())
            try:
                # What the summary counts as records: rows staged (a resumed run's checkpointed parts included), not
                # records extracted, which counts again the pages a crash made it fetch twice.
                staged_rows = sum(p.rows for p in stage.records.parts)

                async def emit(outcome: Outcome) -> None:
                    await stage.outcomes.write(outcome.envelope())

                archiver = (
                    Archiver(stage.archive, source.archive_max_bytes) if source.archive and stage.archive else None
                )
                ctx = SourceContext(
                    run_id,
                    settings,
                    fetcher,
                    emit,
                    stats=stats,
                    validators=validators or {},
                    incremental=incremental,
                    archiver=archiver,
                    lastmods=lastmods or {},
                )
                log.info("source started", kind=source.kind, frontier=frontier.name, resume=resume)
                error: str | None = None
                try:
                    staged = METRICS.records_staged.labels(source.name)
                    for kind in OutcomeKind:  # from 0: increase() sees a short crawl's outcomes too
                        METRICS.outcomes.labels(source.name, kind.value)
                    items = connector_for(source, ctx, frontier).fetch()
                    try:
                        async for item in items:
                            if isinstance(item, Settled):
                                await frontier.settled(item)
                            elif isinstance(item, Idle):
                                await frontier.idle()
                            else:
                                await stage.records.write(item.envelope())
                                staged.inc()
                                staged_rows += 1
                    finally:
                        # However the loop ends, the connector's workers have stopped before the archive and the
                        # streams close: no page is archived, no row written after that.
                        if (aclose := getattr(items, "aclose", None)) is not None:
                            await aclose()
                except TrawlError as exc:
                    error = redact(str(exc))  # it is shown in logs, the UI and the CLI: no tokens from URLs
                except Exception as exc:  # a bug in one source must not take the others down
                    log.exception("source crashed")
                    error = redact(f"{type(exc).__name__}: {exc}")
                finally:
                    if archiver is not None:
                        await archiver.aclose()  # every queued page in its stream before the checkpoint closes it
                return await _finish(
                    source, frontier, stage, fetcher, stats, started, error, flow_run_id, settings, staged_rows
                )
            except BaseException:
                # Cancelled (or broken) before the streams were closed: their open parts' files are closed and
                # dropped here, not left to the garbage collector (a checkpointed part stays; resume refetches the rest).
                await stage.discard()  # logs what it could not drop; the crawl's own exception is the one raised
                raise
    finally:
        unbind("source")


async def _finish(
    source: AnySource,
    frontier: Frontier,
    stage: SourceStage,
    fetcher: Fetcher,
    stats: SourceStats,
    started: float,
    error: str | None,
    flow_run_id: str | None,
    settings: Settings,
    staged_rows: int | None = None,
) -> SourceResult:
    """End a source's crawl as its frontier allows: checkpoint, commit (or not), count, summarize.

    ``error`` is why the crawl broke off; one that ran to its end can still fail by :func:`verdict`.
    """
    await frontier.checkpoint()
    summary = stats.as_dict()
    if staged_rows is not None:
        summary["records"] = staged_rows
    summary["breaker_trips"] = sum(fetcher.breakers.trips(host) for host in stats.hosts)
    summary["throttled"] = fetcher.throttle_signals(source.name, stats.hosts)  # throttle signals per host
    broke = error is not None
    error = error or verdict(summary, failed_ratio_limit(source, settings))
    status: Literal["complete", "failed"] = "failed" if error else "complete"

    def failed(message: str | None) -> SourceFailed:
        return SourceFailed(SourceResult(source.name, "failed", time.monotonic() - started, summary, message))

    if broke and frontier.resumable:
        # No manifest: the run is not complete. What is checkpointed stays; `--resume` carries on from there.
        log.error("source stopped; resume it with `trawl crawl --resume`", error=error, **summary)
        raise failed(f"{error} (checkpointed: `trawl crawl --resume {stage.run_id}` continues it)")
    if not frontier.commits:
        log.info("shard finished", seconds=round(time.monotonic() - started, 3), **summary)
        return SourceResult(source.name, "complete", time.monotonic() - started, summary)
    try:
        outcomes, raw = await stage.commit(
            status=status, schema=source_schema(source), stats=summary, error=error, flow_run_id=flow_run_id
        )
    except StagingError as exc:  # e.g. S3 still down: the parts wait in the spool for `trawl stage resume`
        log.error("source not committed", error=redact(str(exc)))
        raise failed(redact(str(exc))) from None
    if not broke:  # it ran to its end (a verdict of failure included): nothing left to resume
        await frontier.finish()
    summary["parts"] = len(raw.parts)
    summary["staged_bytes"] = sum(p.bytes for m in (outcomes, raw) for p in m.parts)
    result = SourceResult(source.name, status, time.monotonic() - started, summary, error, raw.uri)
    log.info("source finished", status=status, error=error, seconds=round(result.seconds, 3), **summary)
    if error:
        raise SourceFailed(result)
    return result


def merge_stats(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from the summaries of a sharded crawl's shards (counts add up)."""
    out: dict[str, Any] = {"pages": 0, "records": 0, "bytes": 0, "discovered": 0, "failures": 0}
    outcomes: Counter[str] = Counter()
    throttled: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    for st in shards:
        for k in out:
            out[k] += st.get(k, 0)
        outcomes.update(st.get("outcomes", {}))
        throttled.update(st.get("throttled", {}))
        errors += st.get("top_errors", [])
    out["outcomes"] = dict(outcomes)
    if throttled:
        out["throttled"] = dict(throttled)
    out["top_errors"] = sorted(errors, key=lambda e: -e.get("count", 0))[:10]
    out["shards"] = len(shards)
    return out


@contextlib.asynccontextmanager
async def whole_frontier(source: AnySource, run_id: str, settings: Settings) -> AsyncIterator[PgFrontier]:
    """The whole-run view of a source's frontier (every shard): what the parent of a sharded crawl works on."""
    shards = source.shards if isinstance(source, HtmlSource) else 1
    async with open_store(source.name, run_id, settings, shard=None, shards=shards) as frontier:
        yield frontier


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
    frontier: PgFrontier, source: HtmlSource, stager: Stager, *, flow_run_id: str | None, settings: Settings
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
    saved = await frontier.saved_stats()
    summary = merge_stats(list(saved.values()))
    # Each shard's share, for the result and the summary artifact (hosts moved between shards as they were leased).
    summary["per_shard"] = {
        str(k): {"pages": st.get("pages", 0), "records": st.get("records", 0), "outcomes": st.get("outcomes", {})}
        for k, st in sorted(saved.items())
    }
    summary["host_moves"] = sum(h["moves"] for h in (await frontier.hosts()).values())
    error = verdict(summary, failed_ratio_limit(source, settings))
    status: Literal["complete", "failed"] = "failed" if error else "complete"
    uri = ""
    now = utcnow()
    kinds: tuple[StreamKind, ...] = ("outcomes", "archive", "raw")
    archive = [p for _, _, p in await frontier.parts("archive")]
    for kind in kinds:
        parts = [p for _, _, p in await frontier.parts(kind)]
        if kind == "archive" and not parts:
            continue
        body = manifest_body(
            kind,
            source.name,
            run_id,
            run.dt,
            status=status,
            error=error,
            started_at=run.started_at,
            finished_at=now,
            flow_run_id=flow_run_id,
            schema=source_schema(source),
            stats=summary,
            parts=parts,
            archive=archive if kind == "raw" else None,
        )
        m = await stager.write_manifest(kind, source.name, run.dt, run_id, body)
        uri = m.uri
        if kind == "raw":
            summary["parts"] = len(parts)
        summary["staged_bytes"] = summary.get("staged_bytes", 0) + sum(p.bytes for p in parts)
    await frontier.finish("complete")  # the frontier's run is done either way
    result = SourceResult(source.name, status, time.monotonic() - started, summary, error, uri)
    if error:
        raise SourceFailed(result)
    return result
