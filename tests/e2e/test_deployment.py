"""trawl as a Prefect deployment: a real server, `make deploy`, `make worker`, `prefect deployment run`.

One server and one worker for the module (they take ~20 s to come up): the demo
pipeline is run through them, then read back through the Prefect API, the UI
(headless Chromium) and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from trawl.demo.site import ITEM_COUNT, PRODUCT_COUNT, DemoSiteThread

if TYPE_CHECKING:
    from conftest import PrefectStack  # tests/e2e/conftest.py

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
ARTIFACTS = REPO / ".trawl" / "test-artifacts"


@dataclass
class Stack:
    """The module's Prefect stack, the demo site its worker crawls, and where the worker logs."""

    api: str
    ui: str
    env: dict[str, str]
    staging: Path
    database_url: str
    site: DemoSiteThread
    logs: Path
    prefect_stack: PrefectStack

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.prefect_stack.prefect(*args, timeout=timeout)


@pytest.fixture(scope="module")
def stack(prefect_stack: PrefectStack) -> Iterator[Stack]:
    """The stack plus the demo site and one worker whose environment points flow runs at them."""
    site = DemoSiteThread()
    site.start()
    try:
        ps = prefect_stack
        ps.start_worker("worker", {"TRAWL_DEMO_URL": site.url, "TRAWL_BACKOFF_BASE": "0.01"})
        yield Stack(ps.api, ps.ui, ps.env, ps.staging, ps.database_url, site, ps.logs, ps)
    finally:
        site.stop()


@contextlib.asynccontextmanager
async def _client(stack: Stack) -> AsyncIterator[Any]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(stack.api) as client:
        yield client


async def _flow_run(stack: Stack, deployment: str, run: subprocess.CompletedProcess[str]) -> Any:
    """The newest flow run of a deployment (``prefect deployment run`` prints its id, we read it back)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    flow_name, name = deployment.split("/")
    async with _client(stack) as client:
        dep = await client.read_deployment_by_name(f"{flow_name}/{name}")
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
    assert runs, run.stdout + run.stderr
    return runs[0]


@pytest.fixture(scope="module")
def demo_run(stack: Stack) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`prefect deployment run 'pipeline/demo' --watch`, once for the module."""
    run = stack.prefect("deployment", "run", "pipeline/demo", "--watch", "--watch-timeout", "400", timeout=460)
    return run, asyncio.run(_flow_run(stack, "pipeline/demo", run))


def _worker_log(stack: Stack) -> str:
    return (stack.logs / "worker.log").read_text(errors="replace")[-5000:]


async def test_deployment_run_completes_and_loads_the_demo(
    stack: Stack, demo_run: tuple[subprocess.CompletedProcess[str], Any]
) -> None:
    run, flow_run = demo_run
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- worker:\n{_worker_log(stack)}"
    assert flow_run.state.is_completed(), flow_run.state

    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM trawl.products") == PRODUCT_COUNT
        assert await conn.fetchval("SELECT count(*) FROM trawl.items") == ITEM_COUNT
    finally:
        await conn.close()


async def test_deployment_run_has_artifacts_subflows_tasks_and_logs(
    stack: Stack, demo_run: tuple[subprocess.CompletedProcess[str], Any]
) -> None:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    _, flow_run = demo_run
    async with _client(stack) as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
        )
        ids = [flow_run.id, *(c.id for c in children)]
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        expected = {"crawl-products", "crawl-items", "load-products-raw-part-1", "load-items-raw-part-1"}
        # Task runs and logs reach the API from the worker's events and log shipping: poll a moment for them.
        for _ in range(60):
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            if expected <= {t.name for t in tasks} and any("source finished" in log.message for log in logs):
                break
            await asyncio.sleep(0.5)
        flows = {f.id: f.name for f in await client.read_flows()}

    assert sorted(flows[c.flow_id] for c in children) == ["crawl", "load"]
    names = {t.name for t in tasks}
    assert expected <= names

    by_key = {a.key: a for a in artifacts}
    assert {"trawl-run-summary", "trawl-crawl-progress", "trawl-staged-run", "trawl-top-errors"} <= set(by_key)
    summary = str(by_key["trawl-run-summary"].data)
    row = next(line for line in summary.splitlines() if line.startswith("| products "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["products", "complete", "1260", str(PRODUCT_COUNT), "0", "1260"]
    assert by_key["trawl-crawl-progress"].data == 100.0

    # trawl's own structlog events reach the Prefect run log (PREFECT_LOGGING_EXTRA_LOGGERS in prefect.yaml).
    messages = [log.message for log in logs]
    assert any("source finished" in m and "products" in m for m in messages), messages[:20]


async def test_the_ui_shows_the_run_summary(
    stack: Stack, demo_run: tuple[subprocess.CompletedProcess[str], Any], tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, flow_run = demo_run
    async with _client(stack) as client:
        [summary] = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trawl-run-summary"])), limit=1
        )
    assert summary.flow_run_id == flow_run.id
    chromium = os.environ.get("TRAWL_BROWSER_PATH") or "/usr/lib/chromium/chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1600, "height": 1200})
            await page.goto(f"{stack.ui}/runs/flow-run/{flow_run.id}", wait_until="networkidle")
            await page.locator("li.p-tab", has_text="Artifacts").click()
            # The run's artifact cards; the summary card opens the rendered markdown.
            await page.get_by_text("trawl-run-summary", exact=True).last.click()
            shot = tmp_path / "prefect-ui-flow-run.png"
            try:
                table = page.locator("table", has_text="products").first
                await table.wait_for(timeout=30_000)
                text = await table.inner_text()
            finally:  # the picture is most useful when the table is not there
                await page.screenshot(path=str(shot), full_page=True)
                html = await page.content()

                def keep() -> None:
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    shutil.copy(shot, ARTIFACTS / shot.name)
                    (ARTIFACTS / "prefect-ui-flow-run.html").write_text(html)

                await asyncio.to_thread(keep)
        finally:
            await browser.close()
    assert "products" in text and str(PRODUCT_COUNT) in text and "items" in text


async def test_invalid_parameters_are_refused_before_any_crawling(
    stack: Stack, demo_run: tuple[subprocess.CompletedProcess[str], Any]
) -> None:
    # A malformed staging URL: the server checks the parameter schema and creates no run at all.
    bad_staging = await asyncio.to_thread(
        stack.prefect, "deployment", "run", "pipeline/demo", "--param", "staging=ftp://example.com/x"
    )
    assert bad_staging.returncode != 0
    assert "staging" in bad_staging.stdout + bad_staging.stderr

    # An unknown source: the run starts and fails at once, naming the parameter, before any request.
    requests_before = sum(stack.site.requests.values())
    unknown = await asyncio.to_thread(
        stack.prefect,
        "deployment",
        "run",
        "pipeline/demo",
        "--param",
        'sources=["nope"]',
        "--watch",
        "--watch-timeout",
        "300",
    )
    flow_run = await _flow_run(stack, "pipeline/demo", unknown)
    assert flow_run.state.is_failed(), flow_run.state
    assert "parameter 'sources'" in (flow_run.state.message or "") + unknown.stdout
    assert sum(stack.site.requests.values()) == requests_before
