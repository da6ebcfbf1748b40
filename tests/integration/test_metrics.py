"""Observability: the metrics endpoint during a chaos crawl, the Pushgateway, alert rules, the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flows._common import flow_metrics
from sinks.stage import LocalStager
from tests.helpers.chaos import EXPECTED_SETTINGS, ChaosFleet
from tests.helpers.net import free_port
from trawl.config import HtmlSource
from trawl.crawler import crawl_source, new_run_id
from trawl.errors import SourceFailed
from trawl.fetch import Fetcher
from trawl.metrics import METRICS, OTHER_HOST, Metrics
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "trawl.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs Debian's prometheus and prometheus-pushgateway"
    return path


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


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
                    seen_open = seen_open or _value(samples, "trawl_breaker_state", host=bad) == 2
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
    assert seen_open, "the failing host's breaker gauge never showed open (2)"
    assert _value(last, "trawl_breaker_transitions_total", host=bad, state="open") >= 1
    assert _value(last, "trawl_outcomes_total", source="metrics_chaos", outcome="fetched") >= 30
    assert _value(last, "trawl_request_duration_seconds_count", host=good) >= 30


def test_host_labels_are_capped() -> None:
    m = Metrics(max_hosts=2)
    assert [m.host(h) for h in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER_HOST, "a", OTHER_HOST]


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        # Debian's build keeps its groups in /var/lib/prometheus by default: each test starts empty.
        [
            _tool("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp_path / 'pushgateway.data'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_flow_end_pushes_to_the_pushgateway(pushgateway: str) -> None:
    settings = Settings(pushgateway_url=pushgateway)
    METRICS.outcomes.labels("pushed_source", "fetched").inc(3)

    async with flow_metrics("crawl", settings, "pushed_source") as measured:
        measured.failed = True

    samples = _samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics"))
    group = {"job": "trawl", "entry_flow": "crawl", "scope": "pushed_source"}
    assert _value(samples, "trawl_outcomes_total", source="pushed_source", outcome="fetched", **group) == 3
    assert _value(samples, "trawl_run_failed", flow="crawl", **group) == 1
    assert _value(samples, "trawl_runs_total", flow="crawl", status="failed", **group) >= 1


async def test_a_pipeline_pushes_once_with_its_subflows_series(pushgateway: str) -> None:
    """As `trawl run` does: crawl and load inside the pipeline, one process, one push at the very end."""
    settings = Settings(pushgateway_url=pushgateway)
    async with flow_metrics("pipeline", settings, "nested_source"):
        async with flow_metrics("crawl", settings, "nested_source"):
            pass
        pushed_early = _samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics"))
        async with flow_metrics("load", settings, "nested_source") as load:
            load.failed = True

    assert not any(("scope", "nested_source") in labels for _, labels in pushed_early), "a subflow pushed"
    samples = _samples(await asyncio.to_thread(_get, f"{pushgateway}/metrics"))
    group = {"job": "trawl", "entry_flow": "pipeline", "scope": "nested_source"}
    assert _value(samples, "trawl_run_failed", flow="load", **group) == 1
    for flow in ("crawl", "pipeline"):
        assert _value(samples, "trawl_runs_total", flow=flow, status="completed", **group) >= 1
        assert _value(samples, "trawl_run_failed", flow=flow, **group) == 0
    assert _value(samples, "trawl_runs_total", flow="load", status="failed", **group) >= 1


def test_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6 rules found" in check.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _exposed_names() -> set[str]:
    """Every sample name the registry can expose (``_total``, ``_bucket``, ... included)."""
    names: set[str] = set()
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
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(_names_in(e) for e in exprs))
    assert used, "the dashboard queries no trawl metric"
    assert used <= exposed, f"dashboard panels use unknown metrics: {sorted(used - exposed)}"
    # Every metric family is on the dashboard somewhere.
    families = {f.name for f in METRICS.registry.collect()}
    assert {n for n in families if not any(u.startswith(n) for u in used)} == set()
    alerts = (PROMETHEUS / "alerts.yml").read_text()
    assert _names_in(alerts) <= exposed, f"alert rules use unknown metrics: {sorted(_names_in(alerts) - exposed)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "trawl"
