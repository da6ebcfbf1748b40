"""What the flows share: settings at the flow's edge, which run this is, retries, per-source locks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run

from flows.params import Politeness
from trawl.errors import ParameterError, RunFailed, SourceBusy
from trawl.masking import register_secret
from trawl.metrics import METRICS, push_flow, push_source
from trawl.retry import is_transient
from trawl.settings import Settings

__all__ = [
    "FlowMetrics",
    "current_flow_run_id",
    "failed_sources",
    "flow_metrics",
    "flow_result",
    "push_sources",
    "retry_if_transient",
    "run_state",
    "settings_for",
    "source_lock",
]

log = structlog.get_logger("flows")


async def settings_for(
    staging: str | None,
    politeness: Politeness | None = None,
    database_secret: str | None = None,
) -> Settings:
    """Settings from the environment, with the flow's parameters on top.

    ``database_secret`` names a Prefect Secret block holding the database URL; it
    is read here, inside the run, so the URL never appears as a parameter value.
    """
    overrides: dict[str, Any] = {"staging": staging} if staging else {}
    if politeness is not None:
        overrides.update(politeness.overrides())
    if database_secret:
        from prefect.blocks.system import Secret

        try:
            secret: Secret[Any] = await Secret.aload(database_secret)
        except ValueError as exc:
            raise ParameterError("database_secret", f"no Secret block named {database_secret!r}: {exc}") from None
        value = secret.get()
        if not isinstance(value, str) or not value:
            raise ParameterError("database_secret", f"Secret block {database_secret!r} does not hold a URL string")
        register_secret(value)  # masked wherever trawl writes, as is its password on its own
        password = _dsn_password(value)
        if password:
            register_secret(password)
        overrides["database_url"] = value
    return Settings(**overrides)


def _dsn_password(dsn: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(dsn).password
    except ValueError:
        return None
    return unquote(password) if password else None


def current_flow_run_id() -> str | None:
    """The Prefect flow run id, when running inside one."""
    run_id = flow_run.id
    return str(run_id) if run_id else None


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn`` for trawl's tasks: retry transient failures only, never a bad config or bad data.

    Prefect's async engine calls it from inside its event loop with a Failed state
    that holds the exception; ``state.result()`` there is an un-awaited
    coroutine raising nothing (FIELD-NOTES), so the exception is read from the
    state's data (a persisted failure's ResultRecord holds it in ``result``).
    """
    exc = getattr(state.data, "result", state.data)
    if not isinstance(exc, Exception):
        log.info("task failed", task=task_run.name, error=state.message, retry=False)
        return False
    retry = is_transient(exc)
    log.info("task failed", task=task_run.name, error=str(exc), retry=retry)
    return retry


@contextlib.asynccontextmanager
async def source_lock(source: str, settings: Settings, *, takeover: bool = False) -> AsyncIterator[None]:
    """Hold the Prefect global concurrency limit ``trawl-source-NAME`` (limit 1) while a source crawls.

    Two flow runs (two deployments, or a deployment and a local run against the
    same server) never crawl one source at once: the second waits for the slot
    (``source_lock = "wait"``, up to ``source_lock_timeout`` seconds) or fails at
    once (``"refuse"``). ``"off"`` skips the lock.

    ``takeover`` (a resumed run: the run it continues died) frees a slot that run
    still holds first: a process killed with SIGKILL never gives its slot back,
    and a local run's temporary Prefect server never expires its lease.
    """
    if settings.source_lock == "off":
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.concurrency.asyncio import concurrency
    from prefect.exceptions import ObjectNotFound

    name = f"trawl-source-{source}"
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
            if takeover and limit.active_slots:
                log.warning("resumed run takes over the source's concurrency slot", source=source, limit=name)
                await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
        except ObjectNotFound:
            try:
                await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except Exception:  # created by a racing run meanwhile (409, or a 500 from SQLite's unique index)
                await client.read_global_concurrency_limit_by_name(name)
    timeout = 0.5 if settings.source_lock == "refuse" else settings.source_lock_timeout
    try:
        async with concurrency(name, occupy=1, timeout_seconds=timeout, strict=True):
            yield
    except TimeoutError:
        raise SourceBusy(
            f"source {source!r} is being crawled by another flow run (concurrency limit {name!r}); "
            + ("refused (TRAWL_SOURCE_LOCK=refuse)" if settings.source_lock == "refuse" else f"waited {timeout:.0f}s")
        ) from None


