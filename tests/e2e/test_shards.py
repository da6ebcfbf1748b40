"""A source with `shards: 3`: the crawl flow crawls as shard 0, two shard runs on two Prefect process workers, 6 loopback
hosts leased from one frontier."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from tests.helpers.net import free_port
from tests.helpers.tree import TreeSite
from trawl.frontier.postgres import shard_of

if TYPE_CHECKING:
    from conftest import PrefectStack  # tests/e2e/conftest.py

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAWL = str(Path(sys.executable).parent / "trawl")
HOSTS = [f"127.0.0.{i}" for i in range(41, 47)]
PAGES = 3000
CAP = 2  # per-host concurrency


@pytest.fixture(scope="module")
def workers(prefect_stack: PrefectStack) -> PrefectStack:
    """Two process workers that take one flow run at a time each."""
    env = {"TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]', "TRAWL_FRONTIER_CHECKPOINT_SECONDS": "0.5"}
    for name in ("shard-a", "shard-b"):
        prefect_stack.start_worker(name, env, f"--limit 1 --name {name}")
    return prefect_stack


def _colliding_port() -> int:
    """A port at which the old host hash would have put 4 of the 6 hosts in one of 3 shards: leases do not care."""
    while True:
        port = free_port(HOSTS[0])
        if max(sum(shard_of(f"{h}:{port}", 3) == k for h in HOSTS) for k in range(3)) >= 4:
            return port


async def test_two_workers_crawl_two_shards_politely_and_completely(workers: PrefectStack, tmp_path: Path) -> None:
    stack = workers
    async with TreeSite(HOSTS, pages=PAGES, delay=0.01, port=_colliding_port()) as site:
        sources = tmp_path / "tree.yaml"
        await asyncio.to_thread(
            sources.write_text,
            yaml.safe_dump(
                {
                    "sources": [
                        {
                            "name": "tree",
                            "kind": "html",
                            "shards": 3,
                            "start_urls": [site.url(0)],
                            "follow": {"allow": [r"/p/\d+$"], "max_depth": 100, "same_host": False},
                            "key": "n",
                            "fields": {
                                "n": {"selector": "h1.n", "type": "int", "required": True},
                                "host": {"selector": "p.host"},
                            },
                            "politeness": {"concurrency": CAP},
                            "robots": False,
                        }
                    ]
                }
            ),
        )
        env = {
            **stack.env,
            "TRAWL_DATABASE_URL": stack.database_url,
            "TRAWL_STAGING": f"file://{stack.staging}",
            "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "TRAWL_LOG_FORMAT": "json",
        }
        log = tmp_path / "run.log"
        with open(log, "wb") as out:  # noqa: ASYNC230 - the subprocess's log, opened once
            proc = await asyncio.create_subprocess_exec(
                TRAWL, "run", str(sources), env=env, cwd=REPO, stdout=out, stderr=out
            )
            try:
                await asyncio.wait_for(proc.wait(), 300)
            except TimeoutError:
                proc.kill()
                raise AssertionError(f"trawl run did not finish: {log.read_text()[-3000:]}") from None
        assert proc.returncode == 0, log.read_text()[-3000:]

    # Per-host politeness held across the two processes: no host ever saw more than CAP requests at once.
    assert set(site.max_inflight) == {f"{h}:{site.port}" for h in HOSTS}
    assert max(site.max_inflight.values()) <= CAP, site.max_inflight
    # Each page was fetched once, and the table is complete.
    assert len(site.requests) == PAGES == len(set(site.requests))
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("SELECT count(DISTINCT _key) FROM trawl.tree") == PAGES
        parts = await conn.fetch("SELECT DISTINCT shard FROM trawl._frontier_parts WHERE source = 'tree'")
        assert {r["shard"] for r in parts} == {0, 1, 2}
    finally:
        await conn.close()
    # Both workers took a shard.
    async with PrefectClient(stack.api) as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="tree-")))
    assert len(runs) >= 2 and all(r.state is not None and r.state.is_completed() for r in runs)
    logs = {name: await asyncio.to_thread(stack.log, name) for name in ("shard-a", "shard-b")}
    took = {name: [r.name for r in runs if str(r.id) in logs[name]] for name in ("shard-a", "shard-b")}
    assert all(took.values()), took
    print(f"shard runs by worker: {took}; max in flight per host: {dict(site.max_inflight)}")
