"""The Prefect flows in-process: sources run concurrently in one loop, failures stay contained, loads are exact."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import Artifact
from prefect.exceptions import ParameterTypeError

from flows._common import source_lock
from flows.artifacts import ERRORS_KEY, LINK_KEY, PROGRESS_KEY, SUMMARY_KEY
from flows.crawl import crawl
from flows.load import load
from flows.pipeline import pipeline
from tests.helpers.staged import staged_lines
from trawl.demo.account import ORDER_COUNT
from trawl.demo.site import ITEM_COUNT, JS_DEMO_COUNT, PAGE_COUNT, PRODUCT_COUNT, DemoSite
from trawl.errors import ParameterError, RunFailed
from trawl.settings import Settings

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
    assert {s: crawled[s]["status"] for s in crawled} == {
        "products": "complete",
        "items": "complete",
        "js_products": "complete",
        "orders": "complete",
    }
    assert crawled["orders"]["records"] == ORDER_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.orders") == ORDER_COUNT
    assert crawled["js_products"]["records"] == JS_DEMO_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.js_products") == JS_DEMO_COUNT
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
        expected = {
            "crawl-products",
            "crawl-items",
            "load-products-raw-part-1",
            "load-products-outcomes-part-1",
            "load-items-raw-part-1",
            "load-items-outcomes-part-1",
        }
        # Only this pipeline's subflows: the session's Prefect API holds every earlier test's task runs too
        # (one unfiltered page would miss some, and earlier runs' names would count).
        by_name = TaskRunFilter(name=TaskRunFilterName(any_=sorted(expected)))
        under_pipeline = FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(result["flow_run_id"])])
        )
        # The API records task runs from the events the flow sent: they may arrive a moment after it returns.
        for _ in range(60):
            runs = {
                t.name: t for t in await client.read_task_runs(task_run_filter=by_name, flow_run_filter=under_pipeline)
            }
            if expected <= runs.keys() and all(runs[n].end_time for n in expected):
                break
            await asyncio.sleep(0.5)
    assert expected <= runs.keys()
    products, items = runs["crawl-products"], runs["crawl-items"]
    assert products.start_time and products.end_time and items.start_time and items.end_time
    assert products.start_time < items.end_time and items.start_time < products.end_time


async def test_failed_source_does_not_stop_the_others(
    flow_env: Path, db: asyncpg.Connection, demo_site: DemoSite, tmp_path: Path
) -> None:
    sources = await asyncio.to_thread(_sources_with_broken_api, tmp_path, demo_site.url)

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
    row = await db.fetchrow(
        "SELECT d.run_id AS _run_id, t._first_seen_at < v._last_seen_at AS moved FROM trawl.items t"
        " JOIN trawl._loads d ON d.load_id = t._load_id JOIN trawl_views.items v ON v._key = t._key WHERE t._key = '1'"
    )
    assert row is not None and row["_run_id"] == first["run_id"] and row["moved"]


async def _artifacts(flow_run_id: str) -> dict[str, Artifact]:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )
    return {a.key: a for a in found if a.key}


async def test_pipeline_publishes_summary_progress_link_and_errors(
    flow_env: Path, db: asyncpg.Connection, demo_site: DemoSite, tmp_path: Path
) -> None:
    sources = await asyncio.to_thread(_sources_with_broken_api, tmp_path, demo_site.url)

    result = await pipeline(str(sources), sources=["items", "broken"])

    summary = (await _artifacts(result["flow_run_id"]))[SUMMARY_KEY]
    assert summary.type == "markdown" and isinstance(summary.data, str)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in summary.data.splitlines()
        if line.startswith("| ") and not line.startswith("| source")
    }
    # source, status, pages, records, rejects, fetched, not modified, failures by outcome, breaker trips, MB, s
    assert rows["items"][:8] == ["items", "complete", "25", str(ITEM_COUNT), "0", "25", "0", "none"]
    assert rows["broken"][1].startswith("failed (") and rows["broken"][7] == "failed 1"

    crawl_artifacts = await _artifacts(result["crawl_flow_run_id"])
    assert set(crawl_artifacts) >= {PROGRESS_KEY, LINK_KEY, ERRORS_KEY}
    assert crawl_artifacts[PROGRESS_KEY].data == 100.0
    assert f"]({flow_env.as_uri()})" in str(crawl_artifacts[LINK_KEY].data)
    errors = crawl_artifacts[ERRORS_KEY].data
    table = orjson.loads(errors) if isinstance(errors, str) else errors
    assert table[0]["source"] == "broken" and table[0]["outcome"] == "failed" and table[0]["count"] == 1
    assert table[0]["example_url"].endswith("/api/does-not-exist")


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"sources": ["nope"]}, "sources"),
        ({"sources_file": "does/not/exist.yaml"}, "sources_file"),
    ],
)
async def test_bad_parameters_stop_the_run_before_any_request(
    flow_env: Path, demo_site: DemoSite, kwargs: dict[str, Any], parameter: str
) -> None:
    kwargs.setdefault("sources_file", str(REPO / "examples" / "demo.yaml"))
    with pytest.raises(ParameterError, match=f"parameter '{parameter}'"):
        await pipeline(**kwargs)
    assert not demo_site.requests


async def test_malformed_staging_url_is_refused_naming_the_parameter(flow_env: Path, demo_site: DemoSite) -> None:
    with pytest.raises(ParameterTypeError, match="staging"):
        await pipeline(str(REPO / "examples" / "demo.yaml"), staging="ftp://example.com/x")
    assert not demo_site.requests


async def test_dry_run_fetches_nothing(flow_env: Path, demo_site: DemoSite, db: asyncpg.Connection) -> None:
    result = await pipeline(str(REPO / "examples" / "demo.yaml"), dry_run=True)

    assert result["dry_run"] is True
    assert {s["source"]: s["status"] for s in result["crawl"]} == {
        "products": "planned",
        "items": "planned",
        "js_products": "planned",
        "orders": "planned",
    }
    assert not demo_site.requests


async def test_a_source_busy_in_another_run_is_refused(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch, demo_site: DemoSite
) -> None:
    monkeypatch.setenv("TRAWL_SOURCE_LOCK", "refuse")
    settings = Settings()

    async with source_lock("products", settings):  # another run holds the source
        with pytest.raises(RunFailed) as failed:  # its only source failed: the run is Failed
            await crawl(str(REPO / "examples" / "demo.yaml"), sources=["products"])

    [products] = failed.value.result["sources"]
    assert products["status"] == "failed"
    assert "'products' is being crawled by another flow run" in products["error"]
    assert not demo_site.requests


async def test_a_source_busy_in_another_run_is_waited_for(flow_env: Path, demo_site: DemoSite) -> None:
    settings = Settings()
    demo = str(REPO / "examples" / "demo.yaml")

    async with source_lock("items", settings):  # another run holds the source
        waiting = asyncio.create_task(crawl(demo, sources=["items"]))
        await asyncio.sleep(5)
        assert not waiting.done() and not demo_site.requests
    result = await waiting

    assert result["sources"][0]["status"] == "complete"
    assert result["sources"][0]["records"] == ITEM_COUNT


@pytest.mark.slow
async def test_spider_html_and_api_sources_interleave_in_one_flow(
    flow_env: Path, db: asyncpg.Connection, demo_site: DemoSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The three share the demo host's gate, so they take turns on it; no per-source lock round trips to the
    # Prefect test server, which can hold one source's start back by seconds.
    monkeypatch.setenv("TRAWL_PER_HOST_CONCURRENCY", "4")
    monkeypatch.setenv("TRAWL_SOURCE_LOCK", "off")
    spec = yaml.safe_load(await asyncio.to_thread((REPO / "examples" / "demo.yaml").read_text))
    by_name = {s["name"]: s for s in spec["sources"]}
    items = {**by_name["items"], "params": {"limit": 10}}  # 250 API pages, so it lasts as long as the others
    books = {
        "name": "books",
        "kind": "spider",
        "spider": "spiders.books:BooksSpider",
        "args": {"base_url": demo_site.url},
        "key": "sku",
        "fields": {"sku": {"type": "text", "required": True}, "price": {"type": "float"}, "rating": {"type": "int"}},
    }
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(
        path.write_text, yaml.safe_dump({"version": 1, "sources": [books, by_name["products"], items]})
    )

    result = await pipeline(str(path))

    crawled = {s["source"]: s for s in result["crawl"]}
    assert {s: crawled[s]["status"] for s in crawled} == {
        "books": "complete",
        "products": "complete",
        "items": "complete",
    }
    assert crawled["books"]["records"] == PRODUCT_COUNT
    assert crawled["books"]["scrapy"]["item_scraped_count"] == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.books") == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.products") == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 0
    # The same product, scraped by Scrapy and by the html connector, lands with the same values.
    same = await db.fetchval(
        "SELECT count(*) FROM trawl.books b JOIN trawl.products p ON p._key = b._key "
        "WHERE b.price = p.price AND b.rating = p.rating"
    )
    assert same == PRODUCT_COUNT
    # One outcome per URL for the spider too, and the three sources' requests overlap in time.
    assert (
        await db.fetchval("SELECT count(*) FROM trawl._outcomes WHERE source = 'books'") == PRODUCT_COUNT + PAGE_COUNT
    )
    windows = {
        r["source"]: (r["first"], r["last"])
        for r in await db.fetch("SELECT source, min(at) AS first, max(at) AS last FROM trawl._outcomes GROUP BY source")
    }
    assert max(first for first, _ in windows.values()) < min(last for _, last in windows.values())
    first, last = windows["books"]
    during = await db.fetch(
        "SELECT source, count(*) AS n FROM trawl._outcomes WHERE at > $1 AND at < $2 GROUP BY source", first, last
    )
    assert {r["source"] for r in during if r["n"] > 10} == {"books", "products", "items"}


async def test_a_spider_source_runs_twice_in_one_process_with_identical_results(
    flow_env: Path, demo_site: DemoSite
) -> None:
    def staged(run_id: str) -> list[tuple[str, str]]:
        return sorted((r["key"], r["content_hash"]) for r in staged_lines(flow_env, "orders", run_id=run_id))

    first = await crawl(str(REPO / "examples" / "demo.yaml"), sources=["orders"])
    second = await crawl(str(REPO / "examples" / "demo.yaml"), sources=["orders"])

    for result in (first, second):
        (orders,) = result["sources"]
        assert orders["status"] == "complete" and orders["records"] == ORDER_COUNT
        assert orders["outcomes"] == {"fetched": 3}
    assert first["run_id"] != second["run_id"]
    assert len(await asyncio.to_thread(staged, first["run_id"])) == ORDER_COUNT
    assert await asyncio.to_thread(staged, first["run_id"]) == await asyncio.to_thread(staged, second["run_id"])
