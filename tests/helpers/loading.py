"""The PostgreSQL loader's test fixtures and read-backs, for every test that loads staged parts.

Registered for the whole suite by ``pytest_plugins`` in tests/conftest.py. ``loader``
needs a ``stager`` fixture from the test module: how big its parts are is part of
what each module tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from sinks.postgres import Loader, PartLoad
from sinks.stage import LocalStager
from trawl.database import connect_pool

__all__ = ["loader", "part_totals", "pool", "table_rows"]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A connection pool on the test's fresh database, as the loader gets one."""
    pool = await connect_pool(database_url)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def loader(pool: asyncpg.Pool, stager: LocalStager) -> Loader:
    """A loader on ``pool`` reading from the module's ``stager``, its tables set up."""
    loader = Loader(pool, stager)
    await loader.setup()
    return loader


def part_totals(results: Sequence[PartLoad]) -> tuple[int, int, int, int]:
    """(inserted, updated, unchanged, rejected) summed over the parts loaded."""
    return (
        sum(r.inserted for r in results),
        sum(r.updated for r in results),
        sum(r.unchanged for r in results),
        sum(r.rejected for r in results),
    )


async def table_rows(db: asyncpg.Connection, table: str = "items") -> dict[str, asyncpg.Record]:
    """Every row of ``trawl.<table>`` by its ``_key``, with what is one join away: the run and staged object of
    the load that wrote its content (``_run_id``, ``_staged_object``) and ``_last_seen_at`` from its view."""
    return {
        r["_key"]: r
        for r in await db.fetch(
            f'SELECT t.*, d.run_id AS _run_id, d.staged_object AS _staged_object, v._last_seen_at FROM trawl."{table}" t'
            f' JOIN trawl._loads d ON d.load_id = t._load_id JOIN trawl_views."{table}" v ON v._key = t._key'
            " ORDER BY t._key"
        )
    }
