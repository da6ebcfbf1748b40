"""The crawl flow: every selected source concurrently, in one event loop, into staging."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from typing import Any

import structlog
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._common import (
    current_flow_run_id,
    failed_sources,
    flow_metrics,
    push_sources,
    retry_if_transient,
    run_state,
    settings_for,
    source_lock,
)
from flows.artifacts import crawl_progress, publish_crawl, publish_summary
from flows.params import (
    IncrementalOverride,
    Politeness,
    RunId,
    SecretBlockName,
    SourceName,
    SourcesPath,
    StagingURL,
    check_run_ids,
    check_sources,
)
from sinks.postgres import load_lastmods, load_validators
from sinks.state import start_state
from sinks.targets import open_stager
from trawl.config import AnySource, ApiSource, HtmlSource
from trawl.connectors.base import SourceStats, Validators
from trawl.crawler import SourceResult, begin_sharded, commit_sharded, crawl_source, new_run_id, whole_frontier
from trawl.database import connect_pool
from trawl.errors import DatabaseRefused, DatabaseUnavailable, ParameterError, SourceFailed
from trawl.fetch import Fetcher
from trawl.frontier import durable, sharded
from trawl.incremental import CursorValue, CursorWindow, window_for
from trawl.logs import bind, redact
from trawl.metrics import push_spool
from trawl.progress import Progress, show_progress
from trawl.records import utcnow
from trawl.settings import Settings
from trawl.staging import Stager

__all__ = ["crawl", "crawl_shard"]

log = structlog.get_logger("flows.crawl")

# Parameters of the running crawl flow that its shard runs get too (the same sources file, politeness, database).
_SHARD_PARAMS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("trawl_shard_params")


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
    resume: bool = False,
    incremental: IncrementalOverride | None = None,
) -> SourceResult:
    """One source's crawl, as its own task run in the UI (failed sources show as failed tasks).

    Holds the source's concurrency slot (``trawl-source-NAME``) while it runs.
    """
    async with source_lock(name, settings, takeover=resume):
        if sharded(source):
            return await _crawl_sharded(source, run_id, settings, stager, fetcher, resume=resume)
        return await crawl_source(
            source,
            run_id=run_id,
            settings=settings,
            fetcher=fetcher,
            stager=stager,
            flow_run_id=current_flow_run_id(),
            validators=await _validators(settings, name),
            lastmods=await _lastmods(settings, source),
            stats=stats,
            resume=resume and durable(source, settings),
            incremental=await _window(settings, source, run_id, incremental),
        )


async def _crawl_sharded(
    source: HtmlSource, run_id: str, settings: Settings, stager: Stager, fetcher: Fetcher, *, resume: bool
) -> SourceResult:
    """Crawl a source with ``shards: N`` as up to N shards leasing hosts from one frontier, then commit.

    This flow run crawls as shard 0 itself (it holds a worker slot anyway) while
    shards 1..N-1 run as flow runs of the shard deployment, on whichever worker of
    the pool is free (``run_deployment``). Shards lease hosts, not hashes: each
    claims hosts with work and no live owner, so every shard stays busy while hosts
    are left. A shard run that Prefect reports ``Crashed`` or ``Failed`` is
    replaced at once, resuming from its last checkpoint with its leases taken back
    (up to ``shard_replacements`` times); a shard whose machine vanished leaves
    leases that expire, and the live shards (this one at least) take its hosts.
    The manifest is written here, listing every shard's parts.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments.flow_runs import arun_deployment

    started = time.monotonic()
    async with whole_frontier(source, run_id, settings) as frontier:
        await begin_sharded(frontier, source, resume=resume)
        inherited = _SHARD_PARAMS.get()
        params = {
            **{k: v for k, v in inherited.items() if v is not None},
            "source": source.name,
            "run_id": run_id,
            "shards": source.shards,
            "staging": stager.uri,
        }
        remote = list(range(1, source.shards))
        await frontier.set_shards([0, *remote], "scheduled")  # live from now: the fair share counts them
        replaced: list[str] = []
        runs: dict[int, Any] = {}  # shard → its current flow run

        async def run_shard(i: int) -> None:
            """One shard run, replaced at once while Prefect reports it crashed or failed; raises _ShardLost past
            ``shard_replacements``."""
            attempt = 0
            while True:
                fr = await arun_deployment(
                    settings.shard_deployment,
                    parameters={**params, "shard": i, "resume": resume or attempt > 0},
                    flow_run_name=f"{source.name}-{run_id}-shard-{i}" + (f"-{attempt + 1}" if attempt else ""),
                    timeout=0,  # polled here: a run whose machine vanished never reaches a final state
                )
                runs[i] = fr
                asked = time.monotonic()
                async with get_client() as client:
                    while not (fr.state and fr.state.is_final()):
                        await asyncio.sleep(1)
                        fr = await client.read_flow_run(fr.id)
                        waiting = fr.state is not None and (fr.state.is_scheduled() or fr.state.is_pending())
                        if waiting and time.monotonic() - asked < _PROMPT_START:
                            await frontier.still_scheduled(i)  # on its way: the others leave it its share
                if _completed(fr):
                    return
                state = fr.state.name if fr.state else "no state"
                if len(replaced) >= settings.shard_replacements:
                    await frontier.set_shards([i], "failed")
                    raise _ShardLost(f"{fr.name}: {state}")
                requeued = await frontier.take_back(i)
                since = (utcnow() - fr.state.timestamp).total_seconds() if fr.state and fr.state.timestamp else None
                replaced.append(f"{fr.name}: {state}")
                attempt += 1
                log.warning(
                    "shard replaced",
                    shard=i,
                    flow_run=fr.name,
                    state=state,
                    requeued_urls=requeued,
                    takeover_s=None if since is None else round(since, 3),
                    replacements=len(replaced),
                )
                await frontier.set_shards([i], "scheduled")

        own_task = asyncio.create_task(
            crawl_source(
                source,
                run_id=run_id,
                settings=settings,
                fetcher=fetcher,
                stager=stager,
                flow_run_id=current_flow_run_id(),
                validators=await _validators(settings, source.name),
                resume=resume,
                shard=0,
            )
        )
        shard_of_task = {asyncio.create_task(run_shard(i)): i for i in remote}
        watched = set(shard_of_task)
        try:
            while not own_task.done():
                done, _ = await asyncio.wait({own_task, *watched}, return_when=asyncio.FIRST_COMPLETED)
                for t in done - {own_task}:
                    watched.discard(t)
                    if isinstance(t.exception(), _ShardLost):
                        own_task.cancel()
                        with contextlib.suppress(BaseException):
                            await own_task
                        raise SourceFailed(
                            SourceResult(
                                source.name,
                                "failed",
                                time.monotonic() - started,
                                {"shard_replacements": replaced},
                                f"shard run lost past shard_replacements={settings.shard_replacements} "
                                f"({t.exception()}); `trawl crawl --resume {run_id}` continues the run",
                            )
                        )
                    t.result()  # another error of the supervision: the source's task fails with it
            own = own_task.result()  # shard 0 stays while any host has work: its end is the crawl's
            if watched:  # every URL is done; the other shards end on their own (a vanished one never does)
                _, late = await asyncio.wait(watched, timeout=settings.frontier_lease_seconds)
                await _mark_lost([runs[shard_of_task[t]] for t in late if shard_of_task[t] in runs])
        finally:
            for t in (own_task, *watched):
                t.cancel()
            await asyncio.gather(own_task, *watched, return_exceptions=True)
        left = await frontier.pending()
        if left:
            raise SourceFailed(
                SourceResult(
                    source.name,
                    "failed",
                    time.monotonic() - started,
                    {"shard_replacements": replaced, **own.stats},
                    f"{left} URLs not done after the shards ended; `trawl crawl --resume {run_id}` continues the run",
                )
            )
        try:
            result = await commit_sharded(
                frontier, source, stager, flow_run_id=current_flow_run_id(), settings=settings
            )
        except SourceFailed as exc:
            exc.result.seconds = time.monotonic() - started
            exc.result.stats["shard_replacements"] = replaced
            raise
        result.seconds = time.monotonic() - started
        result.stats["shard_replacements"] = replaced
        return result


