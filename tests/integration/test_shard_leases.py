"""Sharded crawls lease hosts, not hash them: every shard busy, extra shards gone at once, a vanished shard's hosts
taken over when their leases expire, per-host politeness held while hosts move. Real sites on 127.0.0.x, a real
PostgreSQL, shards as real crawls (in this process, or one in a child process killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from sinks.targets import open_stager
from tests.helpers.net import free_port
from tests.helpers.tree import TreeSite
from trawl.config import HtmlSource
from trawl.crawler import begin_sharded, commit_sharded, crawl_source, new_run_id, whole_frontier
from trawl.fetch import Fetcher
from trawl.frontier.postgres import shard_of
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
CAP = 2


def _colliding_port(hosts: list[str]) -> int:
    """A port at which the old host hash puts 3 of the 4 hosts in one shard of 2 (what hashing got wrong)."""
    while True:
        port = free_port(hosts[0])
        if sorted(sum(shard_of(f"{h}:{port}", 2) == k for h in hosts) for k in (0, 1)) == [1, 3]:
            return port


def _source(site: TreeSite, shards: int) -> HtmlSource:
    return HtmlSource.model_validate(
        {
            "name": "tree",
            "kind": "html",
            "shards": shards,
            "start_urls": [f"http://{h}:{site.port}/p/0" for h in site.hosts],
            "follow": {"allow": [r"/p/\d+$"], "max_depth": 100},
            "key": ["host", "n"],
            "fields": {"n": {"selector": "h1.n", "type": "int", "required": True}, "host": {"selector": "p.host"}},
            "politeness": {"concurrency": CAP},
            "robots": False,
        }
    )


@pytest.fixture
def sharded_settings(settings: Settings, database_url: str) -> Settings:
    return settings.model_copy(update={"database_url": SecretStr(database_url), "frontier_checkpoint_seconds": 0.2})


async def _begin(src: HtmlSource, run_id: str, settings: Settings) -> None:
    async with whole_frontier(src, run_id, settings) as whole:
        await begin_sharded(whole, src, resume=False)
        await whole.set_shards(list(range(src.shards)), "scheduled")


async def _shard(src: HtmlSource, run_id: str, settings: Settings, k: int) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    async with (
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        Fetcher(settings) as fetcher,
    ):
        res = await crawl_source(src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, shard=k)
    return res.as_dict(), time.monotonic() - started


async def _commit(src: HtmlSource, run_id: str, settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with (
        whole_frontier(src, run_id, settings) as whole,
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
    ):
        committed = await commit_sharded(whole, src, stager, flow_run_id=None, settings=settings)
        (m,) = await stager.manifests("raw")
        rows = [orjson.loads(line) for p in m.parts async for line in stager.read_part(p)]
    return committed.stats, rows


async def test_two_shards_share_colliding_hosts_evenly(sharded_settings: Settings) -> None:
    hosts = [f"127.0.0.{i}" for i in range(61, 65)]
    pages = 300
    async with TreeSite(hosts, pages=pages, delay=0.005, port=_colliding_port(hosts), own_tree=True) as site:
        src = _source(site, 2)
        run_id = new_run_id()
        await _begin(src, run_id, sharded_settings)
        results = await asyncio.gather(*(_shard(src, run_id, sharded_settings, k) for k in (0, 1)))
        stats, rows = await _commit(src, run_id, sharded_settings)
    total = 4 * pages
    shares = [r["pages"] / total for r, _ in results]
    assert all(0.35 <= s <= 0.65 for s in shares), shares  # the hash would have given 75% / 25%
    assert len(site.requests) == len(set(site.requests)) == total  # each page once
    assert max(site.max_inflight.values()) <= CAP, site.max_inflight
    assert len({(r["data"]["host"], r["data"]["n"]) for r in rows}) == total
    assert stats["pages"] == total and sorted(stats["per_shard"]) == ["0", "1"]
    assert [stats["per_shard"][k]["pages"] for k in ("0", "1")] == [r["pages"] for r, _ in results]


async def test_more_shards_than_hosts_end_promptly(sharded_settings: Settings) -> None:
    hosts = ["127.0.0.66", "127.0.0.67"]
    async with TreeSite(hosts, pages=200, delay=0.02, own_tree=True) as site:
        src = _source(site, 4)
        run_id = new_run_id()
        await _begin(src, run_id, sharded_settings)
        results = await asyncio.gather(*(_shard(src, run_id, sharded_settings, k) for k in range(4)))
        stats, _ = await _commit(src, run_id, sharded_settings)
    crawl_s = max(s for _, s in results)
    idle = [(k, s) for k, (r, s) in enumerate(results) if r["pages"] == 0 and k != 0]
    assert idle, results  # two hosts, four shards: at least one remote shard found no host
    assert all(s < min(2.0, crawl_s / 2) for _, s in idle), (idle, crawl_s)  # gone at once, not at the crawl's end
    assert all(r["status"] == "complete" for r, _ in results)
    assert stats["pages"] == 400 and len(site.requests) == len(set(site.requests)) == 400


async def test_vanished_shard_hosts_are_taken_over_when_leases_expire(sharded_settings: Settings) -> None:
    """A shard's process killed with SIGKILL (a lost machine: nobody reports it): its host and URL leases expire and
    the live shard takes the hosts, their learned state with them; every page ends up staged, the cap holds."""
    settings = sharded_settings.model_copy(update={"frontier_lease_seconds": 2.0})
    hosts = [f"127.0.0.{i}" for i in range(71, 75)]
    pages = 300
    async with TreeSite(hosts, pages=pages, delay=0.01, own_tree=True) as site:
        src = _source(site, 2)
        run_id = new_run_id()
        await _begin(src, run_id, settings)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TRAWL_DATABASE_URL": settings.database_dsn() or "",
            "TRAWL_STAGING": settings.staging,
            "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
            "TRAWL_FRONTIER_LEASE_SECONDS": "2",
            "TRAWL_FRONTIER_CHECKPOINT_SECONDS": "0.2",
            "TRAWL_LOG_FORMAT": "json",
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.shard_child",
            src.model_dump_json(),
            run_id,
            "1",
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"started"
        # Once the child is well into its hosts, it vanishes.
        deadline = time.monotonic() + 30
        while len(site.requests) < 200 and time.monotonic() < deadline:  # noqa: ASYNC110 - the site's counter
            await asyncio.sleep(0.05)
        own = asyncio.create_task(_shard(src, run_id, settings, 0))
        await asyncio.sleep(0.3)
        child.kill()
        killed = time.monotonic()
        await child.wait()
        async with whole_frontier(src, run_id, settings) as whole:
            orphaned = {h for h, v in (await whole.hosts()).items() if v["owner"] and v["lease_until"]}
        result, _ = await asyncio.wait_for(own, 60)
        stats, rows = await _commit(src, run_id, settings)
        async with whole_frontier(src, run_id, settings) as whole:
            moved = {h: v["moves"] for h, v in (await whole.hosts()).items()}
    assert orphaned, "the killed shard held hosts"
    assert time.monotonic() - killed < 60
    total = 4 * pages
    assert set(site.requests) == {f"{h}:{site.port}/p/{n}" for h in hosts for n in range(pages)}
    assert max(site.max_inflight.values()) <= CAP, site.max_inflight  # the cap held while hosts moved
    assert len({(r["data"]["host"], r["data"]["n"]) for r in rows}) == total
    assert sum(moved.values()) >= 1, moved  # the live shard took hosts over, with the state saved with them
    assert stats["per_shard"]["0"]["pages"] == result["pages"] > 0
