"""What one process learned of a host travels with the host's lease: its rate, its breaker, its robots.txt."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from tests.helpers.net import LocalHost
from trawl.errors import BreakerOpen, FetchError
from trawl.fetch import Fetcher
from trawl.settings import Settings
from trawl.urls import host_of


class Host(LocalHost):
    """/robots.txt with a Crawl-delay, /slow answering 429 once, /down 500, the rest 200; counts requests by path."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.path == "/robots.txt":
            return web.Response(text="User-agent: *\nCrawl-delay: 0.05\nDisallow: /private\n")
        if request.path == "/slow" and self.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "0"})
        if request.path == "/down":
            return web.Response(status=500)
        return web.Response(text="ok")


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    async with Host() as h:
        yield h


async def test_rate_breaker_and_robots_move_to_the_next_owner(settings: Settings, host: Host) -> None:
    s = settings.model_copy(
        update={"max_retries": 0, "breaker_fail_max": 2, "breaker_reset_timeout": 30.0, "per_host_concurrency": 8}
    )
    name = host_of(host.url("/"))
    async with Fetcher(s) as first:
        await first.get(host.url("/ok"))
        await first.get(host.url("/slow"))  # a throttle signal, then the page: the rate is cut (8 → 4, +1/4)
        for _ in range(2):
            with pytest.raises(FetchError):
                await first.get(host.url("/down"))  # two real failures: the breaker opens
        saved = first.host_state(name)
    assert 4 <= saved["rate"]["limit"] < 5 and saved["rate"]["delay"] >= 0.05
    assert saved["breaker"]["state"] == "open" and saved["breaker"]["open_s"] > 20
    assert "User-agent" in next(iter(saved["robots"].values()))
    wire = orjson.loads(orjson.dumps(saved))  # as it is stored with the host's lease (jsonb)

    async with Fetcher(s) as second:
        second.restore_host(name, wire)
        # The breaker is still open in the new process: no request reaches the host.
        before = sum(host.hits.values())
        with pytest.raises(BreakerOpen):
            await second.get(host.url("/ok"))
        assert sum(host.hits.values()) == before
        assert second.host_state(name)["rate"]["limit"] == saved["rate"]["limit"]  # not the configured 8
    assert host.hits["/robots.txt"] == 1  # robots.txt was not fetched again
    # Disallowed paths stay disallowed by the restored rules (checked before the breaker).
    async with Fetcher(s) as third:
        third.restore_host(name, {"robots": wire["robots"]})
        with pytest.raises(FetchError, match="robots"):
            await third.get(host.url("/private/x"))
        t0 = time.monotonic()
        await asyncio.gather(third.get(host.url("/ok")), third.get(host.url("/ok")))
        assert time.monotonic() - t0 >= 0.04  # the restored Crawl-delay spaces the starts
    assert host.hits["/robots.txt"] == 1
