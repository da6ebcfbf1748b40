"""Observability: the metrics endpoint during a chaos crawl, the Pushgateway, alert rules, the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from flows._common import flow_metrics, push_sources
from sinks.stage import LocalStager
from tests.helpers.chaos import EXPECTED_SETTINGS, ChaosFleet
from tests.helpers.prometheus import get, samples, tool, value
from trawl.config import HtmlSource
from trawl.crawler import crawl_source, new_run_id
from trawl.errors import SourceFailed
from trawl.fetch import Fetcher
from trawl.metrics import BATCH_SERIES, METRICS, OTHER_HOST, Metrics, push_spool
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "trawl.json"


_tool, _get, _samples, _value = tool, get, samples, value


async def test_endpoint_shows_5xx_and_the_open_breaker_of_the_failing_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # METRICS lives for the whole test session: hosts of earlier tests must not push these two into `other`.
    monkeypatch.setattr(METRICS, "max_hosts", len(METRICS._hosts) + 10)
    port = METRICS.serve(0)
    url = f"http://127.0.0.1:{port}/metrics"
    settings = Settings(**EXPECTED_SETTINGS)
    async with ChaosFleet(["healthy", "error500"], pages=30) as fleet:
        bad = fleet.url("error500").split("//", 1)[1].rstrip("/")
        good = fleet.url("healthy").split("//", 1)[1].rstrip("/")
        source = HtmlSource.model_validate(fleet.source("metrics_chaos"))
        seen_open = False
        scrapes: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

        async def scrape_until(done: asyncio.Event) -> None:
            nonlocal seen_open
            async with aiohttp.ClientSession() as http:
                while not done.is_set():
                    async with http.get(url) as resp:
                        samples = _samples(await resp.text())
                    scrapes.append(samples)
                    seen_open = seen_open or _value(samples, "trawl_breakers", host=bad, state="open") == 1
                    await asyncio.sleep(0.05)

        done = asyncio.Event()
        scraper = asyncio.create_task(scrape_until(done))
        try:
            async with Fetcher(settings) as fetcher:
                stager = await asyncio.to_thread(LocalStager, tmp_path / "staging")  # resolves the path
                with contextlib.suppress(SourceFailed):  # the failing host fails the source; that is the point
                    await crawl_source(source, run_id=new_run_id(), settings=settings, fetcher=fetcher, stager=stager)
        finally:
            done.set()
            await scraper

    first, last = scrapes[0], scrapes[-1]
    assert len(scrapes) >= 2
    errors = _value(last, "trawl_requests_total", host=bad, status_class="5xx")
    assert errors > _value(first, "trawl_requests_total", host=bad, status_class="5xx")
    assert errors >= EXPECTED_SETTINGS["breaker_fail_max"]
    assert _value(last, "trawl_requests_total", host=good, status_class="2xx") >= 30
    assert _value(last, "trawl_requests_total", host=good, status_class="5xx") == 0
    assert seen_open, "the failing host's breaker never showed open"
    assert not any(name.endswith("_created") for name, _ in last), "*_created series are off by default"
    assert _value(last, "trawl_breaker_transitions_total", host=bad, state="open") >= 1
    assert _value(last, "trawl_outcomes_total", source="metrics_chaos", outcome="fetched") >= 30
    assert _value(last, "trawl_request_duration_seconds_count", host=good) >= 30


def test_host_labels_are_capped() -> None:
    m = Metrics(max_hosts=2)
    assert [m.host(h) for h in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER_HOST, "a", OTHER_HOST]


def test_breakers_are_counted_per_state_and_capped_hosts_add_up() -> None:
    m = Metrics(max_hosts=1)
    for host in ("a", "b", "c"):
        m.breaker_added(host)
    m.breaker_changed("b", "open")
    m.breaker_changed("c", "open")
    m.breaker_changed("c", "half-open")

    def breakers(host: str, state: str) -> float:
        return m.registry.get_sample_value("trawl_breakers", {"host": host, "state": state}) or 0.0

    assert [breakers("a", s) for s in ("closed", "half-open", "open")] == [1, 0, 0]
    # b and c are both `other`: one open, one half-open, none closed.
    assert [breakers(OTHER_HOST, s) for s in ("closed", "half-open", "open")] == [0, 1, 1]


async def test_a_flow_pushes_its_last_run_and_its_sources_to_their_own_groups(pushgateway: str) -> None:
    settings = Settings(pushgateway_url=pushgateway)
    METRICS.requests.labels("pushed_source", "h", "2xx").inc()  # live: never pushed
    crawled = [
        {"source": "ok_src", "status": "complete", "seconds": 2.5, "pages": 7, "records": 5, "failures": 1},
        {"source": "bad_src", "status": "failed", "seconds": 1.0, "pages": 0, "records": 0, "failures": 3},
    ]

    async with flow_metrics("crawl", settings) as measured:
        measured.failed_sources = 1
        await push_sources(settings, crawled=crawled)

    pushed = _samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics"))
    names = {n for n, _ in pushed if n.startswith("trawl_")}
    assert names <= set(BATCH_SERIES), f"live series pushed: {sorted(names - set(BATCH_SERIES))}"
    assert _value(pushed, "trawl_source_last_crawl_pages", job="trawl", source="ok_src") == 7
    assert _value(pushed, "trawl_source_last_crawl_failed", source="ok_src") == 0
    assert _value(pushed, "trawl_source_last_crawl_failed", source="bad_src") == 1
    assert _value(pushed, "trawl_source_last_success_timestamp_seconds", source="ok_src") > 0
    assert _value(pushed, "trawl_source_last_success_timestamp_seconds", source="bad_src") == 0
    assert _value(pushed, "trawl_flow_last_run_failed", job="trawl", flow="crawl") == 0
    assert _value(pushed, "trawl_flow_last_run_failed_sources", flow="crawl") == 1

    # A later failed crawl of ok_src (with other sources or alone) replaces its values but keeps its last success.
    await push_sources(settings, crawled=[{"source": "ok_src", "status": "failed", "seconds": 1.0}])
    await push_sources(settings, loaded={"ok_src": {"inserted": 4, "updated": 1, "unchanged": 0, "rejected": 2}})
    again = _samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics"))
    assert _value(again, "trawl_source_last_crawl_failed", source="ok_src") == 1
    assert _value(again, "trawl_source_last_success_timestamp_seconds", source="ok_src") == _value(
        pushed, "trawl_source_last_success_timestamp_seconds", source="ok_src"
    )
    assert _value(again, "trawl_source_last_load_rows", source="ok_src", result="inserted") == 4
    assert _value(again, "trawl_source_last_load_failed", source="ok_src") == 0


async def test_the_spool_gauge_is_replaced_by_whoever_changes_the_spool(pushgateway: str) -> None:
    await asyncio.to_thread(push_spool, pushgateway, "/var/spool/x", 3)
    assert _value(_samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics")), "trawl_s3_spooled_parts") == 3
    await asyncio.to_thread(push_spool, pushgateway, "/var/spool/x", 0)
    assert _value(_samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics")), "trawl_s3_spooled_parts") == 0


def test_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "7 rules found" in check.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


# Live counters that move only when a long process commits or loads: a short run's jump is gone before a scrape
# sees it, so the dashboard shows the pushed last-run gauges instead (README, "Metrics").
_NOT_ON_DASHBOARD = {"trawl_s3_uploaded_bytes", "trawl_rows_loaded"}


def _exposed_names() -> set[str]:
    """Every sample name trawl can expose or push (``_total``, ``_bucket``, ... included)."""
    names: set[str] = set(BATCH_SERIES)
    for family in METRICS.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\btrawl_[a-z0-9_]+", expr))


def test_dashboard_and_alerts_only_use_metrics_that_exist() -> None:
    exposed = _exposed_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(_names_in(e) for e in exprs))
    assert used, "the dashboard queries no trawl metric"
    assert used <= exposed, f"dashboard panels use unknown metrics: {sorted(used - exposed)}"
    # Every metric family is on the dashboard somewhere, every pushed series too.
    families = {f.name for f in METRICS.registry.collect()} - _NOT_ON_DASHBOARD
    assert {n for n in families if not any(u.startswith(n) for u in used)} == set()
    assert set(BATCH_SERIES) <= used
    alerts = (PROMETHEUS / "alerts.yml").read_text()
    assert _names_in(alerts) <= exposed, f"alert rules use unknown metrics: {sorted(_names_in(alerts) - exposed)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "trawl"


@pytest.mark.parametrize("behaviour", ["reset", "error500"])
async def test_requests_counted_are_the_requests_the_server_saw(
    behaviour: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request counted per attempt the host sees, retries and robots.txt included (aiohttp resends none)."""
    monkeypatch.setattr(METRICS, "max_hosts", len(METRICS._hosts) + 10)
    settings = Settings(**EXPECTED_SETTINGS)
    async with ChaosFleet([behaviour]) as fleet:
        host = fleet.url(behaviour).split("//", 1)[1].rstrip("/")
        before = METRICS.registry.get_sample_value
        counted_before = sum(
            before("trawl_requests_total", {"source": s, "host": host, "status_class": c}) or 0
            for s in ("-", "counted")
            for c in ("5xx", "error")
        )
        source = HtmlSource.model_validate(fleet.source("counted"))
        async with Fetcher(settings) as fetcher:
            stager = await asyncio.to_thread(LocalStager, tmp_path / "staging")  # resolves the path
            with contextlib.suppress(SourceFailed):  # the host fails every request: the source fails
                await crawl_source(source, run_id=new_run_id(), settings=settings, fetcher=fetcher, stager=stager)
        seen = fleet.totals[behaviour]
        expected = sum(fleet.expected[behaviour].requests.values())
    counted = (
        sum(
            METRICS.registry.get_sample_value("trawl_requests_total", {"source": s, "host": host, "status_class": c})
            or 0
            for s in ("-", "counted")
            for c in ("5xx", "error")
        )
        - counted_before
    )
    assert seen == expected
    assert counted == seen
