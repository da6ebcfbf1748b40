"""Incremental api sources end to end: the pipeline flow, PostgreSQL state, Prefect Secret blocks, `trawl state`."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from flows.params import IncrementalOverride
from flows.pipeline import pipeline
from sinks.state import advance_state, start_state
from tests.helpers.saas import BASE, CLIENT_SECRET, PRODUCT_KEY, SaasApi, serve
from trawl.cli import main
from trawl.errors import RunFailed
from trawl.staging import Manifest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]

EXAMPLE = REPO / "examples" / "api" / "tickets.yaml"


@pytest.fixture
async def saas() -> AsyncIterator[SaasApi]:
    async for api in serve(SaasApi()):
        yield api


@pytest.fixture
async def sources_file(
    saas: SaasApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str, database_url: str
) -> Path:
    from prefect.blocks.system import Secret

    await Secret(value=CLIENT_SECRET).save("tickets-client-secret", overwrite=True)
    monkeypatch.setenv("API_URL", saas.url)
    monkeypatch.setenv("PRODUCT_KEY", PRODUCT_KEY)
    monkeypatch.setenv("TRAWL_DATABASE_URL", database_url)
    monkeypatch.setenv("TRAWL_STAGING", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("TRAWL_BACKOFF_MAX", "0.02")
    monkeypatch.setenv("TRAWL_MAX_RETRIES", "1")
    return EXAMPLE


async def _state(db: asyncpg.Connection) -> str | None:
    value: str | None = await db.fetchval("SELECT value #>> '{}' FROM trawl._state WHERE source = 'tickets'")
    return value


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


async def test_incremental_runs_load_only_what_changed(
    sources_file: Path, saas: SaasApi, db: asyncpg.Connection, database_url: str
) -> None:
    # Run 1: no state yet, so initial_value; every ticket loads, the largest updated_at becomes the state.
    first = await pipeline(str(sources_file))
    assert {c["source"]: c["status"] for c in first["crawl"]} == {"tickets": "complete", "products": "complete"}
    assert saas.since == ["2024-01-01T00:00:00Z"]
    assert first["load"]["tickets"]["inserted"] == 50
    assert await _state(db) == "2024-01-03T02:00:00Z"  # ticket 50, 50 h after BASE

    # The GraphQL source paged to its end through the body and each product's detail landed in the table.
    assert [b["variables"]["after"] for b in saas.bodies] == [None, "7", "14", "21"]
    assert saas.requests == {f"SKU-{i:03d}": 1 for i in range(1, 24)}
    row = await db.fetchrow("SELECT name, description, price FROM trawl.products WHERE _key = 'SKU-005'")
    assert dict(row) == {"name": "product SKU-005", "description": "the 5th product", "price": 7.5}

    # Run 2: the server changed 10 tickets and added 5; trawl asks from the state minus the lag.
    saas.change(range(1, 11), BASE + timedelta(days=4))
    saas.add(range(51, 56), BASE + timedelta(days=4, hours=1))
    second = await pipeline(str(sources_file), sources=["tickets"])
    assert saas.since[-1] == "2024-01-03T01:55:00Z"
    loaded = second["load"]["tickets"]
    assert (loaded["inserted"], loaded["updated"]) == (5, 10)  # ticket 50 (inside the lag) is unchanged
    assert loaded["unchanged"] == 1
    assert await db.fetchval("SELECT count(*) FROM trawl.tickets WHERE title LIKE '%(edited)'") == 10
    assert await _state(db) == "2024-01-05T01:04:00Z"

    # Run 3 fails half way (page 2 is down): what it fetched is loaded, the state stays where it was.
    saas.change(range(11, 41), BASE + timedelta(days=6))  # 30 changes: two pages
    saas.fail_page = 2
    with pytest.raises(RunFailed) as failed:  # its only source failed: the run ends Failed, its result on the error
        await pipeline(str(sources_file), sources=["tickets"])
    third = failed.value.result
    assert third["crawl"][0]["status"] == "failed"
    assert saas.since[-1] == "2024-01-05T00:59:00Z"  # the state, minus the lag
    assert await _state(db) == "2024-01-05T01:04:00Z"

    # A back-fill from the flow's form: its window, and the state does not move.
    saas.fail_page = None
    window = IncrementalOverride(initial_value="2024-01-01T00:00:00Z", end_value="2024-01-02T00:00:00Z")
    fourth = await pipeline(str(sources_file), sources=["tickets"], incremental=window)
    assert fourth["crawl"][0]["status"] == "complete"
    assert saas.since[-1] == "2024-01-01T00:00:00Z"
    assert await _state(db) == "2024-01-05T01:04:00Z"

    # `trawl state` shows it and resets it; the next run starts from initial_value again.
    code, out = await asyncio.to_thread(_cli, "state", "ls", "--database-url", database_url)
    assert code == 0
    assert "tickets" in out and '"2024-01-05T01:04:00Z"' in out and "updated_at" in out
    code, out = await asyncio.to_thread(_cli, "state", "reset", "tickets", "--database-url", database_url)
    assert (code, out.splitlines()[-1]) == (0, "tickets: state reset; next run starts from initial_value")
    assert await _state(db) is None
    code, out = await asyncio.to_thread(_cli, "state", "ls", "--database-url", database_url)
    assert out.splitlines()[-1] == "no incremental state in schema trawl"


async def test_a_resumed_run_keeps_the_state_it_started_with(db: asyncpg.Connection, database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:

        def manifest(run_id: str, last: object, status: str = "complete") -> Manifest:
            stats = {"incremental": {"cursor_path": "n", "last_value": last, "moves_state": True}}
            return Manifest("m", "raw", "s", run_id, "2024-01-01", status, (), {}, stats, None, "", "", None)  # type: ignore[arg-type]

        assert await start_state(pool, "trawl", "s", "r1") is None
        assert await advance_state(pool, "trawl", manifest("r0", 10)) == 10
        assert await start_state(pool, "trawl", "s", "r1") is None  # r1 started before: it keeps its start
        assert await start_state(pool, "trawl", "s", "r2") == 10
        assert await advance_state(pool, "trawl", manifest("r2", 7)) == 10  # the state only moves forward
        assert await advance_state(pool, "trawl", manifest("r3", 99, "failed")) is None  # a failed run moves nothing
        assert await db.fetchval("SELECT value FROM trawl._state WHERE source = 's'") == "10"
    finally:
        await pool.close()
