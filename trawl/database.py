"""Which PostgreSQL to load into: the configured DSN, or an embedded server under ``.trawl/pg``.

The embedded server is pip's ``pgserver`` (PostgreSQL 16 binaries in a wheel):
it installs with the rest of trawl on any machine, starts in under a second,
and needs no system packages or second user. It keeps running after trawl
exits (so the rows stay queryable with ``psql``) and is reused by the next run.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import asyncpg

from trawl.errors import DatabaseUnavailable
from trawl.logs import redact
from trawl.retry import pg_error
from trawl.settings import Settings

__all__ = ["connect_pool", "embedded_dsn", "open_pool", "resolve_dsn"]


def embedded_dsn(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir`` and return its DSN."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (as under root/CI) and falls back to /tmp: fine here.
            warnings.simplefilter("ignore")
            import pgserver  # deferred: only needed without a configured database

            server = pgserver.get_server(str(data_dir.resolve()), cleanup_mode=None)  # type: ignore[attr-defined]
    except Exception as exc:  # pgserver raises plain exceptions with the server log in them
        raise DatabaseUnavailable(f"embedded PostgreSQL in {data_dir} did not start: {exc}") from None
    uri: str = server.get_uri()
    return uri


def resolve_dsn(settings: Settings) -> str:
    """The DSN to load into: the setting if given, else the embedded server's."""
    return settings.database_dsn() or embedded_dsn(settings.embedded_pg_dir)


async def connect_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """An asyncpg pool, or DatabaseUnavailable / DatabaseRefused with one line saying which database and why."""
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, timeout=10, command_timeout=None)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        # By SQLSTATE: a server that is down or starting may be back soon; a bad password or database will not.
        raise pg_error(exc, redact(dsn)) from None
    assert pool is not None
    return pool


async def open_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool on the settings' database: resolved off the event loop (it may start the embedded PostgreSQL,
    a subprocess and file I/O), then connected as :func:`connect_pool` does."""
    return await connect_pool(await asyncio.to_thread(resolve_dsn, settings), min_size=min_size, max_size=max_size)
