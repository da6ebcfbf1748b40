"""What a run shows in the Prefect UI: progress while crawling, a summary table, the staged run, top errors.

Artifact keys are stable (``trawl-run-summary``, ``trawl-crawl-progress``, ...), so
the UI's Artifacts page groups every run's version of one artifact under its key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from uuid import UUID

import structlog
from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from trawl.connectors.base import SourceStats
from trawl.logs import redact
from trawl.records import OutcomeKind

__all__ = [
    "ERRORS_KEY",
    "LINK_KEY",
    "PROGRESS_KEY",
    "SUMMARY_KEY",
    "crawl_progress",
    "publish_crawl",
    "publish_summary",
    "summary_markdown",
    "top_errors",
]

PROGRESS_KEY = "trawl-crawl-progress"
SUMMARY_KEY = "trawl-run-summary"
LINK_KEY = "trawl-staged-run"
ERRORS_KEY = "trawl-top-errors"

log = structlog.get_logger("flows.artifacts")

_OUTCOMES = [k.value for k in OutcomeKind]
_DONE = (OutcomeKind.FETCHED.value, OutcomeKind.NOT_MODIFIED.value)


def _progress(stats: Sequence[SourceStats]) -> float:
    """Percent of the URLs found so far that have their outcome (html crawls keep finding more)."""
    done = sum(s.done for s in stats)
    found = sum(max(s.discovered, s.done) for s in stats)
    return round(100.0 * done / found, 1) if found else 0.0


@contextlib.asynccontextmanager
async def crawl_progress(run_id: str, stats: Sequence[SourceStats], interval: float) -> AsyncIterator[None]:
    """A progress artifact (pages done / discovered) updated every ``interval`` seconds while the block runs."""
    try:
        artifact_id: UUID | None = await acreate_progress_artifact(
            0.0, key=PROGRESS_KEY, description=f"run {run_id}: URLs with an outcome / URLs discovered"
        )
    except Exception as exc:  # the UI's nicety must never fail a crawl
        log.warning("no progress artifact", error=str(exc))
        artifact_id = None

    async def update() -> None:
        assert artifact_id is not None
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await aupdate_progress_artifact(artifact_id, _progress(stats))

    updater = asyncio.create_task(update()) if artifact_id is not None else None
    try:
        yield
    finally:
        if updater is not None and artifact_id is not None:
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
            with contextlib.suppress(Exception):
                await aupdate_progress_artifact(artifact_id, 100.0)


def top_errors(crawl: Sequence[Mapping[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` most frequent errors over every source of a crawl (outcome, message, count, an example URL)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], str] = {}
    for src in crawl:
        for e in src.get("top_errors") or []:
            key = (src["source"], e["outcome"], e["error"])
            counts[key] += e["count"]
            examples.setdefault(key, e["example_url"])
    if not counts:
        return []
    return [
        {"rank": i, "source": s, "outcome": o, "error": err, "count": c, "example_url": examples[(s, o, err)]}
        for i, ((s, o, err), c) in enumerate(counts.most_common(n), start=1)
    ]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_markdown(run_id: str, crawl: Sequence[Mapping[str, Any]], load: Mapping[str, Any] | None) -> str:
    """One row per source: pages, records, rejects, outcomes, breaker trips, bytes, seconds."""
    head = ["source", "status", "pages", "records", "rejects", "fetched", "not modified", "failures by outcome"]
    head += ["breaker trips", "MB", "seconds"]
    lines = [
        f"# trawl run `{run_id}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":--", ":--", *["--:"] * 5, ":--", *["--:"] * 3]) + "|",
    ]
    for src in crawl:
        outcomes = src.get("outcomes") or {}
        loaded = (load or {}).get(src["source"])
        failures = ", ".join(f"{k} {outcomes[k]}" for k in _OUTCOMES if outcomes.get(k) and k not in _DONE)
        cells = [
            src["source"],
            src["status"] + (f" ({src['error']})" if src.get("error") else ""),
            src.get("pages", 0),
            src.get("records", 0),
            loaded["rejected"] if loaded else "not loaded",
            outcomes.get("fetched", 0),
            outcomes.get("not_modified", 0),
            failures or "none",
            src.get("breaker_trips", 0),
            f"{src.get('bytes', 0) / 1e6:.1f}",
            src.get("seconds", 0.0),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for src in crawl:  # a sharded source: each shard's share (its hosts moved between shards as they were leased)
        per_shard = src.get("per_shard")
        if not per_shard:
            continue
        lines += ["", f"**{_cell(src['source'])}** by shard ({src.get('host_moves', 0)} host moves):", ""]
        lines += ["| shard | pages | records | outcomes |", "|--:|--:|--:|:--|"]
        for shard, st in sorted(per_shard.items(), key=lambda kv: int(kv[0])):
            outcomes = ", ".join(f"{k} {n}" for k, n in sorted((st.get("outcomes") or {}).items())) or "none"
            lines.append(f"| {shard} | {st.get('pages', 0)} | {st.get('records', 0)} | {_cell(outcomes)} |")
        if src.get("shard_replacements"):
            lines.append(f"\nShard runs replaced: {_cell('; '.join(src['shard_replacements']))}")
    if load:
        lines += [
            "",
            "Loaded: "
            + ", ".join(
                f"**{name}** {s['inserted']} inserted, {s['updated']} updated, {s['unchanged']} unchanged, "
                f"{s['rejected']} rejected"
                for name, s in sorted(load.items())
            ),
        ]
    return "\n".join(lines) + "\n"


async def publish_crawl(run_id: str, staging: str, crawl: Sequence[Mapping[str, Any]]) -> None:
    """The staged-run link and the top-errors table of a crawl."""
    manifests = [f"- {s['source']}: `{s['manifest']}`" for s in crawl if s.get("manifest")]
    await acreate_link_artifact(
        redact(staging),
        link_text=redact(f"run {run_id} staged in {staging}"),
        key=LINK_KEY,
        description=redact("Manifests of this run:\n" + ("\n".join(manifests) or "(none)")),
    )
    # What the UI shows is masked here, whatever the stats it comes from were built with.
    errors = [{k: redact(v) if isinstance(v, str) else v for k, v in row.items()} for row in top_errors(crawl)]
    await acreate_table_artifact(
        errors or [{"rank": 0, "source": "", "outcome": "", "error": "no errors", "count": 0, "example_url": ""}],
        key=ERRORS_KEY,
        description=f"run {run_id}: the ten most frequent errors (URLs that did not end fetched or not_modified)",
    )


async def publish_summary(run_id: str, crawl: Sequence[Mapping[str, Any]], load: Mapping[str, Any] | None) -> None:
    """The run summary table (per source) as a markdown artifact."""
    await acreate_markdown_artifact(
        redact(summary_markdown(run_id, crawl, load)), key=SUMMARY_KEY, description=f"trawl run {run_id}"
    )
