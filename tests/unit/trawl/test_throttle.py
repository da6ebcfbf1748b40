"""Throttle signals slow a host down (AIMD) instead of counting as failures; a budget ends a host that never stops."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.helpers.net import LocalHost
from trawl.errors import BreakerOpen, HostBusy, ThrottleBudgetSpent, TransientFetchError
from trawl.fetch import Fetcher, _HostGate
from trawl.metrics import METRICS
from trawl.settings import Settings


class Throttling(LocalHost):
    """A local host whose /page answers ``mode``: ``ok``, ``429`` (Retry-After ``after``), ``503`` (with Retry-After),
    ``503-bare`` (none) or ``500``; the first ``refuse`` requests of each path only, when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.after = "0.1"
        self.refuse: int | None = None
        self.hits: Counter[str] = Counter()
        self.times: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/robots.txt":
            return web.Response(status=404)
        self.hits[request.path_qs] += 1
        self.times.append(time.monotonic())
        if self.mode == "ok" or (self.refuse is not None and self.hits[request.path_qs] > self.refuse):
            return web.Response(text="ok")
        if self.mode == "429":
            return web.Response(status=429, headers={"Retry-After": self.after})
        if self.mode == "503":
            return web.Response(status=503, headers={"Retry-After": self.after})
        return web.Response(status=503 if self.mode == "503-bare" else 500)


@pytest.fixture
async def host() -> AsyncIterator[Throttling]:
    async with Throttling() as h:
        yield h


def fast(settings: Settings, **update: Any) -> Settings:
    base = {"max_retries": 0, "breaker_fail_max": 3, "breaker_reset_timeout": 0.3, "backoff_base": 0.01}
    return settings.model_copy(update={**base, **update})


@pytest.mark.parametrize("mode", ["429", "503"])
async def test_throttle_signals_use_no_retries_and_never_open_the_breaker(
    settings: Settings, host: Throttling, mode: str
) -> None:
    host.mode, host.refuse, host.after = mode, 6, "0.05"
    async with Fetcher(fast(settings)) as fetcher:
        resp = await fetcher.get(f"{host.url}/page")
        # max_retries is 0 and fail_max 3: six refusals neither used a retry nor opened the breaker.
        assert (resp.status, resp.attempts) == (200, 7)
        assert fetcher.breakers.states() == {f"127.0.0.1:{host.port}": "closed"}
        assert fetcher.breakers.trips() == 0
        assert fetcher.throttle_signals("-", {f"127.0.0.1:{host.port}"}) == {f"127.0.0.1:{host.port}": 6}
    # Each refusal paused the host for its Retry-After before the next request.
    gaps = [b - a for a, b in zip(host.times, host.times[1:], strict=False)]
    assert min(gaps) >= 0.045, gaps


async def test_the_throttle_counter_exists_at_zero_before_the_first_signal(
    settings: Settings, host: Throttling
) -> None:
    # A burst of signals in one scrape interval must show as an increase from 0 (rate()), not as a new series.
    source = "counted-from-zero"
    async with Fetcher(fast(settings)) as fetcher:
        await fetcher.get(f"{host.url}/page", source=source)
        label = METRICS.host(f"127.0.0.1:{host.port}")
        assert (source, label) in METRICS.throttle_signals._metrics  # the series exists, without a signal yet
        assert METRICS.throttle_signals.labels(source, label)._value.get() == 0
        host.mode, host.refuse, host.after = "429", 2, "0.01"
        await fetcher.get(f"{host.url}/again", source=source)
        assert METRICS.throttle_signals.labels(source, label)._value.get() == 2


@pytest.mark.parametrize("mode", ["503-bare", "500"])
async def test_real_failures_still_open_the_breaker(settings: Settings, host: Throttling, mode: str) -> None:
    host.mode = mode
    async with Fetcher(fast(settings)) as fetcher:
        for _ in range(3):
            with pytest.raises(TransientFetchError):
                await fetcher.get(f"{host.url}/page")
        with pytest.raises(BreakerOpen):
            await fetcher.get(f"{host.url}/page")
        assert fetcher.breakers.trips() == 1


async def test_a_half_open_probe_that_is_throttled_waits(settings: Settings, host: Throttling) -> None:
    host.mode = "500"
    async with Fetcher(fast(settings)) as fetcher:
        for _ in range(3):
            with pytest.raises(TransientFetchError):
                await fetcher.get(f"{host.url}/page")
        breaker = fetcher.breakers.get(f"127.0.0.1:{host.port}")
        await asyncio.sleep(0.35)
        # The probe meets 429 twice: the breaker neither closes nor opens again; the probe waits and tries again.
        host.mode, host.refuse, host.after, host.hits = "429", 2, "0.05", Counter()
        resp = await fetcher.get(f"{host.url}/page")
        assert (resp.status, resp.attempts) == (200, 3)
        assert fetcher.breakers.transitions[(f"127.0.0.1:{host.port}", "open")] == 1
        assert breaker.state == "closed"


