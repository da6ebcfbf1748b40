"""The one retry policy: which failures are transient, whatever raised them, and how long to wait."""

from __future__ import annotations

import asyncpg
import pytest

from trawl.errors import (
    ConfigError,
    DatabaseRefused,
    DatabaseUnavailable,
    LoadConflict,
    LoadError,
    PermanentFetchError,
    StagingError,
    StagingUnavailable,
    Terminal,
    TooManyRejects,
    Transient,
    TransientFetchError,
    TrawlError,
)
from trawl.retry import TRANSIENT_STATUS, full_jitter, is_transient, pg_error, status_error


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (asyncpg.SerializationError("conflict"), True),
        (asyncpg.DeadlockDetectedError("deadlock"), True),
        (asyncpg.AdminShutdownError("terminating connection"), True),
        (asyncpg.CannotConnectNowError("starting up"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), True),
        (asyncpg.TooManyConnectionsError("too many clients"), True),
        (asyncpg.InvalidPasswordError("password authentication failed"), False),
        (asyncpg.InvalidAuthorizationSpecificationError("role does not exist"), False),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), False),
        (asyncpg.UniqueViolationError("duplicate key"), False),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (FileNotFoundError("/no/such/dir"), False),
        (ValueError("bug"), False),
    ],
)
def test_postgres_and_os_errors_are_judged_by_sqlstate_and_type(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (asyncpg.InvalidPasswordError("password authentication failed for user x"), DatabaseRefused),
        (asyncpg.InvalidCatalogNameError('database "nope" does not exist'), DatabaseRefused),
        (ValueError("invalid DSN: scheme is expected to be postgresql"), DatabaseRefused),
        (asyncpg.SerializationError("could not serialize access"), LoadConflict),
        (asyncpg.DeadlockDetectedError("deadlock detected"), LoadConflict),
        (asyncpg.CannotConnectNowError("the database system is starting up"), DatabaseUnavailable),
        (ConnectionRefusedError(111, "Connect call failed"), DatabaseUnavailable),
    ],
)
def test_pg_error_maps_to_one_trawl_error_that_names_the_database(exc: BaseException, cls: type) -> None:
    err = pg_error(exc, "postgresql://***@db:5432/x")
    assert type(err) is cls
    assert "postgresql://***@db:5432/x" in str(err)
    assert err.transient is (cls is not DatabaseRefused)
    assert is_transient(err) is err.transient


def test_a_refused_database_is_a_config_error_never_retried() -> None:
    err = pg_error(asyncpg.InvalidPasswordError("password authentication failed"), "db")
    assert isinstance(err, ConfigError) and isinstance(err, Terminal) and not err.transient


@pytest.mark.parametrize("status", sorted(TRANSIENT_STATUS))
def test_transient_statuses_give_transient_fetch_errors(status: int) -> None:
    err = status_error(status, "http://x/")
    assert isinstance(err, TransientFetchError) and err.status == status and err.transient


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 501, 505])
def test_other_statuses_are_permanent_on_every_transport(status: int) -> None:
    err = status_error(status, "http://x/")
    assert isinstance(err, PermanentFetchError) and str(err) == f"HTTP {status}" and not err.transient


def test_transient_and_terminal_are_catchable_markers() -> None:
    transient = [
        DatabaseUnavailable("x"),
        StagingUnavailable("x"),
        LoadConflict("x"),
        TransientFetchError("x", url="u"),
    ]
    terminal = [ConfigError("x"), PermanentFetchError("x", url="u")]
    for err in transient:
        assert isinstance(err, Transient) and err.transient
        with pytest.raises(Transient):
            raise err
    for err in terminal:
        assert isinstance(err, Terminal) and not err.transient
    for err in (StagingError("x"), LoadError("x"), TooManyRejects("x")):
        assert not err.transient and not isinstance(err, Transient)
    assert all(isinstance(e, TrawlError) for e in [*transient, *terminal])


def test_full_jitter_stays_under_the_exponential_cap() -> None:
    for attempt in range(8):
        waits = [full_jitter(attempt, 0.5, 4.0) for _ in range(200)]
        assert all(0 <= w <= min(4.0, 0.5 * 2**attempt) for w in waits)
    assert max(full_jitter(10, 0.5, 4.0) for _ in range(200)) > 2.0  # it does use the range
