"""The durable frontier in a real PostgreSQL: claims, links, checkpoints, and crawls that carry on after dying."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from sinks.targets import open_stager
from trawl.config import HtmlSource, load_sources
from trawl.connectors.base import SourceStats
from trawl.crawler import crawl_source, new_run_id
from trawl.demo.site import PAGE_COUNT, PRODUCT_COUNT, DemoSite
from trawl.errors import ConfigError
from trawl.fetch import Fetcher
from trawl.frontier import PgFrontier
from trawl.frontier.postgres import shard_of, url_key
from trawl.settings import Settings
from trawl.staging import StagedPart

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


async def _products(base: str, **extra: object) -> HtmlSource:
    spec = await asyncio.to_thread(load_sources, REPO / "examples" / "demo.yaml", env={"TRAWL_DEMO_URL": base})
    src = next(s for s in spec.sources if s.name == "products")
    assert isinstance(src, HtmlSource)
    return src.model_copy(update={"frontier": "postgres", **extra})


@pytest.fixture
async def pool(database_url: str) -> asyncpg.Pool:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def test_claims_never_hand_out_a_url_twice_and_links_dedupe(pool: asyncpg.Pool) -> None:
    a = PgFrontier(pool, "trawl", "r1", "src", lease_seconds=60)
    b = PgFrontier(pool, "trawl", "r1", "src", lease_seconds=60)
    await a.setup()
    from trawl.records import utcnow

    await a.begin(utcnow(), [f"http://h{i % 3}.test/p{i}" for i in range(500)])
    assert await a.add([("http://h0.test/p0", 1), ("http://h0.test/new", 1)]) == 1
    got_a, got_b = await asyncio.gather(a.claim(200), b.claim(200))
    urls_a, urls_b = {c.url for c in got_a}, {c.url for c in got_b}
    assert len(urls_a) == 200 and len(urls_b) == 200 and not urls_a & urls_b
    rest = await a.claim(1000)
    assert len(rest) == 101
    assert await a.claim(10) == []  # all leased, none expired
    assert await a.pending() == 501 and await a.not_mine() == 200
    await a.checkpoint(
        [("raw", 1, StagedPart("file:///x/part-00001.jsonl.gz", 3, 10, "ab"))], [c.key for c in got_a], {"pages": 200}
    )
    assert await a.counts() == {"done": 200, "leased": 301}
    assert await b.release() == 301
    assert len(await b.claim(1000)) == 301
    assert [p.rows for _, _, p in await a.parts("raw")] == [3]


def test_keys_and_shards_are_stable() -> None:
    assert url_key("http://a/") == url_key("http://a/") != url_key("http://a/x")
    assert -(2**63) <= url_key("http://a/") < 2**63
    assert shard_of("Host.Example:80", 4) == shard_of("host.example:80", 4)
    assert {shard_of(f"127.0.0.{i}:8000", 2) for i in range(1, 30)} == {0, 1}


async def _crawl(src: HtmlSource, settings: Settings, run_id: str, *, resume: bool = False) -> dict:
    async with (
        await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        Fetcher(settings) as fetcher,
    ):
        res = await crawl_source(src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, resume=resume)
    return res.as_dict()


async def test_a_durable_crawl_stages_what_the_memory_crawl_does(
    demo_site: DemoSite, settings: Settings, database_url: str
) -> None:
    settings = settings.model_copy(update={"database_url": SecretStr(database_url), "frontier_checkpoint_seconds": 0.2})
    run_id = new_run_id()
    res = await _crawl(await _products(demo_site.url), settings, run_id)
    assert res["status"] == "complete" and res["records"] == PRODUCT_COUNT
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        (m,) = await stager.manifests("raw")
        assert m.rows == PRODUCT_COUNT and len(m.parts) > 1  # checkpoints closed parts along the way
    with pytest.raises(ConfigError, match="--resume"):
        await _crawl(await _products(demo_site.url), settings, run_id)


async def test_a_crawl_that_died_midway_resumes_where_its_checkpoint_left_it(
    demo_site: DemoSite, settings: Settings, database_url: str
) -> None:
    settings = settings.model_copy(update={"database_url": SecretStr(database_url), "frontier_checkpoint_seconds": 0.1})
    src = await _products(demo_site.url)
    run_id = new_run_id()
    stats = SourceStats()

    async def first() -> None:
        async with (
            await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
            Fetcher(settings) as fetcher,
        ):
            await crawl_source(src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, stats=stats)

    task = asyncio.create_task(first())
    while stats.records < PRODUCT_COUNT // 3:  # noqa: ASYNC110 - polls the crawl's own counter
        await asyncio.sleep(0.01)
    task.cancel()  # dies mid-crawl: no final checkpoint, no manifest
    with pytest.raises(asyncio.CancelledError):
        await task
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        assert await stager.manifests("raw") == []
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        done_before = (await PgFrontier(pool, "trawl", run_id, "products").counts())["done"]
    finally:
        await pool.close()
    assert done_before > 0
    requests_before = sum(demo_site.requests.values())

    res = await _crawl(src, settings, run_id, resume=True)
    assert res["status"] == "complete"
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        (m,) = await stager.manifests("raw")
        keys = [orjson.loads(line)["key"] for p in m.parts async for line in stager.read_part(p)]
    assert len(set(keys)) == PRODUCT_COUNT  # nothing lost; a URL fetched again since the checkpoint may repeat
    assert res["records"] == m.rows == len(keys)  # the summary counts rows staged, not records extracted twice
    total = PRODUCT_COUNT + PAGE_COUNT
    assert res["pages"] >= total  # stats carry on from the checkpoint
    # Only what was not done at the death is fetched again (robots.txt once more, too).
    assert sum(demo_site.requests.values()) - requests_before <= total - done_before + 1


@pytest.mark.parametrize("frontier", ["memory", "postgres"])
async def test_a_cancelled_crawl_closes_and_drops_its_open_parts(
    demo_site: DemoSite, settings: Settings, database_url: str, frontier: str
) -> None:
    """A crawl cancelled mid-way leaves no open part file behind: not for the garbage collector to close during
    some later code (an unraisable ResourceWarning there), nor as a ``.partial`` on disk."""
    settings = settings.model_copy(update={"database_url": SecretStr(database_url), "frontier_checkpoint_seconds": 60})
    src = await _products(demo_site.url, frontier=frontier, archive=True)
    stats = SourceStats()

    async def crawl() -> None:
        async with (
            await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
            Fetcher(settings) as fetcher,
        ):
            await crawl_source(src, run_id=new_run_id(), settings=settings, fetcher=fetcher, stager=stager, stats=stats)

    task = asyncio.create_task(crawl())
    while stats.records < PRODUCT_COUNT // 3:  # noqa: ASYNC110 - polls the crawl's own counter
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    staging = Path(settings.staging.removeprefix("file://"))
    assert await asyncio.to_thread(lambda: list(staging.rglob("*.partial"))) == []


async def test_resume_of_an_unknown_run_is_refused(
    monkeypatch: pytest.MonkeyPatch, prefect_api: str, database_url: str, tmp_path: Path
) -> None:
    from flows.crawl import crawl
    from trawl.errors import ParameterError

    monkeypatch.setenv("TRAWL_DATABASE_URL", database_url)
    monkeypatch.setenv("TRAWL_STAGING", f"file://{tmp_path / 'staging'}")
    with pytest.raises(ParameterError, match="no run 20200101T000000Z-abcdef"):
        await crawl(str(REPO / "examples" / "demo.yaml"), ["products"], resume_run_id="20200101T000000Z-abcdef")


async def test_a_durable_crawl_checkpoints_into_s3(
    demo_site: DemoSite, settings: Settings, database_url: str, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    settings = settings.model_copy(
        update={
            "staging": f"s3://{s3_bucket}/lake",
            "s3_endpoint_url": moto_endpoint,
            "s3_addressing_style": "path",
            "s3_spool_dir": tmp_path / "spool",
            "database_url": SecretStr(database_url),
            "frontier_checkpoint_seconds": 0.2,
        }
    )
    res = await _crawl(await _products(demo_site.url), settings, new_run_id())
    assert res["status"] == "complete"
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        (m,) = await stager.manifests("raw")
        assert m.rows == PRODUCT_COUNT and len(m.parts) > 1
        keys = [orjson.loads(line)["key"] for p in m.parts async for line in stager.read_part(p)]
    assert len(keys) == len(set(keys)) == PRODUCT_COUNT


async def test_shards_in_one_process_split_hosts_and_commit_one_manifest(settings: Settings, database_url: str) -> None:
    from tests.helpers.net import free_port
    from tests.helpers.tree import TreeSite
    from trawl.crawler import begin_sharded, commit_sharded, whole_frontier

    settings = settings.model_copy(update={"database_url": SecretStr(database_url), "frontier_checkpoint_seconds": 0.2})
    hosts = [f"127.0.0.{i}" for i in range(51, 55)]
    port = free_port(hosts[0])
    async with TreeSite(hosts, pages=800, delay=0.002, port=port) as site:
        src = HtmlSource.model_validate(
            {
                "name": "tree",
                "kind": "html",
                "shards": 2,
                "start_urls": [site.url(0)],
                "follow": {"allow": [r"/p/\d+$"], "max_depth": 50, "same_host": False},
                "key": "n",
                "fields": {"n": {"selector": "h1.n", "type": "int", "required": True}, "host": {"selector": "p.host"}},
                "politeness": {"concurrency": 2},
                "robots": False,
            }
        )
        run_id = new_run_id()
        async with whole_frontier(src, run_id, settings) as whole:
            await begin_sharded(whole, src, resume=False)
            await whole.set_shards([0, 1], "scheduled")

        async def shard(k: int) -> dict:
            async with (
                await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
                Fetcher(settings) as fetcher,
            ):
                res = await crawl_source(src, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, shard=k)
            return res.as_dict()

        results = await asyncio.gather(shard(0), shard(1))
        async with (
            whole_frontier(src, run_id, settings) as whole,
            await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
        ):
            assert await whole.pending() == 0
            committed = await commit_sharded(whole, src, stager, flow_run_id=None, settings=settings)
            (m,) = await stager.manifests("raw")
            staged = [
                (p.uri.rsplit("/", 1)[1][:8], orjson.loads(line)) for p in m.parts async for line in stager.read_part(p)
            ]
    assert sum(r["pages"] for r in results) == 800 == committed.stats["pages"]
    assert len(site.requests) == len(set(site.requests)) == 800  # each page once, across both shards
    assert max(site.max_inflight.values()) <= 2
    assert {p.uri.rsplit("/", 1)[1][:8] for p in m.parts} == {"part-s00", "part-s01"}
    assert sorted(int(r["data"]["n"]) for _, r in staged) == list(range(800))  # typed at load, text here
    # Each shard had hosts. Hosts are leased, so one may move between shards as it runs dry and gets links again
    # (never two owners at once: the cap above held); tests/integration/test_shard_leases.py covers the leases.
    assert {tag for tag, _ in staged} == {"part-s00", "part-s01"}
