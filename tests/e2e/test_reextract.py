"""Fixing a source after the fact: crawl with a wrong selector, fix it, `trawl reextract`, check rows and lineage.

The CLI as users run it (subprocesses, Prefect through the test harness's server),
the demo site counting every request, a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from trawl.archive import read_member
from trawl.demo.site import DemoSiteThread, product
from trawl.extract import extract_items, parse_html

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TRAWL = str(Path(sys.executable).parent / "trawl")
PAGES = 2  # catalogue pages crawled: 40 products

WRONG = {"selector": "span.stock", "regex": "(In) stock"}  # misses "Out of stock"
FIXED = {"selector": "span.stock", "regex": "(In|Out of) stock"}


def _sources(path: Path, url: str, stock: dict[str, str]) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "products",
                        "kind": "html",
                        "start_urls": [f"{url}/catalogue/page/1"],
                        "follow": {
                            "allow": [rf"/catalogue/page/[1-{PAGES}]$", r"/products/([1-9]|[1-3]\d|40)$"],
                            "max_depth": 3,
                        },
                        "record_urls": r"/products/\d+$",
                        "key": "sku",
                        "fields": {
                            "sku": {"selector": "span.sku", "required": True},
                            "name": {"selector": "h1.name", "required": True},
                            "price": {"selector": "p.price", "attr": "data-amount", "type": "float"},
                            "stock": stock,
                        },
                    }
                ]
            }
        )
    )


@pytest.fixture
def site() -> Iterator[DemoSiteThread]:
    with DemoSiteThread() as s:
        yield s


def _env(tmp_path: Path, database_url: str, prefect_api: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))}
    return {
        **keep,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "TRAWL_STAGING": f"file://{tmp_path / 'staging'}",
        "TRAWL_DATABASE_URL": database_url,
        "TRAWL_LOG_FORMAT": "json",
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
    }


def trawl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRAWL, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)


def _run_id(out: str) -> str:
    m = re.search(r"^run ([A-Za-z0-9][A-Za-z0-9_.-]*)", out, re.MULTILINE)
    assert m, out[-2000:]
    return m.group(1)


@pytest.mark.slow
async def test_wrong_selector_fixed_by_reextract(
    site: DemoSiteThread, database_url: str, db: asyncpg.Connection, prefect_api: str, tmp_path: Path
) -> None:
    env = _env(tmp_path, database_url, prefect_api)
    sources = tmp_path / "sources.yaml"
    await asyncio.to_thread(_sources, sources, site.url, WRONG)
    crawled = await asyncio.to_thread(trawl, "run", str(sources), env=env)
    assert crawled.returncode == 0, crawled.stderr + crawled.stdout[-3000:]
    first_run = _run_id(crawled.stdout)
    before = {r["_key"]: dict(r) for r in await db.fetch("SELECT _key, stock, _url, _load_id FROM trawl.products")}
    assert len(before) == 20 * PAGES
    assert {r["stock"] for r in before.values()} == {"In", None}  # the wrong rule: out-of-stock rows are empty

    # Fix the rule, re-extract: no request reaches the site (and the guard refuses every network anyway).
    await asyncio.to_thread(_sources, sources, site.url, FIXED)
    served = sum(site.requests.values())
    offline = {**env, "TRAWL_ALLOWED_NETWORKS": "[]"}
    redone = await asyncio.to_thread(trawl, "reextract", first_run, "--sources-file", str(sources), env=offline)
    assert redone.returncode == 0, redone.stderr + redone.stdout[-3000:]
    assert sum(site.requests.values()) == served, "the re-extraction made requests"
    second_run = _run_id(redone.stdout)
    assert second_run != first_run and f"re-extracted from {first_run}" in redone.stdout

    after = {r["_key"]: dict(r) for r in await db.fetch("SELECT _key, stock, _url, _load_id FROM trawl.products")}
    assert after.keys() == before.keys()
    changed = 0
    for key, row in after.items():
        pid = int(row["_url"].rsplit("/", 1)[1])
        truth = "In" if product(pid).in_stock else "Out of"
        assert row["stock"] == truth, key  # the corrected column is right for every row
        if before[key]["stock"] == truth:
            assert row["_load_id"] == before[key]["_load_id"], key  # unchanged rows: nothing written
        else:
            assert row["_load_id"] != before[key]["_load_id"]
            changed += 1
    assert 0 < changed < len(after)
    new_load = await db.fetchval(
        "SELECT DISTINCT run_id FROM trawl._loads WHERE load_id = ANY($1::bigint[])",
        [r["_load_id"] for k, r in after.items() if r["_load_id"] != before[k]["_load_id"]],
    )
    assert new_load == second_run

    # Lineage points each row at a WARC record whose body, extracted again, gives the row's values.
    for key in sorted(after)[:: max(1, len(after) // 8)] + [k for k in after if before[k]["stock"] is None][:3]:
        shown = await asyncio.to_thread(trawl, "lineage", "products", key, env=env)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        header = lines[0].split()
        last = lines[-1].split()
        row = dict(zip(header, last, strict=True))
        assert row["warc"].endswith(".warc.gz") and f"run={first_run}" in row["warc"]
        data = await asyncio.to_thread(Path(row["warc"].removeprefix("file://")).read_bytes)
        page = read_member(data, int(row["offset"]), row["warc"])
        [item] = extract_items(parse_html(page.body.decode()), None, _fields(FIXED))
        assert item["sku"] == key and item["stock"] == after[key]["stock"]
        # `trawl page` writes that response's body.
        body = await asyncio.to_thread(trawl, "page", "products", key, env=env)
        assert body.returncode == 0 and body.stdout.encode() == page.body
    fixed = next(k for k in after if before[k]["stock"] is None)
    shown = await asyncio.to_thread(trawl, "lineage", "products", fixed, env=env)
    entries = [
        dict(zip(shown.stdout.splitlines()[0].split(), ln.split(), strict=True)) for ln in shown.stdout.splitlines()[1:]
    ]
    assert [e["change"] for e in entries] == ["inserted", "updated"]
    assert [e["run_id"] for e in entries] == [first_run, second_run]
    assert entries[0]["warc"] == entries[1]["warc"] and entries[0]["offset"] == entries[1]["offset"]
    v1 = await asyncio.to_thread(trawl, "page", "products", fixed, "--version", "1", env=env)
    assert v1.returncode == 0 and b'class="sku"' in v1.stdout.encode()
    bad = await asyncio.to_thread(trawl, "page", "products", fixed, "--version", "9", env=env)
    assert bad.returncode == 2 and "versions 1 to 2" in bad.stderr


def _fields(stock: dict[str, str]) -> dict[str, object]:
    from trawl.config import HtmlField

    return {
        "sku": HtmlField.model_validate({"selector": "span.sku"}),
        "stock": HtmlField.model_validate(stock),
    }


@pytest.mark.slow
def test_reextract_names_a_missing_run(
    site: DemoSiteThread, database_url: str, prefect_api: str, tmp_path: Path
) -> None:
    env = _env(tmp_path, database_url, prefect_api)
    sources = tmp_path / "sources.yaml"
    _sources(sources, site.url, FIXED)
    done = trawl("reextract", "20990101T000000Z-nope", "--sources-file", str(sources), env=env)
    assert done.returncode == 1 and "no committed run 20990101T000000Z-nope" in done.stderr, done.stderr
