"""`trawl` with S3 staging as users run it: S3 down at the end of a crawl, then resumed, listed and loaded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import boto3
import pytest

from trawl.demo.site import ITEM_COUNT, DemoSiteThread

from ..conftest import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAWL = [str(Path(sys.executable).parent / "trawl")]


def trawl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRAWL, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)


@pytest.fixture
def site() -> Iterator[DemoSiteThread]:
    with DemoSiteThread() as s:
        yield s


async def test_s3_down_at_the_end_fails_clearly_then_the_next_run_and_resume_finish_it(
    site: DemoSiteThread,
    s3_bucket: str,
    s3_proxy: TcpProxy,
    prefect_api: str,
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    staging = f"s3://{s3_bucket}/cli"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))},
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "TRAWL_LOG_FORMAT": "json",
        "TRAWL_DEMO_URL": site.url,
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        "TRAWL_PART_MAX_RECORDS": "1000",
        "TRAWL_S3_ENDPOINT_URL": s3_proxy.url,
        "TRAWL_S3_ADDRESSING_STYLE": "path",
        "TRAWL_S3_SPOOL_DIR": str(tmp_path / "spool"),
        "TRAWL_S3_MAX_ATTEMPTS": "2",
        "TRAWL_S3_CONNECT_TIMEOUT": "1",
        "TRAWL_S3_BACKOFF_BASE": "0.05",
        "TRAWL_S3_BACKOFF_MAX": "0.2",
        "TRAWL_S3_COMMIT_TIMEOUT": "2",
    }
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_proxy.target_port}", region_name="us-east-1")

    s3_proxy.cut()
    failed = await asyncio.to_thread(
        trawl, "crawl", "examples/demo.yaml", "--source", "items", "--staging", staging, env=env
    )
    assert failed.returncode == 1, failed.stderr + failed.stdout[-3000:]
    [summary] = [line for line in failed.stdout.splitlines() if line.startswith("items:")]
    run_id = next(line.split()[1].rstrip(":") for line in failed.stdout.splitlines() if line.startswith("run "))
    assert "still unavailable" in summary and f"trawl stage resume {run_id}" in summary
    assert "4 part(s) wait in the spool" in summary  # 3 record parts, 1 outcomes part
    spooled = await asyncio.to_thread(lambda: sorted(p.name for p in (tmp_path / "spool").rglob("*") if p.is_file()))
    assert spooled.count("_manifest.json") == 2 and "part-00003.jsonl.gz" in spooled  # 2,500 items: 3 parts
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket) or not any(
        o["Key"].endswith("_manifest.json") for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    )

    s3_proxy.restore()
    listed = await asyncio.to_thread(trawl, "runs", "ls", "--staging", staging, env=env)
    assert listed.returncode == 0, listed.stderr
    [row] = [line.split() for line in listed.stdout.splitlines() if line.startswith(run_id)]
    assert row[1:4] == ["items", row[2], "incomplete"] and row[-1] == "3"

    # The next run finishes the spooled one before it crawls; then a resume has nothing left to do.
    again = await asyncio.to_thread(
        trawl, "crawl", "examples/demo.yaml", "--source", "items", "--staging", staging, env=env
    )
    assert again.returncode == 0, again.stderr + again.stdout[-3000:]
    assert "earlier run resumed" in again.stdout
    resumed = await asyncio.to_thread(trawl, "stage", "resume", run_id, "--staging", staging, env=env)
    assert resumed.returncode == 0 and "nothing to resume" in resumed.stdout
    listed = await asyncio.to_thread(trawl, "runs", "ls", "--staging", staging, env=env)
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[1], r[3], r[4], r[5], r[6]) for r in rows] == [("items", "committed", "complete", "3", "2500")] * 2
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    loaded = await asyncio.to_thread(trawl, "load", "--staging", staging, "--database-url", database_url, env=env)
    assert loaded.returncode == 0, loaded.stderr + loaded.stdout[-3000:]
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    assert await db.fetchval("SELECT count(DISTINCT run_id) FROM trawl._outcomes") == 2
    assert not await asyncio.to_thread(lambda: [p for p in (tmp_path / "spool").rglob("*") if p.is_file()])
