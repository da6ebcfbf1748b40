"""The crawl flow's run states through `prefect deployment run`: Failed, Degraded (a named Completed), Completed.

The crawl flow is served (``crawl.serve``) against a throwaway Prefect server;
each run is started with the CLI as a user would, then read back through the API.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tests.helpers.misbehaving import MisbehavingSite
from tests.helpers.net import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENT = "crawl/outcome-states"


@pytest.fixture
def site() -> Iterator[MisbehavingSite]:
    with MisbehavingSite() as s:
        yield s


@pytest.fixture
def served(prefect_api: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """`crawl.serve(...)` in its own process (it runs each flow run in a subprocess); yields the CLI's environment."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))},
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "TRAWL_STAGING": f"file://{tmp_path / 'staging'}",
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        "TRAWL_BACKOFF_BASE": "0.01",
        "TRAWL_BACKOFF_MAX": "0.02",
        "TRAWL_BREAKER_RESET_TIMEOUT": "0.2",
        "TRAWL_SOURCE_LOCK": "off",
    }
    # From its entrypoint, as a deployment of prefect.yaml runs it (the runner loads it in each flow run's process).
    serve = (
        "from prefect import flow; "
        f"flow.from_source(source={str(REPO)!r}, entrypoint='flows/crawl.py:crawl')"
        ".serve(name='outcome-states', print_starting_message=False)"
    )
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", serve], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(15)


def _sources(path: Path, site: MisbehavingSite) -> str:
    ok = site.url("ok")
    mixed = [f"{ok}/ok/1", f"{ok}/ok/2", f"{ok}/bad/1", f"{ok}/bad/2", f"{ok}/bad/3"]  # 3 of 5 fail (404)
    title = {"title": {"selector": "h1"}}
    spec = {
        "sources": [
            {"name": "refused", "kind": "html", "urls": [f"http://127.0.0.1:{free_port()}/page"], "fields": title},
            {
                "name": "strict",
                "kind": "html",
                "urls": mixed,
                "fields": title,
                "robots": False,
                "max_failed_ratio": 0.5,
            },
            {"name": "lenient", "kind": "html", "urls": mixed, "fields": title, "robots": False},
        ]
    }
    # A round trip through JSON: no shared objects, so no YAML aliases (sources files refuse them).
    path.write_text(yaml.safe_dump(json.loads(json.dumps(spec))))
    return str(path)


def _run(env: dict[str, str], params: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    argv = [PREFECT, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params)]
    argv += ["--watch", "--watch-timeout", "180"]
    for _ in range(60):  # the served deployment appears once `serve` has registered it
        run = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
        if "not found" not in (run.stdout + run.stderr).lower():
            return run
        import time

        time.sleep(1)
    raise AssertionError(run.stdout + run.stderr)


async def _state(env: dict[str, str], run: subprocess.CompletedProcess[str]) -> Any:
    from prefect.client.orchestration import PrefectClient

    flow_run_id = next(line.split("UUID:")[1].strip() for line in run.stdout.splitlines() if "UUID:" in line)
    async with PrefectClient(env["PREFECT_API_URL"]) as client:
        flow_run = await client.read_flow_run(UUID(flow_run_id))
    return flow_run.state


async def test_deployment_runs_end_failed_degraded_or_completed(
    served: dict[str, str], site: MisbehavingSite, tmp_path: Path
) -> None:
    path = await asyncio.to_thread(_sources, tmp_path / "sources.yaml", site)

    failed = await asyncio.to_thread(_run, served, {"sources_file": path, "sources": ["refused"]})
    state = await _state(served, failed)
    assert (state.type.value, state.name) == ("FAILED", "Failed"), failed.stdout[-2000:]
    assert state.message.startswith("every source failed (refused: no URL fetched")
    assert failed.returncode != 0

    degraded = await asyncio.to_thread(_run, served, {"sources_file": path, "sources": ["strict", "lenient"]})
    state = await _state(served, degraded)
    assert (state.type.value, state.name) == ("COMPLETED", "Degraded"), degraded.stdout[-2000:]
    assert state.message.startswith("1 of 2 sources failed (strict: 3 of 5 URLs failed")

    completed = await asyncio.to_thread(_run, served, {"sources_file": path, "sources": ["lenient"]})
    state = await _state(served, completed)
    assert (state.type.value, state.name) == ("COMPLETED", "Completed"), completed.stdout[-2000:]
    assert completed.returncode == 0
