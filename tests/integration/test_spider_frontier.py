"""`spider` sources with ``frontier: postgres``: Scrapy's scheduler on the durable frontier, in a real PostgreSQL."""

from __future__ import annotations

import asyncio
import pickle
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest
import scrapy
from pydantic import SecretStr
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.test import get_crawler

from trawl.config import SpiderSource
from trawl.connectors import SourceContext, SourceStats
from trawl.connectors.spider import SpiderConnector, scrapy_settings
from trawl.demo.account import ORDER_COUNT, order
from trawl.demo.site import PAGE_COUNT, PRODUCT_COUNT, DemoSite
from trawl.fetch import Fetcher
from trawl.frontier import PgFrontier
from trawl.frontier.postgres import QueuedRequest
from trawl.frontier.scheduler import PgScheduler, encode_request, request_key
from trawl.records import Outcome, Record, utcnow
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

HERE = sys.modules[__name__].__name__  # test spiders below are loaded as `HERE:Class`
RUN_ID = "run-spider-frontier-1"


class RepeatSpider(scrapy.Spider):
    """The same product page ``times`` times with ``dont_filter`` and ``times`` times without; one item each."""

    name = "repeat"

    def __init__(self, base: str, times: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base, self.times = base, int(times)

    async def start(self) -> AsyncIterator[Any]:
        for i in range(self.times):
            yield scrapy.Request(f"{self.base}/products/1", dont_filter=True, cb_kwargs={"n": f"forced-{i}"})
        for i in range(self.times):
            yield scrapy.Request(f"{self.base}/products/1", cb_kwargs={"n": f"plain-{i}"})

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"id": kwargs["n"], "url": response.url}


