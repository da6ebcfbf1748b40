"""S3 staging end to end: the demo crawled into moto and loaded into PostgreSQL, with and without S3 outages."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest

from flows.pipeline import pipeline
from sinks.postgres import Loader, PartLoad
from sinks.s3 import S3Stager
from sinks.targets import open_stager
from trawl.config import load_sources, select_sources
from trawl.crawler import crawl_source
from trawl.database import connect_pool
from trawl.demo.site import ITEM_COUNT, PRODUCT_COUNT, DemoSite
from trawl.errors import StagingError
from trawl.fetch import Fetcher
from trawl.settings import Settings
from trawl.staging import Stager

from ..conftest import TcpProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Everything a load writes into a source's table except lineage that differs between two runs by nature.
_VOLATILE = ("_fetched_at", "_first_seen_at", "_changed_at", "_load_id")


async def _table(db: asyncpg.Connection, schema: str, table: str) -> list[dict[str, Any]]:
    rows = await db.fetch(f'SELECT * FROM {schema}."{table}" ORDER BY _key')
    return [{k: v for k, v in dict(r).items() if k not in _VOLATILE} for r in rows]


@pytest.mark.slow
async def test_demo_staged_to_s3_loads_the_same_rows_as_a_local_directory(
    monkeypatch: pytest.MonkeyPatch,
    prefect_api: str,
    database_url: str,
    db: asyncpg.Connection,
    demo_site: DemoSite,
    s3_bucket: str,
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    for name, value in (
        ("TRAWL_DATABASE_URL", database_url),
        ("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]'),
        ("TRAWL_DEMO_URL", demo_site.url),
        ("TRAWL_PART_MAX_RECORDS", "500"),
        ("TRAWL_S3_ENDPOINT_URL", moto_endpoint),
        ("TRAWL_S3_ADDRESSING_STYLE", "path"),
        ("TRAWL_S3_SPOOL_DIR", str(tmp_path / "spool")),
    ):
        monkeypatch.setenv(name, value)
    demo = str(REPO / "examples" / "demo.yaml")
    results = {}
    for schema, staging in (("trawl", f"file://{tmp_path / 'staging'}"), ("trawl_s3", f"s3://{s3_bucket}/demo")):
        monkeypatch.setenv("TRAWL_DB_SCHEMA", schema)
        results[schema] = await pipeline(demo, sources=["products", "items"], staging=staging)

    s3 = results["trawl_s3"]
    assert s3["staging"] == f"s3://{s3_bucket}/demo"
    assert {c["source"]: (c["status"], c["records"]) for c in s3["crawl"]} == {
        "products": ("complete", PRODUCT_COUNT),
        "items": ("complete", ITEM_COUNT),
    }
    assert s3["load"]["products"]["inserted"] == PRODUCT_COUNT
    staged = {
        r[0]
        for r in await db.fetch(
            "SELECT DISTINCT d.staged_object FROM trawl_s3.products t JOIN trawl_s3._loads d ON d.load_id = t._load_id"
        )
    }
    assert staged and all(o.startswith(f"s3://{s3_bucket}/demo/raw/source=products/") for o in staged)
    for table in ("products", "items"):
        local_rows = await _table(db, "trawl", table)
        assert len(local_rows) == (PRODUCT_COUNT if table == "products" else ITEM_COUNT)
        assert await _table(db, "trawl_s3", table) == local_rows
    outcomes = "SELECT source, url, outcome, http_status FROM {}._outcomes ORDER BY source, url"
    assert [tuple(r) for r in await db.fetch(outcomes.format("trawl_s3"))] == [
        tuple(r) for r in await db.fetch(outcomes.format("trawl"))
    ]
    spool = tmp_path / "spool" / s3_bucket
    assert await asyncio.to_thread(lambda: not spool.exists() or not any(spool.rglob("*.gz")))


async def _load_everything(stager: Stager, database_url: str, schema: str = "trawl") -> list[PartLoad]:
    pool = await connect_pool(database_url, max_size=2)
    try:
        loader = Loader(pool, stager, schema)
        await loader.setup()
        done = []
        for kind in ("outcomes", "raw"):
            for m in await stager.manifests(kind):  # type: ignore[arg-type]
                fields = await loader.prepare(m)
                for part in m.parts:
                    done.append(await loader.load_part(m, part, fields, ahead=None))
                await loader.finish(m)
        return done
    finally:
        await pool.close()


@pytest.mark.slow
async def test_a_crawl_survives_s3_going_away_and_loads_every_row(
    demo_site: DemoSite, s3_bucket: str, s3_proxy: TcpProxy, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = Settings(
        staging=f"s3://{s3_bucket}/lake",
        allowed_networks=["127.0.0.0/8"],
        part_max_records=25,
        s3_endpoint_url=s3_proxy.url,
        s3_addressing_style="path",
        s3_spool_dir=tmp_path / "spool",
        s3_max_attempts=2,
        s3_connect_timeout=1,
        s3_backoff_base=0.05,
        s3_backoff_max=0.3,
        s3_commit_timeout=60,
    )
    [source] = select_sources(
        await asyncio.to_thread(load_sources, REPO / "examples" / "demo.yaml", env={"TRAWL_DEMO_URL": demo_site.url}),
        ["products"],
    )
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_proxy.target_port}", region_name="us-east-1")
    most_spooled = 0

    def parts_in_s3() -> int:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="lake/raw/")
        return sum(1 for o in listed.get("Contents", []) if o["Key"].endswith(".jsonl.gz"))

    async def outage(stager: S3Stager) -> None:
        nonlocal most_spooled
        for _ in range(10_000):  # S3 stops partway through the crawl …
            if await asyncio.to_thread(parts_in_s3) >= 2:
                break
            await asyncio.sleep(0.01)
        s3_proxy.cut()
        for _ in range(3000):  # … the crawl goes on, its parts waiting in the spool …
            most_spooled = max(most_spooled, stager.spooled)
            if not stager.healthy and most_spooled >= 3:
                break
            await asyncio.sleep(0.01)
        s3_proxy.restore()  # … and S3 comes back before the end

    async with (
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        Fetcher(settings) as fetcher,
    ):
        assert isinstance(stager, S3Stager)
        chaos = asyncio.create_task(outage(stager))
        result = await crawl_source(
            source, run_id="20260314T120000Z-fault1", settings=settings, fetcher=fetcher, stager=stager
        )
        await chaos
        [manifest] = await stager.manifests()
        loads = await _load_everything(stager, database_url)

    assert result.status == "complete" and result.stats["records"] == PRODUCT_COUNT
    assert most_spooled >= 3
    assert len(manifest.parts) == -(-PRODUCT_COUNT // 25) == parts_in_s3()
    assert sum(p.rows for p in manifest.parts) == PRODUCT_COUNT
    assert sum(p.inserted for p in loads if p.kind == "raw") == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.products") == PRODUCT_COUNT
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_a_tampered_part_fails_the_load_and_loads_nothing_from_it(
    s3_bucket: str, moto_endpoint: str, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = Settings(
        staging=f"s3://{s3_bucket}/lake",
        part_max_records=4,
        s3_endpoint_url=moto_endpoint,
        s3_addressing_style="path",
        s3_spool_dir=tmp_path / "spool",
    )
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        stage = stager.open_source("items", "20260314T120000Z-tamper", datetime(2026, 3, 14, 12, 0, tzinfo=UTC))
        for i in range(10):
            await stage.records.write(
                {
                    "source": "items",
                    "key": str(i),
                    "url": f"https://example.test/{i}",
                    "fetched_at": "2026-03-14T12:00:00+00:00",
                    "run_id": "20260314T120000Z-tamper",
                    "content_hash": f"h{i}",
                    "data": {"id": i},
                }
            )
        _, raw = await stage.commit(
            status="complete", schema={"key": ["id"], "fields": {"id": {"type": "int"}}}, stats={}
        )
        bad = raw.parts[1]
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        key = bad.uri.removeprefix(f"s3://{s3_bucket}/")
        body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body[:-9] + bytes(9))
        with pytest.raises(StagingError, match=f"{bad.uri}: sha256 .* does not match the manifest"):
            await _load_everything(stager, database_url)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM trawl._lineage l JOIN trawl._loads d USING (load_id) WHERE d.staged_object = $1",
            bad.uri,
        )
        == 0
    )
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 4  # the first part only
    assert await db.fetchval("SELECT count(*) FROM trawl._loads WHERE staged_object = $1", bad.uri) == 0
