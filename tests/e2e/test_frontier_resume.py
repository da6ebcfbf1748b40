"""A crawl with the durable frontier killed with SIGKILL and resumed: the table equals an uninterrupted run's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml

from sinks.stage import LocalStager
from tests.helpers.tree import TreeSite
from trawl.archive import archived_pages, read_member

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAWL = str(Path(sys.executable).parent / "trawl")
PAGES = 5000


def _sources(path: Path, site: TreeSite) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {
                        "name": "tree",
                        "kind": "html",
                        "frontier": "postgres",
                        "start_urls": [site.url(0)],
                        "follow": {"allow": [r"/p/\d+$"], "max_depth": 100, "same_host": False},
                        "key": "n",
                        "fields": {"n": {"selector": "h1.n", "type": "int", "required": True}},
                        "politeness": {"concurrency": 4},
                    }
                ]
            }
        )
    )
    return path


def _env(tmp_path: Path, database_url: str, staging: Path, schema: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))}
    return {
        **keep,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TRAWL_STAGING": f"file://{staging}",
        "TRAWL_DATABASE_URL": database_url,
        "TRAWL_DB_SCHEMA": schema,
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        "TRAWL_FRONTIER_CHECKPOINT_SECONDS": "0.5",
        "TRAWL_LOG_FORMAT": "json",
    }


async def _trawl(*args: str, env: dict[str, str]) -> tuple[int, str]:
    log = Path(env["PREFECT_HOME"]).parent / f"trawl-{args[0]}.log"
    with open(log, "wb") as out:  # noqa: ASYNC230 - a log file for the subprocess, opened once
        proc = await asyncio.create_subprocess_exec(TRAWL, *args, env=env, cwd=REPO, stdout=out, stderr=out)
        try:
            await asyncio.wait_for(proc.wait(), 240)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"trawl {' '.join(args)} did not finish: {log.read_text()[-3000:]}") from None
    return proc.returncode or 0, await asyncio.to_thread(log.read_text)


async def _rows(db: asyncpg.Connection, schema: str) -> list[tuple[str, int, str]]:
    return [tuple(r) for r in await db.fetch(f'SELECT _key, n, _url FROM "{schema}".tree ORDER BY _key')]


async def test_kill_9_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    async with TreeSite(["127.0.0.21", "127.0.0.22", "127.0.0.23"], pages=PAGES, delay=0.002) as site:
        sources = await asyncio.to_thread(_sources, tmp_path / "tree.yaml", site)

        # The reference: the same crawl, uninterrupted, into its own schema and staging.
        ref_env = _env(tmp_path, database_url, tmp_path / "ref-staging", "reference")
        code, out = await _trawl("run", str(sources), env=ref_env)
        assert code == 0, out[-3000:]
        reference = await _rows(db, "reference")
        assert len(reference) == PAGES
        site.requests.clear()

        env = _env(tmp_path, database_url, tmp_path / "staging", "trawl")
        proc = await asyncio.create_subprocess_exec(
            TRAWL,
            "crawl",
            str(sources),
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        while len(site.requests) < PAGES * 2 // 5:  # partway
            assert proc.returncode is None, "the crawl ended before it could be killed"
            await asyncio.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        await asyncio.sleep(0.3)  # requests already on the wire reach the server
        before = Counter(site.requests)
        run_id = await db.fetchval("SELECT run_id FROM trawl._frontier_runs WHERE source = 'tree'")
        states = Counter(
            {
                r["state"]: r["n"]
                for r in await db.fetch("SELECT state, count(*) AS n FROM trawl._frontier GROUP BY state")
            }
        )
        done_at_kill = {
            r["url"].removeprefix("http://")
            for r in await db.fetch("SELECT url FROM trawl._frontier WHERE state = 'done'")
        }
        assert states["done"] > 0 and states["done"] < PAGES, states
        assert await asyncio.to_thread((tmp_path / "staging").exists)

        code, out = await _trawl("crawl", str(sources), "--resume", run_id, env=env)
        assert code == 0, out[-3000:]
        assert f"run {run_id}" in out
        code, out = await _trawl("load", "--run-id", run_id, env=env)
        assert code == 0, out[-3000:]

        # The archive committed with the parts: every archive file the manifest lists is whole (its sha256, every
        # gzip member complete), and every row's response is in it, the same page the row came from.
        stager = await asyncio.to_thread(LocalStager, tmp_path / "staging")
        [manifest] = [m for m in await stager.manifests("raw") if m.run_id == run_id]
        archives = {p.uri: await stager.read_bytes(p.uri) for p in manifest.archive}
        assert archives and [m.parts for m in await stager.manifests("archive") if m.run_id == run_id] == [
            manifest.archive
        ]
        pages_archived = 0
        for part in manifest.archive:
            data = archives[part.uri]
            assert hashlib.sha256(data).hexdigest() == part.sha256
            pages_archived += sum(1 for _ in archived_pages(part.uri, data))  # raises on a truncated member
        assert pages_archived >= PAGES
        for part in manifest.parts:
            async for line in stager.read_part(part):
                row = orjson.loads(line)
                ptr = row["archive"]
                page = read_member(archives[ptr["warc"]], ptr["offset"], ptr["warc"])
                assert page.url == row["url"] and f'<h1 class="n">{row["data"]["n"]}</h1>'.encode() in page.body

    # The table equals the uninterrupted run's: same keys, same values, no duplicates.
    assert await _rows(db, "trawl") == [(k, n, u) for k, n, u in reference]
    # Every page fetched; none that was done at the kill fetched again; the others at most once more.
    after = Counter(site.requests)
    pages = {site.page_key(n) for n in range(PAGES)}
    assert set(after) == pages
    twice = {p for p, c in after.items() if c > 1}
    assert not twice & done_at_kill
    assert twice <= set(before) - done_at_kill
    assert max(after.values()) <= 2
    refetched = len(twice)
    assert refetched < len(before)  # a checkpoint's worth, not the whole first attempt
    print(f"fetched before the kill: {len(before)}, done at the kill: {len(done_at_kill)}, fetched again: {refetched}")
