"""The Prefect flows in-process: sources run concurrently in one loop, failures stay contained, loads are exact."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import asyncpg
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.crawl import crawl
from flows.load import load
from flows.pipeline import pipeline
from trawl.demo.site import ITEM_COUNT, PRODUCT_COUNT, DemoSite

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def flow_env(
    monkeypatch: pytest.MonkeyPatch, prefect_api: str, database_url: str, demo_site: DemoSite, tmp_path: Path
) -> Path:
    """The environment the flows read their settings from; returns the staging dir."""
    staging = tmp_path / "staging"
    monkeypatch.setenv("TRAWL_DATABASE_URL", database_url)
    monkeypatch.setenv("TRAWL_STAGING", f"file://{staging}")
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_DEMO_URL", demo_site.url)
    monkeypatch.setenv("TRAWL_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("TRAWL_BACKOFF_MAX", "0.02")
    return staging


def _sources_with_broken_api(tmp_path: Path, base: str) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    spec["sources"].append(
        {
            "name": "broken",
            "kind": "api",
            "url": f"{base}/api/does-not-exist",
            "key": "id",
            "fields": {"id": {"type": "int"}},
        }
    )
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


async def test_pipeline_loads_every_product_and_item(flow_env: Path, db: asyncpg.Connection) -> None:
    result = await pipeline(str(REPO / "examples" / "demo.yaml"))

    crawled = {s["source"]: s for s in result["crawl"]}
    assert {s: crawled[s]["status"] for s in crawled} == {"products": "complete", "items": "complete"}
    assert crawled["products"]["records"] == PRODUCT_COUNT
    assert crawled["items"]["records"] == ITEM_COUNT
    assert result["load"]["products"]["inserted"] == PRODUCT_COUNT
    assert result["load"]["items"]["inserted"] == ITEM_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.products") == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 0
    run = await db.fetchrow("SELECT status, sources FROM trawl._runs WHERE run_id = $1", result["run_id"])
    assert run is not None and run["status"] == "complete"

    # One task run per source, named after it, in the Prefect API; the sources ran at the same time.
    async with get_client() as client:
        names = {t.name for t in await client.read_task_runs()}
        crawls = {
            t.name: t
            for t in await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(result["crawl_flow_run_id"])]))
            )
        }
    assert {"crawl-products", "crawl-items", "load-products", "load-items"} <= names
    products, items = crawls["crawl-products"], crawls["crawl-items"]
    assert products.start_time and products.end_time and items.start_time and items.end_time
    assert products.start_time < items.end_time and items.start_time < products.end_time


async def test_failed_source_does_not_stop_the_others(
    flow_env: Path, db: asyncpg.Connection, demo_site: DemoSite, tmp_path: Path
) -> None:
    sources = _sources_with_broken_api(tmp_path, demo_site.url)

    result = await pipeline(str(sources), sources=["items", "broken"])

    crawled = {s["source"]: s for s in result["crawl"]}
    assert crawled["items"]["status"] == "complete"
    assert crawled["broken"]["status"] == "failed"
    assert "/api/does-not-exist" in crawled["broken"]["error"]
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    failed = await db.fetch("SELECT outcome, http_status FROM trawl._outcomes WHERE source = 'broken'")
    assert [(r["outcome"], r["http_status"]) for r in failed] == [("failed", 404)]
    run = await db.fetchrow("SELECT status, sources FROM trawl._runs WHERE run_id = $1", result["run_id"])
    assert run is not None and run["status"] == "failed"


async def test_crawl_then_load_skips_what_the_ledger_has(flow_env: Path, db: asyncpg.Connection) -> None:
    first = await crawl(str(REPO / "examples" / "demo.yaml"), sources=["items"])
    second = await crawl(str(REPO / "examples" / "demo.yaml"), sources=["items"])

    loaded = await load()  # no run ids: every committed run not yet in the ledger
    assert sorted(loaded["runs"]) == sorted([first["run_id"], second["run_id"]])
    items = loaded["sources"]["items"]
    # The first run's part inserts everything; the second run's identical data only moves _last_seen_at.
    assert (items["inserted"], items["updated"], items["unchanged"]) == (ITEM_COUNT, 0, ITEM_COUNT)
    assert items["parts_loaded"] == 4  # raw + outcomes, per run

    again = await load()
    assert again["sources"]["items"]["parts_loaded"] == 0
    assert again["sources"]["items"]["parts_skipped"] == 4
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 4
    row = await db.fetchrow("SELECT _run_id, _first_seen_at < _last_seen_at AS moved FROM trawl.items WHERE _key = '1'")
    assert row is not None and row["_run_id"] == first["run_id"] and row["moved"]
