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
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from trawl.errors import (
    DatabaseRefused,
    DatabaseUnavailable,
    FetchError,
    LoadConflict,
    PermanentFetchError,
    Throttled,
    TransientFetchError,
    TrawlError,
)

__all__ = [
    "TRANSIENT_STATUS",
    "full_jitter",
    "is_throttle",
    "is_transient",
    "is_transient_status",
    "pg_error",
    "retry_after",
    "status_error",
]

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 508, 509, 520, 521, 522, 523, 524})
"""HTTP statuses that are retried (Scrapy's ``RETRY_HTTP_CODES`` too); all but the throttle signals
(:func:`is_throttle`) count as failures for a host's breaker."""

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


def is_throttle(status: int, retry_after: float | None) -> bool:
    """Whether a response asks us to slow down rather than failed: 429, or 503 with a ``Retry-After``.

    A throttle signal slows the host (its gate) instead of counting toward its breaker.
    """
    return status == 429 or (status == 503 and retry_after is not None)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a ``Retry-After`` header (lower-cased names) asks for: delta-seconds or an HTTP-date; None if absent
    or unreadable."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def status_error(status: int, url: str, after: float | None = None) -> FetchError:
    """The error a final HTTP status other than 2xx/304 is, on every transport (aiohttp, httpx, the browser,
    Scrapy); ``after`` is the response's ``Retry-After`` in seconds (:func:`retry_after`)."""
    cls: type[FetchError]
    if is_throttle(status, after):
        cls = Throttled
    else:
        cls = TransientFetchError if status in TRANSIENT_STATUS else PermanentFetchError
    error = cls(f"HTTP {status}", url=url, status=status)
    error.retry_after = after
    return error


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
