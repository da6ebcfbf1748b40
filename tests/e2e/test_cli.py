"""`trawl` as users run it: subprocesses, the demo site, a real PostgreSQL, Prefect in ephemeral mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from trawl.demo.account import ORDER_COUNT
from trawl.demo.site import ITEM_COUNT, JS_DEMO_COUNT, PAGE_COUNT, PRODUCT_COUNT, DemoSiteThread

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TRAWL = [str(Path(sys.executable).parent / "trawl")]  # the installed console script


@pytest.fixture
def site() -> Iterator[DemoSiteThread]:
    with DemoSiteThread() as s:
        yield s


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for the CLI: its own Prefect home, staging in tmp, JSON logs."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))}
    return {
        **keep,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TRAWL_STAGING": f"file://{tmp_path / 'staging'}",
        "TRAWL_LOG_FORMAT": "json",
    }


def trawl(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAWL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
async def test_run_load_and_rerun_demo(
    site: DemoSiteThread, env: dict[str, str], database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = {**env, "TRAWL_DEMO_URL": site.url, "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]'}

    first = await asyncio.to_thread(trawl, "run", "examples/demo.yaml", "--database-url", database_url, env=env)
    assert first.returncode == 0, first.stderr + first.stdout[-3000:]
    assert "products" in first.stdout and "complete" in first.stdout
    # Logs: JSON lines (the summary table follows them), source lines carry run and source context.
    logs = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    finished = [r for r in logs if r["event"] == "source finished"]
    assert sorted(r["source"] for r in finished) == ["items", "js_products", "orders", "products"]
    assert all(r["run_id"] and r["flow_run_id"] for r in finished)
    assert any(r["logger"] == "prefect.flow_runs" for r in logs)

    # Ground truth: every product page and every API item, exactly once.
    assert await db.fetchval("SELECT count(*) FROM trawl.products") == PRODUCT_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 0
    sample = await db.fetchrow(
        "SELECT name, price, rating FROM trawl.products WHERE _url = $1", f"{site.url}/products/5"
    )
    assert sample is not None and sample["price"] == 4070.09

    # Lineage: every row points at a staged object that exists.
    objects = [
        r[0]
        for r in await db.fetch(
            "SELECT DISTINCT d.staged_object FROM trawl._loads d WHERE d.load_id IN"
            " (SELECT _load_id FROM trawl.products UNION SELECT _load_id FROM trawl.items)"
        )
    ]
    assert objects
    for uri in objects:
        assert uri.startswith("file://") and await asyncio.to_thread(Path(uri.removeprefix("file://")).is_file), uri

    # Every fetched URL has exactly one outcome row, and the site saw each page once.
    outcomes = await db.fetch("SELECT url, outcome FROM trawl._outcomes")
    assert len(outcomes) == len({r["url"] for r in outcomes})
    product_urls = {r["url"] for r in outcomes if r["url"].split("/", 3)[3].startswith("products/")}
    assert len(product_urls) == PRODUCT_COUNT
    assert sum(1 for r in outcomes if "/catalogue/page/" in r["url"]) == PAGE_COUNT
    assert {r["outcome"] for r in outcomes} == {"fetched"}
    assert max(n for path, n in site.requests.items() if path.startswith("/products/")) == 1

    # `trawl load` again: the ledger has every part, nothing changes.
    before = await db.fetch("SELECT _key, _last_seen_at FROM trawl_views.items ORDER BY _key")
    again = await asyncio.to_thread(trawl, "load", "--database-url", database_url, env=env)
    assert again.returncode == 0, again.stderr
    assert await db.fetch("SELECT _key, _last_seen_at FROM trawl_views.items ORDER BY _key") == before
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 8  # records and outcomes of 4 sources
    assert await db.fetchval("SELECT sum(inserted + updated) FROM trawl._loads WHERE kind = 'raw'") == (
        PRODUCT_COUNT + ITEM_COUNT + JS_DEMO_COUNT + ORDER_COUNT
    )

    # A second run: same content, so only _last_seen_at moves. Product pages are asked for conditionally
    # (their ETags from the first run) and answer 304; the API items are fetched and found unchanged.
    snapshot = (
        "SELECT t._key, t.name, t.price, t._content_hash, d.run_id AS _run_id, t._first_seen_at, v._last_seen_at"
        " FROM trawl.products t JOIN trawl._loads d ON d.load_id = t._load_id"
        " JOIN trawl_views.products v ON v._key = t._key"
    )
    old = {r["_key"]: r for r in await db.fetch(snapshot)}
    first_run = old[next(iter(old))]["_run_id"]
    second = await asyncio.to_thread(trawl, "run", "examples/demo.yaml", "--database-url", database_url, env=env)
    assert second.returncode == 0, second.stderr
    new = {r["_key"]: r for r in await db.fetch(snapshot)}
    assert new.keys() == old.keys()
    for key, row in new.items():
        was = old[key]
        assert row["_last_seen_at"] > was["_last_seen_at"]
        assert (row["name"], row["price"], row["_content_hash"], row["_run_id"], row["_first_seen_at"]) == (
            was["name"],
            was["price"],
            was["_content_hash"],
            was["_run_id"],
            was["_first_seen_at"],
        )
    outcomes = await db.fetch(
        "SELECT outcome, count(*) AS n FROM trawl._outcomes WHERE source = 'products' AND run_id <> $1 GROUP BY 1",
        first_run,
    )
    assert {r["outcome"]: r["n"] for r in outcomes} == {"not_modified": PRODUCT_COUNT, "fetched": PAGE_COUNT}
    counts = await db.fetchrow(
        "SELECT sum(inserted) AS i, sum(updated) AS u, sum(unchanged) AS n FROM trawl._loads "
        "WHERE kind = 'raw' AND run_id <> $1",
        first_run,
    )
    assert counts is not None and (counts["i"], counts["u"], counts["n"]) == (
        0,
        0,
        ITEM_COUNT + JS_DEMO_COUNT + ORDER_COUNT,
    )


@pytest.mark.slow
def test_demo_command(env: dict[str, str], database_url: str, tmp_path: Path) -> None:
    staging = tmp_path / "demo-staging"
    done = trawl("demo", "--database-url", database_url, "--staging", f"file://{staging}", env=env)
    assert done.returncode == 0, done.stderr + done.stdout[-3000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("source "))
    table = {line.split()[0]: line.split() for line in lines[header + 1 : header + 3]}
    assert table["products"][1:4] == ["complete", str(PRODUCT_COUNT + PAGE_COUNT), str(PRODUCT_COUNT)]
    assert table["items"][3] == str(ITEM_COUNT)
    assert f"staged under file://{staging}" in done.stdout
    assert "loaded into" in done.stdout and "trawl.products" in done.stdout
    assert list(staging.glob("raw/source=products/dt=*/run=*/_manifest.json"))


@pytest.mark.slow
def test_python_m_flows_pipeline_runs_the_same_flow_without_a_server(
    site: DemoSiteThread, env: dict[str, str], database_url: str, prefect_api: str
) -> None:
    run_env = {**env, "TRAWL_DATABASE_URL": database_url, "TRAWL_DEMO_URL": site.url, "PREFECT_API_URL": prefect_api}
    run_env["TRAWL_ALLOWED_NETWORKS"] = '["127.0.0.0/8"]'
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "examples/demo.yaml", "--source", "items"],
        env=run_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{\n") :])
    assert [s["source"] for s in result["crawl"]] == ["items"]
    assert result["load"]["items"]["inserted"] == ITEM_COUNT


def test_malformed_sources_file_exits_2_naming_every_problem(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources:\n"
        "  - name: shop\n    kind: html\n    urls: [ftp://x]\n    fields: {price: {selector: p, type: money}}\n"
        "  - name: feed\n    kind: api\n    url: https://api.example.com\n    pagination: {type: cursor}\n"
    )
    done = trawl("run", str(bad), env=env)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    assert f"{bad}: sources[0] (shop): urls.0: not an http(s) URL: 'ftp://x'" in done.stderr
    assert any(line.startswith(f"trawl: error: {bad}: sources[0] (shop): fields.price.type:") for line in errors)
    assert any(f"{bad}: sources[1] (feed): pagination" in line and "cursor_path" in line for line in errors)
    assert "Traceback" not in done.stderr
    checked = trawl("check", str(bad), env=env)
    assert checked.returncode == 2 and checked.stderr == done.stderr


def test_run_exits_1_when_a_source_fails(
    site: DemoSiteThread, env: dict[str, str], database_url: str, prefect_api: str, tmp_path: Path
) -> None:
    sources = tmp_path / "sources.yaml"
    sources.write_text(
        "sources:\n"
        f"  - {{name: items, kind: api, url: '{site.url}/api/items', items_path: items, key: id,\n"
        "      pagination: {type: cursor, cursor_path: next_cursor}}\n"
        f"  - {{name: gone, kind: api, url: '{site.url}/api/gone', key: id}}\n"
    )
    env = {**env, "PREFECT_API_URL": prefect_api, "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]'}
    done = trawl("run", str(sources), "--database-url", database_url, env=env)
    assert done.returncode == 1, done.stderr + done.stdout[-3000:]
    summary = {
        line.split()[0]: line.split()[1]
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["items"], ["gone"])
    }
    assert summary == {"items": "complete", "gone": "failed"}
    assert f"gone: page {site.url}/api/gone failed" in done.stdout


def test_check_accepts_the_demo_file(env: dict[str, str]) -> None:
    done = trawl("check", "examples/demo.yaml", env=env)
    assert done.returncode == 0, done.stderr
    assert "products (html)" in done.stdout and "items (api)" in done.stdout


def test_unreachable_database_is_one_line(env: dict[str, str]) -> None:
    dsn = "postgresql://trawl:s3cret@127.0.0.1:1/nowhere"
    done = trawl("load", "--database-url", dsn, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("trawl: error: cannot connect to PostgreSQL at postgresql://***@127.0.0.1:1/nowhere")
    assert "s3cret" not in done.stderr + done.stdout


def _with_password(dsn: str, password: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


_RUN_SCOPED = ("trawl.connectors", "trawl.crawler", "trawl.fetch", "flows.crawl")


def test_every_log_line_is_json_with_context_and_no_secret(
    site: DemoSiteThread, env: dict[str, str], database_url: str, prefect_api: str, tmp_path: Path
) -> None:
    """Secrets planted in a header, a cookie, a query string and the DSN never reach a log line."""
    secrets = ["s3cr3t-HEADER", "s3cr3t-COOKIE", "s3cr3t-QUERY", "s3cr3t-DSN"]
    sources = tmp_path / "sources.yaml"
    sources.write_text(
        "sources:\n"
        f"  - {{name: items, kind: api, url: '{site.url}/api/items', items_path: items, key: id,\n"
        "      pagination: {type: cursor, cursor_path: next_cursor}}\n"
        f"  - name: leaky\n"
        f"    kind: api\n"
        f"    url: '{site.url}/api/gone?token=s3cr3t-QUERY&page=1'\n"
        "    key: id\n"
        "    headers: {Authorization: 'Bearer s3cr3t-HEADER', Cookie: 'session=s3cr3t-COOKIE'}\n"
    )
    env = {**env, "PREFECT_API_URL": prefect_api, "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]'}
    done = trawl("run", str(sources), "--database-url", _with_password(database_url, "s3cr3t-DSN"), env=env)

    assert done.returncode == 1, done.stderr + done.stdout[-3000:]  # leaky's URL answers 404
    for secret in secrets:
        assert secret not in done.stdout + done.stderr, f"{secret} leaked into the output"
    lines = done.stdout.splitlines()
    logs_end = next(i for i, line in enumerate(lines) if line.startswith("source "))  # the summary table
    records = []
    for line in lines[:logs_end]:
        if line.strip():
            records.append(json.loads(line))  # every log line is one JSON object
    assert records
    for r in records:
        assert {"timestamp", "level", "logger", "event"} <= set(r), r
        if r["logger"].startswith(_RUN_SCOPED):
            assert r.get("run_id"), r
    per_url = [r for r in records if r["event"] in ("url failed", "source finished", "source started")]
    assert per_url and all(r.get("source") in ("items", "leaky") for r in per_url)
    failed = next(r for r in records if r["event"] == "url failed")
    assert failed["url"].endswith("/api/gone?token=***&page=1")