@dataclass(slots=True)
class FlowMetrics:
    """What a flow tells :func:`flow_metrics` about how it ended."""

    failed: bool = False
    """The run ends Failed (every source failed); a flow that raises is failed too."""
    failed_sources: int = 0


@contextlib.asynccontextmanager
async def flow_metrics(flow: str, settings: Settings) -> AsyncIterator[FlowMetrics]:
    """Around a flow's body: the metrics endpoint up (``metrics_port``), the run timed, then pushed.

    The push to ``pushgateway_url`` (group ``job="trawl", flow=FLOW``: the flow's
    last finish, duration, failed flag and failed sources) happens at the end
    whatever the outcome, so a failed run is visible too; a push failure is
    logged, never fails the run. Live series (requests, breakers, in flight) are
    never pushed: they are on the endpoint while the process runs.
    """
    METRICS.configure(settings.metrics_max_hosts, settings.metrics_created_series)
    if settings.metrics_port is not None:
        METRICS.serve(settings.metrics_port)
    started = time.monotonic()
    state = FlowMetrics()
    try:
        yield state
    except BaseException:
        state.failed = True
        raise
    finally:
        if settings.pushgateway_url:
            await asyncio.to_thread(
                push_flow,
                settings.pushgateway_url,
                flow,
                seconds=time.monotonic() - started,
                failed=state.failed,
                failed_sources=state.failed_sources,
            )


async def push_sources(
    settings: Settings,
    *,
    crawled: Sequence[Mapping[str, Any]] = (),
    loaded: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Push each source's last crawl (its result) or last load (its totals) to its own Pushgateway group."""
    url = settings.pushgateway_url
    if not url:
        return

    def push() -> None:
        for result in crawled:
            push_source(url, result["source"], crawl=result)
        for name, totals in (loaded or {}).items():
            push_source(url, name, load=totals)

    await asyncio.to_thread(push)


def failed_sources(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The sources of a run that failed, with why."""
    return {r["source"]: r.get("error") or "failed" for r in results if r["status"] != "complete"}


def run_state(data: dict[str, Any], total: int, failed: Mapping[str, str]) -> State[Any]:
    """A flow run's final state, from its sources' one status each: ``Completed`` when none failed,
    ``Failed`` when every one did, else ``Completed`` named ``Degraded`` whose message lists the failed ones.

    The run's result (``data``) is the same in all three; a Failed run holds it in a :class:`RunFailed`, which a
    direct call of the flow raises (:func:`flow_result` returns the result from any of them).
    """
    from prefect.states import Completed, Failed

    if not failed:
        return Completed(data=data, message=f"{total} source(s) complete")
    listed = "; ".join(f"{name}: {_short(error)}" for name, error in sorted(failed.items()))
    if len(failed) >= total:
        message = f"every source failed ({listed})"
        # An exception as the data: a direct caller (`await crawl(...)`) gets RunFailed, the result on it.
        return Failed(data=RunFailed(message, data), message=message)
    return Completed(name="Degraded", data=data, message=f"{len(failed)} of {total} sources failed ({listed})")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def flow_result(run: Awaitable[State[Any]] | State[Any]) -> dict[str, Any]:
    """The result of a flow run called with ``return_state=True`` (its state, or the call to await), whether it
    ended Completed, Degraded or Failed with a result; the exception it raised, if it raised one."""
    state = run if isinstance(run, State) else await run
    value = await state.aresult(raise_on_failure=False)
    if isinstance(value, RunFailed):
        return value.result
    if isinstance(value, BaseException):
        raise value
    if not isinstance(value, dict):
        raise TypeError(f"flow run ended {state.name} without a result: {state.message}")
    return value