_PROMPT_START = 120.0
"""Seconds a shard run Prefect has not started yet keeps its share of the hosts (after that, the others take them)."""


class _ShardLost(Exception):
    """A shard run failed or crashed once more than ``shard_replacements`` allows."""


async def _mark_lost(flow_runs: list[Any]) -> None:
    """Shard runs still ``Running`` after the crawl finished without them: their machine vanished (no state report
    came, their hosts were taken over when the leases expired). Say so in Prefect rather than leave them running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    async with get_client() as client:
        for fr in flow_runs:
            log.warning("shard run lost without a state report; its hosts were taken over", flow_run=fr.name)
            with contextlib.suppress(Exception):
                await client.set_flow_run_state(
                    fr.id,
                    Crashed(message="lost: no heartbeat; its hosts were taken over by the live shards"),
                    force=True,
                )


def _completed(flow_run: Any) -> bool:
    return flow_run.state is not None and bool(flow_run.state.is_completed())


@flow(name="crawl-shard", log_prints=True)
async def crawl_shard(
    sources_file: SourcesPath,
    source: SourceName,
    run_id: str,
    shard: int,
    shards: int,
    staging: StagingURL | None = None,
    politeness: Politeness | None = None,
    resume: bool = False,
    database_secret: SecretBlockName | None = None,
) -> dict[str, Any]:
    """One shard of a source with ``shards: N``: the hosts of this shard, from the run's shared frontier.

    Started by the crawl flow through the shard deployment; it stages parts under
    the run's id and leaves the manifest to the crawl flow that started it.
    """
    (src,) = await asyncio.to_thread(check_sources, sources_file, [source])  # reads the sources file
    if not isinstance(src, HtmlSource) or src.shards != shards:
        raise ParameterError("source", f"{source} in {sources_file} is not an html source with shards: {shards}")
    settings = await settings_for(staging, politeness, database_secret)
    stager = await asyncio.to_thread(open_stager, settings.staging, settings=settings)  # resolves a local path
    bind(run_id=run_id, flow_run_id=current_flow_run_id())
    async with flow_metrics("crawl-shard", settings), stager, Fetcher(settings) as fetcher:
        result = await crawl_source(
            src,
            run_id=run_id,
            settings=settings,
            fetcher=fetcher,
            stager=stager,
            flow_run_id=current_flow_run_id(),
            validators=await _validators(settings, source),
            resume=resume,
            shard=shard,
        )
    return result.as_dict()


async def _validators(settings: Settings, source: str) -> dict[str, Validators]:
    """ETag / Last-Modified from earlier runs, when there is a database to remember them (else none)."""
    dsn = settings.database_dsn()
    if not dsn:
        return {}
    try:
        pool = await connect_pool(dsn, max_size=1)
    except (DatabaseUnavailable, DatabaseRefused) as exc:
        log.warning("no conditional requests: database unavailable", source=source, error=str(exc))
        return {}
    try:
        return await load_validators(pool, settings.db_schema, source)
    finally:
        await pool.close()


async def _lastmods(settings: Settings, source: AnySource) -> dict[str, str]:
    """Sitemap lastmods from earlier runs of an html source with ``sitemaps`` (none without a database)."""
    dsn = settings.database_dsn()
    if not isinstance(source, HtmlSource) or not source.sitemaps or not dsn:
        return {}
    try:
        pool = await connect_pool(dsn, max_size=1)
    except (DatabaseUnavailable, DatabaseRefused) as exc:
        log.warning("every sitemap URL fetched: database unavailable", source=source.name, error=str(exc))
        return {}
    try:
        return await load_lastmods(pool, settings.db_schema, source.name)
    finally:
        await pool.close()


async def _window(
    settings: Settings, source: AnySource, run_id: str, override: IncrementalOverride | None
) -> CursorWindow | None:
    """The incremental window of an api source with ``incremental``: from the state its run starts from."""
    if not isinstance(source, ApiSource) or source.incremental is None:
        return None
    inc = source.incremental
    initial = _like(override.initial_value if override else None, inc.initial_value)
    end = _like(override.end_value if override else None, inc.initial_value)
    stored = None
    dsn = settings.database_dsn()
    if dsn:
        pool = await connect_pool(dsn, max_size=1)  # no state, no incremental run: a database error fails it
        try:
            stored = await start_state(pool, settings.db_schema, source.name, run_id)
        finally:
            await pool.close()
    else:
        log.warning("no database: incremental state not read, the run asks from initial_value", source=source.name)
    window = window_for(inc, stored, initial_value=initial, end_value=end)
    log.info("incremental window", source=source.name, stored=stored, start=window.start_value, end=window.end_value)
    return window


def _like(value: str | None, example: CursorValue | None) -> CursorValue | None:
    """An override (a string from the form) as a number when the source's cursor is one."""
    if value is None or not isinstance(example, int | float) or isinstance(example, bool):
        return value
    try:
        return int(value) if isinstance(example, int) else float(value)
    except ValueError:
        raise ParameterError("incremental", f"{value!r} is not a number, as the cursor's initial_value is") from None


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
    run_id: RunId | None = None,
    publish: bool = True,
    resume_run_id: RunId | None = None,
    database_secret: SecretBlockName | None = None,
    incremental: IncrementalOverride | None = None,
) -> Any:
    """Crawl the sources of SOURCES_FILE (all enabled ones, or those named) and stage them.

    Returns ``{"run_id", "flow_run_id", "staging", "sources": [per-source result]}``; a failed
    source does not stop the others, its task shows as failed and its status in
    the result says why. ``dry_run`` checks the parameters and the sources file and
    returns the plan without a request. ``resume_run_id`` continues a run that died:
    sources it committed are left as they are, sources with the durable frontier
    carry on where their last checkpoint left them, the others crawl again. ``publish`` adds the run summary artifact
    (the pipeline publishes its own, with the load's rejects). ``incremental`` overrides the
    window of the sources with ``incremental``: start from ``initial_value`` instead of the
    stored state, and/or stop at ``end_value`` (a back-fill: the state stays).

    The run ends ``Failed`` when every source failed and ``Degraded`` (a named
    ``Completed``) when some did, its message listing them; the result is the
    same dict either way (``flows._common.flow_result`` reads it from the state).
    """
    check_run_ids(run_id=run_id, resume_run_id=resume_run_id)
    selected = await asyncio.to_thread(check_sources, sources_file, sources)  # reads the sources file
    settings = await settings_for(staging, politeness, database_secret)
    stager = await asyncio.to_thread(open_stager, settings.staging, settings=settings)  # resolves a local path
    _SHARD_PARAMS.set(
        {
            "sources_file": sources_file,
            "politeness": politeness.model_dump(exclude_none=True) if politeness else None,
            "database_secret": database_secret,
        }
    )
    if resume_run_id and run_id and run_id != resume_run_id:
        raise ParameterError("resume_run_id", f"{resume_run_id} differs from run_id {run_id}: give one")
    run_id = resume_run_id or run_id or new_run_id()
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
    async with flow_metrics("crawl", settings) as measured:
        async with stager:
            await _resume_spooled(stager)
            results = await _crawl_all(
                selected, run_id, settings, stager, resume=bool(resume_run_id), incremental=incremental
            )
        failed = failed_sources(results)
        measured.failed_sources = len(failed)
        measured.failed = bool(results) and len(failed) == len(results)
        await push_sources(settings, crawled=results)
        await _push_spool(settings, stager)
    await publish_crawl(run_id, stager.uri, results)
    if publish:
        await publish_summary(run_id, results, None)
    result = {"run_id": run_id, "flow_run_id": current_flow_run_id(), "staging": stager.uri, "sources": results}
    return run_state(result, len(results), failed)


