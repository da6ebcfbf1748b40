"""The flows' task retries follow the one transient/terminal classification, in the async engine that asks."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from prefect import flow, task
from prefect.states import Failed

from flows._common import retry_if_transient
from trawl.errors import ConfigError, DatabaseUnavailable, LoadError, TransientFetchError


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (DatabaseUnavailable("down"), True),
        (asyncpg.SerializationError("could not serialize access"), True),
        (asyncpg.DeadlockDetectedError("deadlock detected"), True),
        (TransientFetchError("reset", url="http://x/"), True),
        (ConnectionResetError(), True),
        (LoadError("bad column"), False),
        (ConfigError("bad file"), False),
        (asyncpg.InvalidPasswordError("password authentication failed"), False),
    ],
)
async def test_retry_condition_sees_the_exception_inside_the_event_loop(exc: BaseException, retry: bool) -> None:
    # Prefect's async task engine hands the condition a Failed state holding the exception, from inside its loop.
    class _Run:
        name = "load-part"

    state: Any = Failed(data=exc, message=repr(exc))
    assert retry_if_transient(None, _Run(), state) is retry  # type: ignore[arg-type]


# Defined at import: Prefect reads a flow's source when it is made, a blocking call inside a test's event loop.
_ATTEMPTS: dict[str, int] = {}


@task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_if_transient)
async def _flaky(kind: str) -> str:
    _ATTEMPTS[kind] = _ATTEMPTS.get(kind, 0) + 1
    if kind == "transient" and _ATTEMPTS[kind] < 3:
        raise TransientFetchError("connection reset", url="http://x/")
    if kind == "config":
        raise ConfigError("sources.yaml: bad entry")
    return "done"


@flow
async def _transient_then_config() -> tuple[str, Any]:
    ok = await _flaky("transient")
    bad = await _flaky("config", return_state=True)  # type: ignore[call-overload]
    return ok, bad


async def test_an_async_task_retries_a_transient_failure_and_not_a_bad_config(prefect_api: str) -> None:
    """Through Prefect's own async task engine, as the flows' tasks run: the task counts its attempts."""
    _ATTEMPTS.clear()
    ok, bad = await _transient_then_config()
    assert ok == "done" and _ATTEMPTS["transient"] == 3  # two transient failures retried, then success
    assert bad.is_failed() and _ATTEMPTS["config"] == 1  # a bad config is not retried
