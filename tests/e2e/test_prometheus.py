"""trawl under a real Prometheus and Pushgateway (Debian's), as an operator runs it.

Prometheus scrapes the live endpoint of each `trawl` process (``--metrics-port``)
and the Pushgateway its jobs push to, with the shipped alert rules (only their
``for:`` shortened). Over local misbehaving servers: the 5xx, slow and breaker
alerts fire during the run and resolve once the process is gone; a failed source
fires TrawlRunFailed until a later good run of it; the spool alert clears after
``trawl stage resume``; every dashboard panel shows a real number after the run
that should produce it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TcpProxy
from tests.helpers.misbehaving import MisbehavingSite
from tests.helpers.net import free_port
from tests.helpers.prometheus import get, start, tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAWL = str(Path(sys.executable).parent / "trawl")
SLOW_PAGES = 6  # 6-8 s each, two at a time: ~20 s of crawling


@pytest.fixture
def site() -> Iterator[MisbehavingSite]:
    with MisbehavingSite() as s:
        yield s


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def _api(self, path: str, **params: str) -> Any:
        body = json.loads(get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    async def firing(self) -> set[tuple[str, str]]:
        """(alertname, source-or-host-or-flow) of the alerts firing now."""
        data = await asyncio.to_thread(self._api, "alerts")
        return {
            (
                a["labels"]["alertname"],
                a["labels"].get("source") or a["labels"].get("host") or a["labels"].get("flow", ""),
            )
            for a in data["alerts"]
            if a["state"] == "firing"
        }

    async def max_over(self, expr: str, start: float) -> float:
        """The largest value ``expr`` took from ``start`` until now (NaN-free; 0 if it had none)."""
        data = await asyncio.to_thread(
            self._api, "query_range", query=expr, start=f"{start:.3f}", end=f"{time.time():.3f}", step="1"
        )
        values = [float(v) for series in data["result"] for _, v in series["values"]]
        return max((v for v in values if not math.isnan(v)), default=0.0)


@pytest.fixture
def prometheus(tmp_path: Path, pushgateway: str) -> Iterator[tuple[Prometheus, int]]:
    """Prometheus scraping the trawl endpoint (a fixed free port) and the Pushgateway every second, with the shipped
    rules with `for:` shortened; yields it and the port trawl serves its metrics on."""
    metrics_port = free_port()
    shipped = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    (tmp_path / "rules.yml").write_text(re.sub(r"for: \d+m", "for: 1s", shipped))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {"job_name": "trawl", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "static_configs": [{"targets": [pushgateway.removeprefix("http://")]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}/-/ready",
    )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}"), metrics_port
    finally:
        proc.terminate()
        proc.wait(10)


def _sources(path: Path, site: MisbehavingSite, *, dead_fixed: bool = False) -> Path:
    ok, err, slow = site.url("ok"), site.url("err"), site.url("slow")
    dead = f"{ok}/ok/dead" if dead_fixed else f"http://127.0.0.24:{free_port('127.0.0.24')}/page"
    title = {"title": {"selector": "h1"}}
    spec = {
        "sources": [
            # 20 good pages and 4 that answer 500 (retried; they open err's breaker).
            {
                "name": "flaky",
                "kind": "html",
                "urls": [f"{ok}/ok/{i}" for i in range(20)] + [f"{err}/e/{i}" for i in range(4)],
                "fields": title,
                "robots": False,
            },
            {
                "name": "slow",
                "kind": "html",
                "urls": [f"{slow}/slow/{i}" for i in range(SLOW_PAGES)],
                "fields": title,
                "politeness": {"concurrency": 2},
            },
            # Each page's first request is refused 429 + Retry-After: the host slows down (throttle panels).
            {
                "name": "throttled",
                "kind": "html",
                "urls": [f"{site.url('throttle')}/t/{i}" for i in range(6)],
                "fields": title,
                "robots": False,
                # One at a time, a second apart (TRAWL_BACKOFF_MAX caps the pauses at 0.2 s here): the refusals
                # come over several scrapes, so rate() has an increase to see.
                "politeness": {"concurrency": 1, "delay": 1.0},
            },
            # Nothing listens: robots.txt and the page fail to connect; it fetches nothing.
            {"name": "dead", "kind": "html", "urls": [dead], "fields": title},
            # Every record is rejected ("page N" is no int): its load fails.
            {
                "name": "rejecting",
                "kind": "html",
                "urls": [f"{ok}/ok/{i}" for i in range(3)],
                "fields": {"n": {"selector": "h1", "type": "int", "required": True}},
            },
        ]
    }
    # A round trip through JSON: no shared objects, so no YAML aliases (sources files refuse them).
    path.write_text(yaml.safe_dump(json.loads(json.dumps(spec))))
    return path


async def _trawl(env: dict[str, str], *args: str, prometheus: Prometheus | None = None) -> tuple[str, set[Any]]:
    """Run `trawl ARGS` to its end; the alerts seen firing meanwhile (when ``prometheus`` is given)."""
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [TRAWL, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: set[Any] = set()
    reader = asyncio.create_task(asyncio.to_thread(proc.communicate, timeout=240))
    while not reader.done():
        if prometheus is not None:
            seen |= await prometheus.firing()
        await asyncio.sleep(0.5)
    out, _ = await reader
    return out, seen


async def _eventually(check: Any, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)


@pytest.fixture
def env(
    prefect_api: str, pushgateway: str, database_url: str, tmp_path: Path, s3_bucket: str, s3_proxy: TcpProxy
) -> dict[str, str]:
    """The environment of the `trawl` processes (after `s3_bucket` has put AWS credentials in ours)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))},
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "TRAWL_LOG_FORMAT": "json",
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        "TRAWL_PUSHGATEWAY_URL": pushgateway,
        "TRAWL_DATABASE_URL": database_url,
        "TRAWL_STAGING": f"file://{tmp_path / 'staging'}",
        "TRAWL_BACKOFF_BASE": "0.05",
        "TRAWL_BACKOFF_MAX": "0.2",
        "TRAWL_BREAKER_RESET_TIMEOUT": "4",
        "TRAWL_CONNECT_TIMEOUT": "2",
        "TRAWL_REJECT_MIN_ROWS": "1",
        "TRAWL_SOURCE_LOCK": "off",
        "TRAWL_S3_ENDPOINT_URL": s3_proxy.url,
        "TRAWL_S3_ADDRESSING_STYLE": "path",
        "TRAWL_S3_SPOOL_DIR": str(tmp_path / "spool"),
        "TRAWL_S3_MAX_ATTEMPTS": "2",
        "TRAWL_S3_CONNECT_TIMEOUT": "1",
        "TRAWL_S3_BACKOFF_BASE": "0.05",
        "TRAWL_S3_BACKOFF_MAX": "0.2",
        "TRAWL_S3_COMMIT_TIMEOUT": "5",
    }