async def _push_spool(settings: Settings, stager: Stager) -> None:
    """The S3 spool's size after this crawl, for the Pushgateway (what is left there outlives the process)."""
    from sinks.s3 import S3Stager, spooled_parts

    if settings.pushgateway_url and isinstance(stager, S3Stager):
        url, root = settings.pushgateway_url, stager.spool_root
        await asyncio.to_thread(lambda: push_spool(url, str(root), spooled_parts(root)))


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


async def _committed(stager: Stager, run_id: str) -> dict[str, dict[str, Any]]:
    """Sources of a run that already have their records manifest (a resumed run leaves them be)."""
    return {
        m.source: {"source": m.source, "status": m.status, "seconds": 0.0, "manifest": m.uri, "resumed": "committed"}
        | dict(m.stats)
        for m in await stager.manifests("raw")
        if m.run_id == run_id
    }


async def _check_resumable(selected: list[AnySource], run_id: str, settings: Settings, stager: Stager) -> None:
    """A run to resume must have left a trace: staged parts or a manifest, or rows in a durable frontier."""
    if any(r.run_id == run_id for r in await stager.runs()):
        return
    for s in selected:
        if durable(s, settings):
            async with whole_frontier(s, run_id, settings) as frontier:
                if await frontier.run() is not None:
                    return
    raise ParameterError(
        "resume_run_id",
        f"no run {run_id} in the staging target {stager.uri} or the durable frontier: nothing to resume",
    )


