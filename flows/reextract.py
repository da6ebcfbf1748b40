"""The reextract flow: a run's page archive through the sources' current rules, staged as a new run and loaded.

Local debugging runs the same code with no server (Prefect's ephemeral mode)::

    python -m flows.reextract RUN_ID examples/demo.yaml [--source NAME] [--staging URL]
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

from flows._common import current_flow_run_id, flow_metrics, settings_for
from flows.load import load
from flows.params import RunId, SecretBlockName, SourceName, SourcesPath, StagingURL, check_run_ids, check_sources
from sinks.targets import open_stager
from trawl.crawler import new_run_id
from trawl.errors import ConfigError, ParameterError
from trawl.reextract import reextract_source

__all__ = ["main", "reextract"]

log = structlog.get_logger("flows.reextract")


@flow(name="reextract")
async def reextract(
    run_id: RunId,
    sources_file: SourcesPath = "examples/demo.yaml",
    sources: list[SourceName] | None = None,
    staging: StagingURL | None = None,
    database_secret: SecretBlockName | None = None,
    load_run: bool = True,
) -> dict[str, Any]:
    """Re-extract RUN_ID's archived pages with the current rules of SOURCES_FILE, stage a new run, load it.

    No request is made (the fetch layer is set to refuse every network). Rows whose
    content is unchanged write nothing; corrected rows are updated, their lineage
    pointing at the new run and at the same archived response. ``sources`` limits it
    to some of the run's sources (default: every source of the run with an archive).
    """
    check_run_ids(run_id=run_id)
    selected = await asyncio.to_thread(check_sources, sources_file, sources)
    by_name = {s.name: s for s in selected}
    settings = await settings_for(staging, None, database_secret)
    new = new_run_id()
    async with (
        flow_metrics("reextract", settings),
        open_stager(settings.staging, settings=settings) as stager,
    ):
        found = [m for m in await stager.manifests("raw") if m.run_id == run_id]
        if not found:
            raise ParameterError("run_id", f"no committed run {run_id} in {stager.uri}")
        chosen = [m for m in found if m.source in by_name and (sources or m.archive)]
        if not chosen:
            raise ParameterError(
                "sources",
                f"run {run_id} has no archived source of {sources_file} "
                f"(its sources: {', '.join(sorted(m.source for m in found))})",
            )
        results = []
        for manifest in chosen:
            try:
                result = await reextract_source(
                    by_name[manifest.source],
                    manifest,
                    run_id=new,
                    settings=settings,
                    stager=stager,
                    flow_run_id=current_flow_run_id(),
                )
            except ConfigError as exc:
                raise ParameterError("sources", "; ".join(exc.lines())) from None
            results.append(result.as_dict())
        staged_at = stager.uri
    loaded = await load(staging, [new], None, database_secret) if load_run else {"sources": {}}
    return {
        "run_id": new,
        "reextracted_from": run_id,
        "flow_run_id": current_flow_run_id(),
        "staging": staged_at,
        "crawl": results,
        "load": loaded["sources"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.reextract RUN_ID SOURCES_FILE``: the reextract flow in this process, no server needed."""
    parser = argparse.ArgumentParser(prog="python -m flows.reextract", description=main.__doc__)
    parser.add_argument("run_id")
    parser.add_argument("sources_file")
    parser.add_argument("--source", action="append", dest="sources", help="only this source (repeatable)")
    parser.add_argument("--staging", help="file://DIR or s3://BUCKET/PREFIX")
    args = parser.parse_args(argv)
    import prefect  # noqa: F401  - logging is configured after Prefect's own

    from trawl.logs import configure_logging
    from trawl.settings import Settings

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    result = asyncio.run(reextract(args.run_id, args.sources_file, args.sources, args.staging))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
