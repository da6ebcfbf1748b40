"""What the flows share: settings at the flow's edge, which run this is, retries, per-source locks."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run

from flows.params import Politeness
from trawl.errors import ParameterError, SourceBusy
from trawl.masking import register_secret
from trawl.metrics import METRICS
from trawl.retry import is_transient
from trawl.settings import Settings

__all__ = [
    "FlowMetrics",
    "current_flow_run_id",
    "flow_metrics",
    "retry_if_transient",
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


_IN_FLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("trawl_in_flow_metrics", default=False)
"""True inside a flow's :func:`flow_metrics` (a subflow's does not push: the outer flow's push has it)."""


@contextlib.asynccontextmanager
async def flow_metrics(flow: str, settings: Settings, scope: str = "all") -> AsyncIterator[FlowMetrics]:
    """Around a flow's body: the metrics endpoint up (``metrics_port``), the run counted and timed, then pushed.

    The push to ``pushgateway_url`` happens at the end whatever the outcome, so a
    failed run is visible too; a push failure is logged, never fails the run. Only
    the outermost flow of a process pushes (a pipeline's crawl and load subflows
    are in its push), once, to the group ``job=trawl, entry_flow, scope``
    (``scope``: the sources run), so runs of different sources or flows do not
    overwrite each other's last-success times. The group's label is not ``flow``:
    the metrics' own ``flow`` label tells the pipeline, crawl and load apart.
    """
    METRICS.max_hosts = settings.metrics_max_hosts
    if settings.metrics_port is not None:
        METRICS.serve(settings.metrics_port)
    started = time.monotonic()
    state = FlowMetrics()
    outermost = not _IN_FLOW.get()
    token = _IN_FLOW.set(True)
    try:
        yield state
    except BaseException:
        state.failed = True
        raise
    finally:
        METRICS.runs.labels(flow, "failed" if state.failed else "completed").inc()
        METRICS.run_failed.labels(flow).set(1 if state.failed else 0)
        METRICS.run_seconds.labels(flow).set(time.monotonic() - started)
        _IN_FLOW.reset(token)
        if settings.pushgateway_url and outermost:
            group = {"entry_flow": flow, "scope": scope}
            await asyncio.to_thread(METRICS.push, settings.pushgateway_url, "trawl", group)
