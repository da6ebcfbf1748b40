"""Shared fixtures: a real PostgreSQL (a fresh database per test), the demo site, settings for local servers."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from trawl.demo.site import DemoSite
from trawl.settings import Settings

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server: ``TRAWL_TEST_DATABASE_URL`` if set, else a throwaway pgserver cluster."""
    url = os.environ.get("TRAWL_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        server = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A brand-new empty database on the test server, dropped afterwards: tests never share state."""
    name = f"trawl_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(pg_server_dsn, name)
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's fresh database, for assertions."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def demo_site() -> AsyncIterator[DemoSite]:
    """The bundled demo site on a free loopback port, in the test's event loop."""
    async with DemoSite() as site:
        yield site


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for tests: loopback allowed (local servers), fast retries, staging in tmp."""
    return Settings(
        staging=f"file://{tmp_path / 'staging'}",
        allowed_networks=["127.0.0.0/8"],
        backoff_base=0.01,
        backoff_max=0.05,
        connect_timeout=2,
        read_timeout=2,
        total_timeout=5,
    )


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Run flows against ``prefect_test_harness`` (a throwaway server and database); yields its API URL.

    Subprocesses given this URL as ``PREFECT_API_URL`` skip the ~10 s ephemeral-server start.
    """
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(prefect.settings.PREFECT_API_URL.value())
