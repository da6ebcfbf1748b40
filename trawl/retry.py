"""The one retry policy: which failures are transient, and how long to wait before the next attempt.

Every stage asks the same questions here: the fetch layer (html and api
requests), browser navigations, Scrapy's middleware, S3 uploads, the loader and
the flows' task retries. trawl's own errors answer by class
(:class:`trawl.errors.Transient`); foreign errors are judged once, here: OS and
connection errors and timeouts by type, PostgreSQL errors by SQLSTATE, S3 errors
by code and status.
"""

from __future__ import annotations

import random
import socket

from trawl.errors import (
    DatabaseRefused,
    DatabaseUnavailable,
    LoadConflict,
    PermanentFetchError,
    TransientFetchError,
    TrawlError,
)

__all__ = [
    "TRANSIENT_STATUS",
    "full_jitter",
    "is_transient",
    "is_transient_status",
    "pg_error",
    "status_error",
]

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 508, 509, 520, 521, 522, 523, 524})
"""HTTP statuses that are retried and count as failures for a host's breaker (Scrapy's ``RETRY_HTTP_CODES`` too)."""

# S3 error codes that say "later" (throttling, timeouts, the service's own trouble); 5xx and 429 are transient too.
_S3_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BadGateway",
        "GatewayTimeout",
    }
)

# SQLSTATEs (or their classes) the next attempt may not meet: serialization failure, deadlock, connection
# exceptions (08…), operator intervention such as an admin shutdown or a server starting up (57P…),
# insufficient resources (53…).
_PG_TRANSIENT_STATES = frozenset({"40001", "40P01"})
_PG_TRANSIENT_CLASSES = ("08", "57P", "53")
# Answers that will not change: bad password or role (28…), no such database (3D000).
_PG_REFUSED_CLASSES = ("28", "3D")


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential backoff, capped, with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt."""
    return status in TRANSIENT_STATUS


def status_error(status: int, url: str) -> TransientFetchError | PermanentFetchError:
    """The error a final HTTP status other than 2xx/304 is, on every transport (aiohttp, httpx, the browser)."""
    cls = TransientFetchError if status in TRANSIENT_STATUS else PermanentFetchError
    return cls(f"HTTP {status}", url=url, status=status)


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def pg_error(exc: BaseException, where: str) -> TrawlError:
    """A PostgreSQL failure as trawl's error, by SQLSTATE: lost connections and conflicts are transient,
    authentication failures and unknown databases terminal. ``where`` names the database (DSN redacted)."""
    state = _sqlstate(exc)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state.startswith(_PG_REFUSED_CLASSES) or isinstance(exc, ValueError):
        return DatabaseRefused(f"PostgreSQL at {where} refused: {reason}")
    if state in _PG_TRANSIENT_STATES:
        return LoadConflict(f"PostgreSQL at {where}: {reason} (SQLSTATE {state})")
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {where}: {reason}")


def _transient_s3(exc: BaseException) -> bool | None:
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return err.get("Code") in _S3_TRANSIENT_CODES or status == 429 or status >= 500
    if isinstance(exc, (HTTPClientError, BotoConnectionError)):
        return True
    if isinstance(exc, BotoCoreError):
        return False
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures the next attempt may not meet, whatever raised them; the only such judgement in trawl."""
    if isinstance(exc, TrawlError):
        return exc.transient
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        state = _sqlstate(exc)
        return state in _PG_TRANSIENT_STATES or (bool(state) and state.startswith(_PG_TRANSIENT_CLASSES))
    if module.startswith("botocore"):
        verdict = _transient_s3(exc)
        if verdict is not None:
            return verdict
    if module.startswith("aiohttp"):  # aiobotocore's transport under S3: connection trouble of any kind
        return True
    # Network trouble below any client (a refused or reset connection, a timeout, a failed DNS lookup); other OS
    # errors (a full disk, a missing file) will not pass by themselves.
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))
