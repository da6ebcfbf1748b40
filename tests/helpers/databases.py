"""Throwaway PostgreSQL databases on a test server: every test (and benchmark) gets its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

__all__ = ["admin", "fresh_database", "scratch_database", "with_database"]


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at database ``name``."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def admin(server_dsn: str, sql: str) -> None:
    """One statement on a connection of its own (``CREATE DATABASE`` cannot run inside a transaction)."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def fresh_database(server_dsn: str, prefix: str = "trawl_test") -> AsyncIterator[str]:
    """A brand-new empty database on the server, as a DSN; dropped (``WITH (FORCE)``) on the way out."""
    name = _new_name(prefix)
    await admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_dsn, name)
    finally:
        await admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_database(server_dsn: str, prefix: str = "trawl_test") -> Iterator[str]:
    """:func:`fresh_database` for code with no running event loop (sync fixtures, a benchmark's ``main``)."""
    name = _new_name(prefix)
    asyncio.run(admin(server_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_dsn, name)
    finally:
        asyncio.run(admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
