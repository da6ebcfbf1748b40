"""The flows' task retries follow the one transient/terminal classification, in the async engine that asks."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
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