async def _crawl_all(
    selected: list[AnySource],
    run_id: str,
    settings: Settings,
    stager: Stager,
    *,
    resume: bool = False,
    incremental: IncrementalOverride | None = None,
) -> list[dict[str, Any]]:
    """Every source as its own task, all at once in this loop, sharing one Fetcher; their results in order."""
    if resume:
        await _check_resumable(selected, run_id, settings, stager)
    done = await _committed(stager, run_id) if resume else {}
    if done:
        log.info("resumed run: sources already committed", sources=sorted(done))
    todo = [s for s in selected if s.name not in done]
    for s in todo:
        if resume and not durable(s, settings):
            log.warning("resumed run: source has no durable frontier, crawled again from the start", source=s.name)
    results = await _crawl_sources(todo, run_id, settings, stager, resume=resume, incremental=incremental)
    by_name = {r["source"]: r for r in results} | done
    return [by_name[s.name] for s in selected]


async def _crawl_sources(
    selected: list[AnySource],
    run_id: str,
    settings: Settings,
    stager: Stager,
    *,
    resume: bool,
    incremental: IncrementalOverride | None = None,
) -> list[dict[str, Any]]:
    log.info("crawl started", sources=[s.name for s in selected], staging=stager.uri)
    stats = [SourceStats() for _ in selected]
    progress = Progress(f"crawl {run_id}")
    for s, st in zip(selected, stats, strict=True):
        progress.crawl(s.name, s.kind, st)

    async def one(s: AnySource, st: SourceStats) -> Any:
        # With return_state=True Prefect returns an awaitable state; its overloads type it as a plain State.
        run: Any = crawl_source_task(
            s.name, s, run_id, settings, fetcher, stager, st, resume, incremental, return_state=True
        )
        state = await run
        progress.finished(s.name, "failed" if state.is_failed() else "complete")
        return state

    async with (
        Fetcher(settings) as fetcher,
        crawl_progress(run_id, stats, settings.progress_interval),
        show_progress(progress, settings),
    ):
        states = await asyncio.gather(*(one(s, st) for s, st in zip(selected, stats, strict=True)))
    results = []
    for src, state in zip(selected, states, strict=True):
        value = await state.aresult(raise_on_failure=False)
        if isinstance(value, SourceFailed):
            results.append(value.result.as_dict())
        elif isinstance(value, SourceResult):
            results.append(value.as_dict())
        else:  # the task itself broke (e.g. cancelled, or its source busy) before a result existed
            error = redact(str(value) if isinstance(value, BaseException) else repr(value))
            results.append({"source": src.name, "status": "failed", "error": error, "seconds": 0.0})
    log.info("crawl finished", failed=[r["source"] for r in results if r["status"] != "complete"])
    return results
