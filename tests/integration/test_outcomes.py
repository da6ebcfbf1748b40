"""One status per source, decided once: the flows' states, the exit code and the pushed metrics follow it.

A source fails when it fetched nothing and some URL failed, or when more of its URLs
failed than its ``max_failed_ratio`` allows; the crawl flow then ends ``Failed`` (every
source failed), ``Degraded`` (some did) or ``Completed``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from aiohttp import web
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows._common import flow_result
from flows.crawl import crawl
from tests.helpers.net import free_port
from tests.helpers.prometheus import get, samples, value
from trawl.cli import main

pytestmark = [pytest.mark.integration]

FIELDS = {"title": {"selector": "h1"}}


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """``/ok/N``: a page with an h1; ``/bad/N``: 404."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=f"<h1>page {request.match_info['n']}</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/ok/{n}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _sources(path: Path, site: str | None) -> Path:
    dead = free_port("127.0.0.1")  # nothing listens there: every connection is refused
    mixed = [f"{site}/ok/1", f"{site}/ok/2", f"{site}/bad/1", f"{site}/bad/2", f"{site}/bad/3"] if site else []
    spec: dict[str, Any] = {
        "sources": [
            # Nothing listens: robots.txt and the page fail to connect.
            {"name": "refused", "kind": "html", "urls": [f"http://127.0.0.1:{dead}/page"], "fields": FIELDS},
            # 3 of 5 URLs fail (404): 60%.
            {
                "name": "strict",
                "kind": "html",
                "urls": mixed,
                "fields": FIELDS,
                "robots": False,
                "max_failed_ratio": 0.5,
            },
            {
                "name": "lenient",
                "kind": "html",
                "urls": mixed,
                "fields": FIELDS,
                "robots": False,
                "max_failed_ratio": 0.7,
            },
        ]
    }
    if not site:
        spec["sources"] = spec["sources"][:1]
    # A round trip through JSON: no shared objects, so no YAML aliases (sources files refuse them).
    path.write_text(yaml.safe_dump(json.loads(json.dumps(spec))))
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, prefect_api: str, pushgateway: str, tmp_path: Path) -> str:
    """The flows' settings from the environment; returns the Pushgateway's URL."""
    monkeypatch.setenv("TRAWL_STAGING", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("TRAWL_BACKOFF_MAX", "0.02")
    monkeypatch.setenv("TRAWL_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("TRAWL_BREAKER_RESET_TIMEOUT", "0.2")
    monkeypatch.setenv("TRAWL_PUSHGATEWAY_URL", pushgateway)
    return pushgateway


async def _task_states(flow_run_id: str) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return {r.name: r.state.type.value for r in runs if r.state is not None}


async def test_a_source_whose_only_host_refuses_fails_the_task_the_run_and_gets_no_last_success(
    env: str, tmp_path: Path
) -> None:
    path = await asyncio.to_thread(_sources, tmp_path / "sources.yaml", None)

    state = await crawl(str(path), sources=["refused"], return_state=True)

    assert state.is_failed(), (state.name, state.message)
    assert state.message is not None and state.message.startswith("every source failed (refused: no URL fetched")
    result = await flow_result(state)
    (refused,) = result["sources"]
    assert refused["status"] == "failed"
    # Its robots.txt is unreachable too: the page is not requested (or skipped by the breaker) either way.
    assert refused["error"].startswith("no URL fetched, 1 of 1 failed; most often "), refused["error"]
    assert "127.0.0.1" in refused["error"]
    assert (await _task_states(result["flow_run_id"]))["crawl-refused"] == "FAILED"
    pushed = samples(await asyncio.to_thread(get, f"{env}/metrics"))
    assert value(pushed, "trawl_source_last_crawl_failed", job="trawl", source="refused") == 1
    assert value(pushed, "trawl_source_last_crawl_finished_timestamp_seconds", source="refused") > 0
    assert not any(n == "trawl_source_last_success_timestamp_seconds" for n, _ in pushed)
    assert value(pushed, "trawl_flow_last_run_failed", flow="crawl") == 1


async def test_over_max_failed_ratio_fails_under_it_completes_and_the_run_is_degraded(
    env: str, site: str, tmp_path: Path
) -> None:
    path = await asyncio.to_thread(_sources, tmp_path / "sources.yaml", site)

    state = await crawl(str(path), sources=["strict", "lenient"], return_state=True)

    assert state.is_completed() and state.name == "Degraded"
    assert state.message is not None and state.message.startswith("1 of 2 sources failed (strict: 3 of 5 URLs failed")
    result = await flow_result(state)
    by_name = {s["source"]: s for s in result["sources"]}
    assert by_name["lenient"]["status"] == "complete" and by_name["lenient"]["error"] is None
    assert by_name["strict"]["status"] == "failed"
    assert "3 of 5 URLs failed (60%, above max_failed_ratio 0.5)" in by_name["strict"]["error"]
    assert "most often failed: HTTP 404" in by_name["strict"]["error"] or "404" in by_name["strict"]["error"]
    tasks = await _task_states(result["flow_run_id"])
    assert (tasks["crawl-strict"], tasks["crawl-lenient"]) == ("FAILED", "COMPLETED")
    pushed = samples(await asyncio.to_thread(get, f"{env}/metrics"))
    assert value(pushed, "trawl_source_last_crawl_failed", source="strict") == 1
    assert value(pushed, "trawl_source_last_crawl_failed", source="lenient") == 0
    assert value(pushed, "trawl_source_last_success_timestamp_seconds", source="lenient") > 0
    assert value(pushed, "trawl_source_last_success_timestamp_seconds", source="strict") == 0
    assert value(pushed, "trawl_source_last_crawl_pages", source="lenient") == 2
    assert value(pushed, "trawl_source_last_crawl_failures", source="lenient") == 3
    assert value(pushed, "trawl_flow_last_run_failed", flow="crawl") == 0
    assert value(pushed, "trawl_flow_last_run_failed_sources", flow="crawl") == 1

    alone = await crawl(str(path), sources=["lenient"], return_state=True)
    assert alone.is_completed() and alone.name == "Completed"


@pytest.mark.usefixtures("restore_logging")
def test_the_cli_exits_1_when_the_refused_source_fails(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # main() sets them: restored after the test
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("TRAWL_BACKOFF_MAX", "0.02")
    monkeypatch.setenv("TRAWL_BREAKER_RESET_TIMEOUT", "0.2")
    path = _sources(tmp_path / "sources.yaml", None)

    code = main(["crawl", str(path), "--staging", f"file://{tmp_path / 'staging'}", "--log-format", "json"])

    # Prefect's sync client (the CLI's flows, on their own loop) leaves a socket to the test server unclosed;
    # collected here, it meets the `prefect_api` fixture's filter for that port, not pytest's at session end.
    gc.collect()
    out = capsys.readouterr().out
    assert code == 1, out[-2000:]
    row = next(line.split() for line in out.splitlines() if line.startswith("refused "))
    assert row[1] == "failed"
    assert "refused: no URL fetched" in out