class Run:
    """One spider source through its connector; records and outcomes kept."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[Record] = []
        self.outcomes: list[Outcome] = []
        self.stats = SourceStats()

    async def emit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    async def spider(self, source: SpiderSource) -> list[Record]:
        async with Fetcher(self.settings) as fetcher:
            ctx = SourceContext(RUN_ID, self.settings, fetcher, self.emit, self.stats)
            async for record in SpiderConnector(source, ctx).fetch():
                self.records.append(record)
        return self.records


def spider_source(spider: str, frontier: str | None = None, **args: Any) -> SpiderSource:
    return SpiderSource.model_validate(
        {"kind": "spider", "name": "spidered", "spider": spider, "args": args, "frontier": frontier}
    )


@pytest.fixture
def pg_settings(settings: Settings, database_url: str) -> Settings:
    return settings.model_copy(update={"database_url": SecretStr(database_url)})


async def _rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT url, state, attempts, payload FROM trawl._frontier WHERE run_id = $1 AND source = 'spidered'", RUN_ID
    )


def test_the_frontier_setting_or_the_source_picks_pgscheduler(settings: Settings) -> None:
    books = "spiders.books:BooksSpider"
    durable = settings.model_copy(update={"frontier": "postgres"})
    assert scrapy_settings(spider_source(books), settings)["SCHEDULER"] != "trawl.frontier.scheduler.PgScheduler"
    for source, s in ((spider_source(books, "postgres"), settings), (spider_source(books), durable)):
        assert scrapy_settings(source, s)["SCHEDULER"] == "trawl.frontier.scheduler.PgScheduler"
    assert scrapy_settings(spider_source(books, "memory"), durable)["SCHEDULER"] != (
        "trawl.frontier.scheduler.PgScheduler"
    )


async def test_books_through_the_frontier_match_the_memory_scheduler_and_end_done(
    pg_settings: Settings, demo_site: DemoSite, db: asyncpg.Connection
) -> None:
    memory = Run(pg_settings)
    await memory.spider(spider_source("spiders.books:BooksSpider", base_url=demo_site.url))
    memory_requests = Counter(demo_site.requests)
    demo_site.requests.clear()
    durable = Run(pg_settings)
    await durable.spider(spider_source("spiders.books:BooksSpider", "postgres", base_url=demo_site.url))

    assert len(durable.records) == PRODUCT_COUNT
    assert sorted((r.key, r.content_hash) for r in durable.records) == sorted(
        (r.key, r.content_hash) for r in memory.records
    )
    assert Counter(demo_site.requests) == memory_requests  # the same requests, as often (the start URL twice)
    assert durable.stats.scrapy["finish_reason"] == "finished"
    assert durable.stats.scrapy["scheduler/dequeued/postgres"] == PRODUCT_COUNT + PAGE_COUNT + 1
    assert "scheduler/enqueued/memory" not in durable.stats.scrapy
    assert durable.stats.scrapy["frontier/done"] == PRODUCT_COUNT + PAGE_COUNT + 1
    assert durable.stats.scrapy["frontier/done_at_close"] < 10  # marked as Scrapy finished them, not all at the end

    rows = await _rows(db)
    assert {r["state"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}
    assert {r["url"] for r in rows} == {o.url for o in durable.outcomes}  # every requested URL, nothing else
    twice = [url for url, n in Counter(r["url"] for r in rows).items() if n > 1]
    start = f"{demo_site.url}/catalogue/page/1"
    assert twice == [start]  # the start request is dont_filter (Scrapy fetches it again when linked); no other
    forced = [orjson.loads(r["payload"])["dont_filter"] for r in rows if r["url"] == start]
    assert sorted(forced) == [False, True]
    assert await db.fetchval("SELECT status FROM trawl._frontier_runs WHERE run_id = $1", RUN_ID) == "complete"


async def test_dont_filter_requests_are_not_deduplicated_and_a_second_run_starts_over(
    pg_settings: Settings, demo_site: DemoSite, db: asyncpg.Connection
) -> None:
    source = spider_source(f"{HERE}:RepeatSpider", "postgres", base=demo_site.url, times=3)
    for _ in range(2):  # the same run id twice: a spider run is not resumed, its frontier starts over
        demo_site.requests.clear()
        run = Run(pg_settings)
        records = await run.spider(source)

        assert sorted(r.data["id"] for r in records) == ["forced-0", "forced-1", "forced-2", "plain-0"]
        assert demo_site.requests["/products/1"] == 4
        assert run.stats.scrapy["dupefilter/filtered"] == 2
        rows = await _rows(db)
        assert len(rows) == 4 and {r["state"] for r in rows} == {"done"}


async def test_two_schedulers_on_one_run_never_get_the_same_request(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        frontiers = [PgFrontier(pool, "trawl", "r-shared", "spidered", lease_seconds=60) for _ in range(2)]
        await frontiers[0].setup()
        await frontiers[0].begin(utcnow(), ())
        schedulers = []
        for frontier in frontiers:
            crawler = get_crawler(scrapy.Spider, {"TWISTED_REACTOR_ENABLED": False})
            spider = scrapy.Spider(name="shared")
            scheduler = PgScheduler(frontier, crawler, batch=16, poll=0.02)
            scheduler.open(spider)
            schedulers.append(scheduler)
        a, b = schedulers
        urls = [f"http://h{i % 4}.test/p{i}" for i in range(300)]
        for i, url in enumerate(urls):  # each scheduler enqueues half, and a duplicate of the other's half
            (a if i % 2 else b).enqueue_request(scrapy.Request(url, priority=i % 3))
            (b if i % 2 else a).enqueue_request(scrapy.Request(url))

        got: dict[int, list[str]] = {0: [], 1: []}
        async with asyncio.timeout(10):
            while len(got[0]) + len(got[1]) < len(urls):
                for n, s in enumerate(schedulers):
                    while (request := s.next_request()) is not None:
                        got[n].append(request.url)
                await asyncio.sleep(0.01)
        assert got[0] and got[1]  # both took part
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == sorted(urls)

        # Every request is with one of them: neither may report nothing pending while the other holds some.
        await asyncio.sleep(0.1)
        assert a.has_pending_requests() and b.has_pending_requests()
        await maybe_deferred_to_future(b.close("finished"))
        for _ in range(250):  # a polls, and sees b's requests done
            if not a.has_pending_requests():
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("a still reports pending requests after b finished them")
        await maybe_deferred_to_future(a.close("finished"))
        assert await frontiers[0].counts() == {"done": len(urls)}
        assert await pool.fetchval("SELECT max(attempts) FROM trawl._frontier") == 1
    finally:
        await pool.close()


async def test_a_spider_crawl_that_died_midway_resumes_from_its_checkpoint(
    pg_settings: Settings, demo_site: DemoSite, db: asyncpg.Connection
) -> None:
    """Through the crawler (checkpoints): killed a third of the way, resumed, every book staged, nothing fetched
    again that was done at the death."""
    from sinks.targets import open_stager
    from trawl.crawler import crawl_source

    settings = pg_settings.model_copy(update={"frontier_checkpoint_seconds": 0.1})
    source = spider_source("spiders.books:BooksSpider", "postgres", base_url=demo_site.url)
    run_id = "run-spider-resume-1"
    stats = SourceStats()

    async def crawl(resume: bool, stats: SourceStats | None = None) -> Any:
        async with (
            await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager,
            Fetcher(settings) as fetcher,
        ):
            return await crawl_source(
                source, run_id=run_id, settings=settings, fetcher=fetcher, stager=stager, stats=stats, resume=resume
            )

    task = asyncio.create_task(crawl(False, stats))
    while stats.records < PRODUCT_COUNT // 3:  # noqa: ASYNC110 - polls the crawl's own counter
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done_at_death = {
        r["url"] for r in await db.fetch("SELECT url FROM trawl._frontier WHERE run_id = $1 AND state = 'done'", run_id)
    }
    assert done_at_death
    before = Counter(demo_site.requests)

    result = await crawl(True)
    assert result.status == "complete"
    async with await asyncio.to_thread(open_stager, settings.staging, settings=settings) as stager:
        (m,) = [m for m in await stager.manifests("raw") if m.run_id == run_id]
        keys = [orjson.loads(line)["key"] for p in m.parts async for line in stager.read_part(p)]
    assert len(set(keys)) == PRODUCT_COUNT  # nothing lost
    again = Counter(demo_site.requests) - before
    start = "/catalogue/page/1"
    refetched = {path for path in again if path in {u.removeprefix(demo_site.url) for u in done_at_death}}
    assert refetched <= {start}  # only the dont_filter start request is asked for again
    assert sum(again.values()) <= PRODUCT_COUNT + PAGE_COUNT + 2 - len(done_at_death)
    rows = await db.fetch("SELECT state FROM trawl._frontier WHERE run_id = $1", run_id)
    assert {r["state"] for r in rows} == {"done"}


# -- what the frontier holds: JSON trawl wrote, never credentials ------------------------------------------

RAN: list[str] = []
"""What a forged frontier row made run: must stay empty."""


class _Boom:
    """A pickle that runs code when it is loaded."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (RAN.append, ("unpickled",))


