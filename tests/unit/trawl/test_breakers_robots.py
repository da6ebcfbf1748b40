"""Per-host circuit breakers, robots.txt and the connect-time network guard, against a local server."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.net import LocalHost
from trawl.errors import BlockedNetworkError, BreakerOpen, PermanentFetchError, RobotsDisallowed, TransientFetchError
from trawl.fetch import Fetcher
from trawl.netguard import GuardedResolver, NetworkGuard, RefusedAddress
from trawl.settings import Settings


class Host(LocalHost):
    """One local host: /page fails with 500 while ``failing``; /robots.txt serves ``robots`` (or a status)."""

    def __init__(self, ip: str = "127.0.0.1") -> None:
        super().__init__(ip)
        self.failing = False
        self.robots: str | bytes | int = 404
        self.hits: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.path == "/robots.txt":
            if isinstance(self.robots, int):
                return web.Response(status=self.robots)
            if isinstance(self.robots, bytes):
                return web.Response(body=self.robots, content_type="text/plain")
            return web.Response(text=self.robots, content_type="text/plain")
        if request.path.startswith("/missing"):
            return web.Response(status=404)
        if self.failing:
            return web.Response(status=500)
        return web.Response(text="<p>ok</p>", content_type="text/html")


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    async with Host() as h:
        yield h


def fast(settings: Settings, **update: Any) -> Settings:
    base = {"max_retries": 0, "breaker_fail_max": 3, "breaker_reset_timeout": 0.3}
    return settings.model_copy(update={**base, **update})


async def test_breaker_opens_probes_once_and_closes(settings: Settings, host: Host) -> None:
    host.failing = True
    async with Fetcher(fast(settings)) as fetcher:
        for _ in range(3):
            with pytest.raises(TransientFetchError):
                await fetcher.get(f"{host.url}/page")
        breaker = fetcher.breakers.get(f"{host.ip}:{host.port}")
        assert breaker.state == "open"
        # Open: not requested at all.
        with pytest.raises(BreakerOpen) as info:
            await fetcher.get(f"{host.url}/page")
        assert 0 < info.value.retry_in <= 0.3
        assert host.hits["/page"] == 3

        await asyncio.sleep(0.35)
        host.failing = False
        # Half-open: of many concurrent callers exactly one probe goes through; the rest are told to wait.
        results = await asyncio.gather(*(fetcher.get(f"{host.url}/page") for _ in range(5)), return_exceptions=True)
        assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
        assert all(isinstance(r, BreakerOpen) for r in results if isinstance(r, BaseException))
        assert host.hits["/page"] == 4
        assert breaker.state == "closed"
        await fetcher.get(f"{host.url}/page")
        assert fetcher.breakers.trips() == 1


async def test_failed_probe_reopens(settings: Settings, host: Host) -> None:
    host.failing = True
    async with Fetcher(fast(settings)) as fetcher:
        for _ in range(3):
            with pytest.raises(TransientFetchError):
                await fetcher.get(f"{host.url}/page")
        await asyncio.sleep(0.35)
        with pytest.raises(TransientFetchError):
            await fetcher.get(f"{host.url}/page")  # the probe, failing
        with pytest.raises(BreakerOpen):
            await fetcher.get(f"{host.url}/page")
        assert fetcher.breakers.trips() == 2
        assert host.hits["/page"] == 4


async def test_a_broken_host_does_not_trip_another(settings: Settings) -> None:
    async with Host("127.0.0.2") as bad, Host("127.0.0.3") as good, Fetcher(fast(settings)) as fetcher:
        bad.failing = True
        for _ in range(4):
            with pytest.raises((TransientFetchError, BreakerOpen)):
                await fetcher.get(f"{bad.url}/page")
        resp = await fetcher.get(f"{good.url}/page")
        assert resp.status == 200
        assert fetcher.breakers.states() == {f"127.0.0.2:{bad.port}": "open", f"127.0.0.3:{good.port}": "closed"}


async def test_permanent_errors_do_not_count_against_the_host(settings: Settings, host: Host) -> None:
    async with Fetcher(fast(settings)) as fetcher:
        for i in range(5):
            with pytest.raises(PermanentFetchError, match="HTTP 404"):
                await fetcher.get(f"{host.url}/missing/{i}")
        assert fetcher.breakers.states()[f"{host.ip}:{host.port}"] == "closed"
    assert host.hits["/missing/4"] == 1


async def test_robots_disallowed_urls_are_never_requested(settings: Settings, host: Host) -> None:
    host.robots = "User-agent: *\nDisallow: /private/\n\nUser-agent: trawl\nDisallow: /private/\nAllow: /\n"
    async with Fetcher(settings) as fetcher:
        await asyncio.gather(*(fetcher.get(f"{host.url}/public/{i}") for i in range(5)))
        for i in range(3):
            with pytest.raises(RobotsDisallowed):
                await fetcher.get(f"{host.url}/private/{i}")
    assert host.hits["/robots.txt"] == 1  # once per origin, even with concurrent first requests
    assert not any(path.startswith("/private/") for path in host.hits)


async def test_crawl_delay_spaces_requests(settings: Settings, host: Host) -> None:
    host.robots = "User-agent: *\nCrawl-delay: 0.2\n"
    async with Fetcher(settings.model_copy(update={"max_crawl_delay": 0.15})) as fetcher:
        loop = asyncio.get_running_loop()
        await fetcher.get(f"{host.url}/page")
        start = loop.time()
        await asyncio.gather(*(fetcher.get(f"{host.url}/page?{i}") for i in range(4)))
        elapsed = loop.time() - start
    # Each of the four waits its 0.15 s turn after the previous start: ~0.6 s; uncapped (0.2) ~0.8 s, unspaced ~0.
    assert 0.55 <= elapsed < 0.75


@pytest.mark.parametrize(
    ("status", "setting", "allowed"),
    [
        (404, "allow", True),
        (403, "disallow", True),
        (500, "allow", True),
        (500, "disallow", False),
        (503, None, False),  # RFC 9309: a server error means disallow, and that is the default
    ],
)
async def test_robots_status_semantics(
    settings: Settings, host: Host, status: int, setting: str, allowed: bool
) -> None:
    host.robots = status
    update = {} if setting is None else {"robots_unavailable": setting}
    async with Fetcher(fast(settings, **update)) as fetcher:
        if allowed:
            assert (await fetcher.get(f"{host.url}/page")).status == 200
        else:
            with pytest.raises(RobotsDisallowed):
                await fetcher.get(f"{host.url}/page")


async def test_a_robots_txt_over_500_kib_is_read_to_500_kib_not_refused(settings: Settings, host: Host) -> None:
    # 600 KiB: `Disallow: /` first, then comment lines, then a rule past 500 KiB that must not count.
    head = b"User-agent: *\nDisallow: /\nAllow: /late/\n"
    padding = b"# " + b"x" * 97 + b"\n"
    body = head + padding * (510 * 1024 // len(padding)) + b"User-agent: *\nAllow: /\n"
    host.robots = body + padding * ((600 * 1024 - len(body)) // len(padding))
    assert len(host.robots) > 600 * 1000
    async with Fetcher(fast(settings)) as fetcher:
        with pytest.raises(RobotsDisallowed, match=r"disallowed by robots\.txt"):
            await fetcher.get(f"{host.url}/page")
        assert (await fetcher.get(f"{host.url}/late/1")).status == 200
    assert host.hits["/page"] == 0
    assert host.hits["/robots.txt"] == 1


async def test_a_robots_txt_with_a_utf8_bom_keeps_its_first_group(settings: Settings, host: Host) -> None:
    host.robots = b"\xef\xbb\xbfUser-agent: *\nDisallow: /private/\n"
    async with Fetcher(fast(settings)) as fetcher:
        assert (await fetcher.get(f"{host.url}/public")).status == 200
        with pytest.raises(RobotsDisallowed):
            await fetcher.get(f"{host.url}/private/1")
    assert host.hits["/private/1"] == 0


async def test_a_failed_robots_verdict_expires_and_the_file_is_fetched_again(settings: Settings, host: Host) -> None:
    host.robots = 503
    async with Fetcher(fast(settings, robots_failure_ttl=0.2)) as fetcher:
        with pytest.raises(RobotsDisallowed, match=r"robots\.txt unavailable"):
            await fetcher.get(f"{host.url}/page")
        with pytest.raises(RobotsDisallowed):  # within the TTL: the verdict stands, no new fetch
            await fetcher.get(f"{host.url}/page")
        assert host.hits["/robots.txt"] == 1
        host.robots = "User-agent: *\nAllow: /\n"
        await asyncio.sleep(0.25)
        assert (await fetcher.get(f"{host.url}/page")).status == 200
    assert host.hits["/robots.txt"] == 2
    assert host.hits["/page"] == 1


async def test_a_throttled_robots_txt_fails_the_url_as_transient_and_is_asked_again(
    settings: Settings, host: Host
) -> None:
    host.robots = 429
    # Throttle signals are waited out first (issue 19): robots.txt is asked until the host's throttle budget is spent.
    async with Fetcher(fast(settings, robots_failure_ttl=0.2, throttle_budget=0.2)) as fetcher:
        with pytest.raises(TransientFetchError, match=r"robots\.txt throttled") as caught:
            await fetcher.get(f"{host.url}/page")
        assert caught.value.status == 429
        assert not isinstance(caught.value, RobotsDisallowed)
        host.robots = 404
        await asyncio.sleep(0.25)  # the robots verdict and the host's give-up both expire
        assert (await fetcher.get(f"{host.url}/page")).status == 200
    assert host.hits["/robots.txt"] >= 3  # asked through the budget, then once more when the verdict expired


async def test_an_unreachable_robots_txt_stops_the_url_and_says_why(settings: Settings) -> None:
    async with Host() as gone:
        url = f"{gone.url}/page"
    async with Fetcher(fast(settings)) as fetcher:
        with pytest.raises(TransientFetchError, match=r"robots\.txt unreachable"):
            await fetcher.get(url)


async def test_resolver_refuses_forbidden_addresses_at_connect_time(
    settings: Settings, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RefusedAddress, match="localhost resolves to"):
        await GuardedResolver(NetworkGuard([])).resolve("localhost", 80, socket.AF_INET)
    strict = settings.model_copy(update={"allowed_networks": []})
    async with Fetcher(strict) as fetcher:
        # As if DNS changed between the guard's own lookup and the connection: the resolver still refuses.
        async def passes(url: str, host: str | None = None) -> None:
            return None

        monkeypatch.setattr(fetcher._guard, "check", passes)
        with pytest.raises(BlockedNetworkError, match=r"localhost resolves to 127\.0\.0\.1"):
            await fetcher.get(f"http://localhost:{host.port}/page", robots=False)
    assert host.hits == Counter()


async def test_half_open_is_the_state_while_the_probe_is_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from trawl.breakers import BreakerRegistry
    from trawl.metrics import METRICS

    monkeypatch.setattr(METRICS, "max_hosts", len(METRICS._hosts) + 10)  # this host keeps its own label
    breakers = BreakerRegistry(fail_max=2, reset_timeout=0.05)
    breaker = breakers.get("probe.test")

    def gauge(state: str) -> float:
        return METRICS.registry.get_sample_value("trawl_breakers", {"host": "probe.test", "state": state}) or 0.0

    for _ in range(2):
        breaker.record(False, breaker.admit("http://probe.test/"))
    assert breaker.state == "open" and gauge("open") == 1
    await asyncio.sleep(0.06)
    probe = breaker.admit("http://probe.test/")
    assert probe and breaker.state == "half-open"
    assert (gauge("open"), gauge("half-open"), gauge("closed")) == (0, 1, 0)
    breaker.record(True, probe)
    assert breaker.state == "closed" and (gauge("half-open"), gauge("closed")) == (0, 1)