async def test_a_host_that_never_stops_throttling_is_given_up(settings: Settings, host: Throttling) -> None:
    host.mode, host.after = "429", "0.05"
    started = time.monotonic()
    async with Fetcher(fast(settings, throttle_budget=0.4, per_host_concurrency=2)) as fetcher:
        with pytest.raises(ThrottleBudgetSpent) as info:
            await fetcher.get(f"{host.url}/page")
        assert (info.value.status, str(info.value)[:9]) == (429, "throttled")
        assert info.value.attempts == host.hits["/page"] >= 3
        assert 0.4 <= time.monotonic() - started < 1.5
        # Its other URLs end the same way at once, without a request.
        with pytest.raises(ThrottleBudgetSpent) as other:
            await fetcher.get(f"{host.url}/other")
        assert (other.value.status, other.value.attempts, host.hits["/other"]) == (429, 0, 0)
        assert fetcher.breakers.trips() == 0


async def test_requests_wait_out_a_pause_and_parked_ones_are_called_back(settings: Settings, host: Throttling) -> None:
    host.mode, host.refuse, host.after = "429", 1, "0.3"
    async with Fetcher(fast(settings, per_host_concurrency=4)) as fetcher:
        await fetcher.get(f"{host.url}/page")  # 429, paused 0.3 s, then 200
        refused_at = host.times[0]
        # While the host is paused, a parking caller is told HostBusy; a waiting one is held until the pause ends.
        host.mode = "ok"
        fetcher._gates[f"127.0.0.1:{host.port}"].paused_until = time.monotonic() + 0.3
        with pytest.raises(HostBusy) as busy:
            await fetcher.get(f"{host.url}/parked", park=True)
        called = asyncio.Event()
        busy.value.when_ready(called.set)
        await fetcher.get(f"{host.url}/waits")
        assert called.is_set()
        assert host.times[-1] - refused_at >= 0.3


def test_gate_cuts_multiplicatively_and_grows_additively(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its own label, however many hosts earlier tests used up (past metrics_max_hosts a host is `other`, no gauge).
    monkeypatch.setattr(METRICS, "host", lambda host: host)
    s = fast(settings, per_host_concurrency=8, backoff_max=5.0)
    gate = _HostGate("gate.test", 8, 0.0, s)
    label = METRICS.host("gate.test")

    def gauges() -> tuple[float, float]:
        reg = METRICS.registry
        concurrency = reg.get_sample_value("trawl_host_concurrency", {"host": label})
        delay = reg.get_sample_value("trawl_host_delay_seconds", {"host": label})
        assert concurrency is not None and delay is not None
        return concurrency, delay

    assert (gate.slots, gate.gap, gauges()) == (8, 0.0, (8.0, 0.0))
    sent = time.monotonic()
    gate.throttled(429, 1.0, sent, "src")
    assert (gate.slots, gate.throttling) == (4, True)
    assert gate.paused_until >= time.monotonic() + 0.9
    assert gauges() == (4.0, pytest.approx(0.1))
    gate.throttled(429, 1.0, sent, "src")  # sent before the cut: the same window, no second cut
    assert gate.slots == 4
    gate.throttled(429, 1.0, time.monotonic(), "src")
    gate.throttled(429, 1.0, time.monotonic(), "src")
    gate.throttled(429, 1.0, time.monotonic(), "src")
    assert gate.slots == 1  # floor
    assert gate.gap == pytest.approx(0.25)  # doubled each window: 0.1, 0.2, then a quarter of the 1 s pause
    assert gate.signals == Counter({"src": 5})
    for _ in range(200):
        gate.answered(time.monotonic(), None)
        if not gate.throttling:
            break
    assert (gate.slots, gate.gap, gate.throttling) == (8, 0.0, False)
    assert gauges() == (8.0, 0.0)


def test_rising_response_times_ease_an_adaptive_host(settings: Settings) -> None:
    gate = _HostGate("slowing.test", 8, 0.0, settings)
    for _ in range(20):
        gate.answered(time.monotonic(), 0.05)
    assert gate.slots == 8
    for _ in range(20):
        gate.answered(time.monotonic(), 2.0)  # forty times slower: ease it before it starts refusing
    assert gate.slots < 8 and not gate.throttling
    # Without the latency (politeness adaptive: false) nothing changes.
    steady = _HostGate("steady.test", 8, 0.0, settings)
    for _ in range(40):
        steady.answered(time.monotonic(), None)
    assert steady.slots == 8


async def test_one_host_rate_for_every_kind(settings: Settings, host: Throttling) -> None:
    # A 429 met by an html request (aiohttp) pauses the host for an api request (httpx) and for a browser navigation
    # or Scrapy request (Fetcher.slot) too: one host state in the fetch layer.
    host.mode, host.refuse, host.after = "429", 1, "0.3"
    async with Fetcher(fast(settings, backoff_max=1.0)) as fetcher:
        html = asyncio.create_task(fetcher.get(f"{host.url}/html", transport="aiohttp"))
        gate = None
        while gate is None or gate.paused_until <= time.monotonic():
            await asyncio.sleep(0.005)
            gate = fetcher._gates.get(f"127.0.0.1:{host.port}")
        refused_at = host.times[0]
        api = asyncio.create_task(fetcher.get(f"{host.url}/api", transport="httpx"))
        async with fetcher.slot(f"{host.url}/slot", robots=False) as turn:
            slot_at = time.monotonic()
            turn.status = 200
        assert (await html).attempts == 2 and (await api).attempts == 2
    assert slot_at - refused_at >= 0.29
    assert min(t for t in host.times[1:]) - refused_at >= 0.29  # every later request came after the pause