class FrontierSpider(scrapy.Spider):
    name = "frontier"

    def parse(self, response: Any, **kwargs: Any) -> Iterator[Any]:
        yield from ()

    def drop_tables(self, response: Any) -> None:  # a method; a forged row may name it, but only as a callback
        RAN.append("callback")


def _forged(url: str, payload: bytes) -> QueuedRequest:
    return QueuedRequest(request_key(url.encode()), url, "evil.test", 0, 0, payload)


async def _scheduler(pool: asyncpg.Pool, run_id: str) -> tuple[PgScheduler, FrontierSpider]:
    frontier = PgFrontier(pool, "trawl", run_id, "spidered", lease_seconds=60)
    await frontier.setup()
    await frontier.begin(utcnow(), ())
    crawler = get_crawler(FrontierSpider, {"TWISTED_REACTOR_ENABLED": False})
    spider = FrontierSpider()
    scheduler = PgScheduler(frontier, crawler, batch=16, poll=0.02)
    return scheduler, spider


async def _drain(scheduler: PgScheduler, want: int) -> list[scrapy.Request]:
    got: list[scrapy.Request] = []
    async with asyncio.timeout(10):
        while len(got) < want:
            while (request := scheduler.next_request()) is not None:
                got.append(request)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a few more rounds: nothing else may come out
    while (request := scheduler.next_request()) is not None:
        got.append(request)
    return got