async def test_alerts_fire_during_the_run_resolve_after_it_and_every_panel_shows_numbers(
    site: MisbehavingSite,
    prometheus: tuple[Prometheus, int],
    env: dict[str, str],
    s3_bucket: str,
    s3_proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    prom, metrics_port = prometheus
    began = time.time()
    sources = await asyncio.to_thread(_sources, tmp_path / "sources.yaml", site)
    err_host = site.url("err").removeprefix("http://")

    # 1. The pipeline over the misbehaving hosts: live alerts fire while it runs.
    out, seen = await _trawl(env, "run", str(sources), "--metrics-port", str(metrics_port), prometheus=prom)
    assert "flaky" in out and "run " in out, out[-3000:]
    live = {("TrawlHigh5xxRate", "flaky"), ("TrawlSlowRequests", "slow"), ("TrawlBreakerOpen", err_host)}
    assert live <= seen, f"seen firing during the run: {sorted(seen)}\n{out[-3000:]}"

    # ... and are not firing 30 s after the process exited (nothing pushed keeps them).
    await asyncio.sleep(30)
    firing = await prom.firing()
    assert not live & firing, sorted(firing)
    # The pushed outcome of the run: "dead" fetched nothing, "rejecting"'s load failed.
    assert {("TrawlRunFailed", "dead"), ("TrawlRunFailed", "rejecting")} <= firing, sorted(firing)
    assert not {("TrawlRunFailed", s) for s in ("flaky", "slow", "throttled")} & firing, sorted(firing)

    # 2. A later good crawl of "dead" (with another source) clears its alert; "rejecting"'s failed load stays.
    fixed = await asyncio.to_thread(_sources, tmp_path / "fixed.yaml", site, dead_fixed=True)
    out, _ = await _trawl(env, "crawl", str(fixed), "--source", "dead", "--source", "flaky")
    assert re.search(r"^dead\s+complete", out, re.M), out[-3000:]

    async def dead_cleared() -> None:
        firing = await prom.firing()
        assert ("TrawlRunFailed", "dead") not in firing and ("TrawlRunFailed", "rejecting") in firing, firing

    await _eventually(dead_cleared)

    # 3. S3 down at the end of a crawl: the parts wait in the spool, the spool alert fires; resumed, it clears.
    staging = f"s3://{s3_bucket}/e2e"
    s3_proxy.cut()
    out, _ = await _trawl(
        env, "crawl", str(fixed), "--source", "rejecting", "--staging", staging, "--metrics-port", str(metrics_port)
    )
    run_id = next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("run "))

    async def spooling() -> None:
        firing = await prom.firing()
        assert ("TrawlS3Spooling", "") in firing and ("TrawlFlowFailed", "crawl") in firing, firing

    await _eventually(spooling)
    s3_proxy.restore()
    out, _ = await _trawl(env, "stage", "resume", run_id, "--staging", staging)
    assert "committed" in out or "uploaded" in out, out[-3000:]

    async def spool_cleared() -> None:
        assert ("TrawlS3Spooling", "") not in await prom.firing()

    await _eventually(spool_cleared)

    # 4. Every dashboard panel's query had a real number after the run that should produce it.
    dashboard = json.loads(await asyncio.to_thread((REPO / "deploy" / "grafana" / "trawl.json").read_text))
    zero = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if await prom.max_over(target["expr"], began) <= 0:
                zero.append(f"{panel['title']}: {target['expr']}")
    assert not zero, "panels that never showed a number:\n" + "\n".join(zero)
