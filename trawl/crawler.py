"""Crawl one source into staging: connector → record envelopes and outcomes → committed manifest.

This is the engine under the Prefect crawl flow; it knows nothing of Prefect,
so it runs the same under a flow, a test, or a benchmark.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from sinks.stage import SourceStage, Stager
from trawl.config import AnySource
from trawl.connectors import SourceContext, connector_for
from trawl.connectors.base import SourceStats, Validators
from trawl.errors import StagingError, TrawlError
from trawl.fetch import Fetcher
from trawl.logs import bind, redact, unbind
from trawl.metrics import METRICS
from trawl.records import Outcome, utcnow
from trawl.settings import Settings

__all__ = ["SourceFailed", "SourceResult", "crawl_source", "new_run_id", "source_schema"]

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


class SourceFailed(TrawlError):
    """A source ended early; what it fetched before is staged and its result is attached."""

    def __init__(self, result: SourceResult) -> None:
        super().__init__(f"source {result.source} failed: {result.error}")
        self.result = result


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
) -> SourceResult:
    """Crawl one source to a committed manifest; raises SourceFailed (after committing) if it broke off."""
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