async def test_a_frontier_row_that_is_not_the_json_trawl_wrote_is_refused_counted_and_never_run(
    database_url: str,
) -> None:
    RAN.clear()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        scheduler, spider = await _scheduler(pool, "r-forged")
        good = encode_request(scrapy.Request("http://ok.test/1", callback=spider.parse), spider)
        template = orjson.loads(good)
        forged = [
            _forged("http://evil.test/pickle", pickle.dumps(_Boom())),
            _forged("http://evil.test/scrapy-dict", orjson.dumps({"url": "http://evil.test/", "_class": "os.system"})),
            _forged("http://evil.test/class", orjson.dumps({**template, "class": "subprocess.Popen"})),
            _forged("http://evil.test/dunder", orjson.dumps({**template, "callback": "__init__"})),
            _forged("http://evil.test/attr", orjson.dumps({**template, "callback": "crawler"})),
            _forged("http://evil.test/extra", orjson.dumps({**template, "exec": "print(1)"})),
            _forged("http://evil.test/base64", orjson.dumps({**template, "body": "not base64!"})),
            _forged(
                "http://evil.test/cookie", orjson.dumps({**template, "headers": [["Q29va2ll", ["c2lkPTE="]]]})
            ),  # "Cookie: sid=1": trawl never writes one, so it never reads one
        ]
        await scheduler.frontier.push_requests([*forged, _forged("http://ok.test/1", good)])
        scheduler.open(spider)
        got = await _drain(scheduler, 1)
        assert [(r.url, r.callback) for r in got] == [("http://ok.test/1", spider.parse)]
        assert RAN == []
        assert scheduler.counts["refused"] == len(forged)
        assert scheduler.crawler.stats.get_value("scheduler/refused") == len(forged)
        await maybe_deferred_to_future(scheduler.close("finished"))
        states = dict(await pool.fetch("SELECT url, state FROM trawl._frontier WHERE run_id = 'r-forged'"))
        assert all(states[f.url] == "done" for f in forged)  # refused once, not claimed again
    finally:
        await pool.close()


async def test_requests_carrying_credentials_stay_in_memory_and_never_reach_the_table(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        scheduler, spider = await _scheduler(pool, "r-creds")
        scheduler.open(spider)
        secret = "s3cret-" + "x" * 8
        secretive = [
            scrapy.Request("http://h.test/auth", headers={"Authorization": f"Bearer {secret}"}),
            scrapy.Request("http://h.test/cookie", headers={"Cookie": f"sid={secret}"}),
            scrapy.Request("http://h.test/proxy", headers={"Proxy-Authorization": f"Basic {secret}"}),
            scrapy.Request("http://h.test/jar", cookies={"sid": secret}),
            scrapy.FormRequest("http://h.test/login", formdata={"user": "u", "password": secret}),
            scrapy.Request("http://h.test/marked", meta={"trawl_credentials": True, "token": secret}),
        ]
        plain = [
            scrapy.Request("http://h.test/plain", meta={"depth": 1, "list": [1, "a", None]}, cb_kwargs={"n": 2}),
            scrapy.Request("http://h.test/open-body", method="POST", body=b"q=1", meta={"trawl_credentials": False}),
        ]
        for request in [*secretive, *plain]:
            assert scheduler.enqueue_request(request)
        got = await _drain(scheduler, len(secretive) + len(plain))
        assert sorted(r.url for r in got) == sorted(r.url for r in [*secretive, *plain])
        assert scheduler.crawler.stats.get_value("scheduler/enqueued/memory") == len(secretive)
        by_url = {r.url: r for r in got}
        assert by_url["http://h.test/plain"].cb_kwargs == {"n": 2}
        assert by_url["http://h.test/plain"].meta["list"] == [1, "a", None]
        assert by_url["http://h.test/open-body"].body == b"q=1"
        await maybe_deferred_to_future(scheduler.close("finished"))
        rows = await pool.fetch("SELECT url, payload FROM trawl._frontier WHERE run_id = 'r-creds'")
        assert sorted(r["url"] for r in rows) == sorted(r.url for r in plain)
        for row in rows:
            assert orjson.loads(row["payload"])["format"].startswith("trawl/")  # JSON, not a pickle
            assert secret.encode() not in row["payload"]
    finally:
        await pool.close()


async def test_the_demo_login_spider_works_through_the_frontier_and_its_password_stays_out(
    pg_settings: Settings, demo_site: DemoSite, db: asyncpg.Connection
) -> None:
    run = Run(pg_settings)
    source = spider_source("spiders.orders:OrdersSpider", "postgres", base_url=demo_site.url, password="trawl-demo")
    records = await run.spider(source)
    assert sorted(r.data["number"] for r in records) == [order(i).number for i in range(1, ORDER_COUNT + 1)]
    rows = await _rows(db)
    assert rows, "the order pages went through the frontier"
    assert {r["state"] for r in rows} == {"done"}
    for row in rows:
        payload = row["payload"] or b""
        assert b"trawl-demo" not in payload and b"password" not in payload
        assert b"Q29va2ll" not in payload  # no Cookie header (base64 of "Cookie")
    assert run.stats.scrapy["scheduler/enqueued/memory"] >= 1  # the login POST
