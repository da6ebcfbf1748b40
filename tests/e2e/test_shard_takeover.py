"""Lost shards are taken over without a person: a real Prefect server, process workers, `trawl run` as a user runs it.

1. A shard run's process killed with SIGKILL: the worker reports it `Crashed`, the crawl flow takes its leases back
   and starts a replacement at once; the crawl ends `complete` by itself, every page once in the table.
2. A shard run's process and its worker killed together (a machine gone: no state report): its host and URL leases
   expire and the crawl flow's own shard takes the hosts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from tests.helpers.tree import TreeSite

if TYPE_CHECKING:
    from conftest import PrefectStack  # tests/e2e/conftest.py

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAWL = str(Path(sys.executable).parent / "trawl")
PAGES = 1500  # per host
CAP = 2
LEASE = "6"
ENV = {
    "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
    "TRAWL_FRONTIER_CHECKPOINT_SECONDS": "0.5",
    "TRAWL_FRONTIER_LEASE_SECONDS": LEASE,
    "TRAWL_LOG_FORMAT": "json",
}


@pytest.fixture(scope="module")
def workers(prefect_stack: PrefectStack) -> dict[str, Any]:
    """Two process workers, one flow run at a time each (by name: a test takes one away)."""
    return {
        name: prefect_stack.start_worker(name, {**ENV, "PYTHONPATH": str(REPO)}, f"--limit 1 --name {name}")
        for name in ("take-a", "take-b")
    }


def _processes_of(flow_run_id: str) -> list[int]:
    """Processes running a flow run (the process worker gives each its id in PREFECT__FLOW_RUN_ID)."""
    mark = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


async def _start(stack: PrefectStack, site: TreeSite, tmp: Path, name: str) -> tuple[asyncio.subprocess.Process, Path]:
    sources = tmp / f"{name}.yaml"
    spec = {
        "sources": [
            {
                "name": name,
                "kind": "html",
                "shards": 2,
                "start_urls": [f"http://{h}:{site.port}/p/0" for h in site.hosts],
                "follow": {"allow": [r"/p/\d+$"], "max_depth": 100},
                "key": ["host", "n"],
                "fields": {"n": {"selector": "h1.n", "type": "int", "required": True}, "host": {"selector": "p.host"}},
                "politeness": {"concurrency": CAP},
                "robots": False,
            }
        ]
    }
    await asyncio.to_thread(sources.write_text, yaml.safe_dump(spec))
    env = {
        **stack.env,
        **ENV,
        "PYTHONPATH": str(REPO),
        "TRAWL_DATABASE_URL": stack.database_url,
        "TRAWL_STAGING": f"file://{stack.staging}",
    }
    log = tmp / f"{name}.log"
    out = await asyncio.to_thread(log.open, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            TRAWL, "run", str(sources), env=env, cwd=REPO, stdout=out, stderr=out
        )
    finally:
        out.close()
    return proc, log


async def _shard_run(stack: PrefectStack, name: str, within: float = 90) -> Any:
    """The first shard run of source ``name`` once it is running and has a process."""
    deadline = time.monotonic() + within
    async with PrefectClient(stack.api) as client:
        while time.monotonic() < deadline:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{name}-")))
            running = [r for r in runs if r.state is not None and r.state.is_running()]
            if running and await asyncio.to_thread(_processes_of, str(running[0].id)):
                return running[0]
            await asyncio.sleep(0.5)
    raise AssertionError(f"no shard run of {name} started")


async def _finish(
    proc: asyncio.subprocess.Process, log: Path, watch: str, within: float = 240
) -> tuple[list[dict[str, Any]], float | None]:
    """Wait for ``trawl run`` to end; its JSON log lines, and when (wall clock) the text ``watch`` first appeared."""
    deadline = time.monotonic() + within
    seen: float | None = None
    while proc.returncode is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"trawl run did not finish: {(await asyncio.to_thread(log.read_text))[-3000:]}")
        if seen is None and watch in await asyncio.to_thread(log.read_text, errors="replace"):
            seen = time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.2)
    text = await asyncio.to_thread(log.read_text, errors="replace")
    assert proc.returncode == 0, text[-4000:]
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(orjson.loads(line))
    return [x for x in lines if isinstance(x, dict)], seen


async def _well_into(stack: PrefectStack, site: TreeSite, name: str) -> None:
    """Until a quarter of the pages are fetched and shard 1 holds hosts it has checkpointed (at most a minute)."""
    deadline = time.monotonic() + 60
    conn = await asyncpg.connect(stack.database_url)
    try:
        while time.monotonic() < deadline:
            held = await conn.fetchval(
                "SELECT count(*) FROM trawl._frontier_hosts h JOIN trawl._frontier_shards s "
                "ON s.run_id = h.run_id AND s.source = h.source AND s.owner = h.owner "
                "WHERE h.source = $1 AND s.shard = 1 AND h.state <> '{}'::jsonb",
                name,
            )
            if held and len(site.requests) >= PAGES:
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise AssertionError("shard 1 never held a host")


async def _check_data(stack: PrefectStack, site: TreeSite, name: str) -> None:
    total = PAGES * len(site.hosts)
    assert set(site.requests) == {f"{h}:{site.port}/p/{n}" for h in site.hosts for n in range(PAGES)}
    assert max(site.max_inflight.values()) <= CAP, site.max_inflight  # the cap held while hosts moved
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM trawl.{name}") == total
        assert await conn.fetchval(f"SELECT count(DISTINCT _key) FROM trawl.{name}") == total
        # One outcome per URL in the table after the load, however often a URL was fetched.
        got = await conn.fetch(
            "SELECT url, count(*) AS n FROM trawl._outcomes WHERE source = $1 GROUP BY url HAVING count(*) > 1", name
        )
        assert not got, got[:5]
        assert await conn.fetchval("SELECT count(*) FROM trawl._outcomes WHERE source = $1", name) == total
    finally:
        await conn.close()


async def test_crashed_shard_is_replaced_at_once(
    prefect_stack: PrefectStack, workers: dict[str, Any], tmp_path: Path
) -> None:
    stack = prefect_stack
    hosts = [f"127.0.0.{i}" for i in range(81, 85)]
    async with TreeSite(hosts, pages=PAGES, delay=0.01, own_tree=True) as site:
        proc, log = await _start(stack, site, tmp_path, "crashy")
        run = await _shard_run(stack, "crashy")
        await _well_into(stack, site, "crashy")
        for pid in await asyncio.to_thread(_processes_of, str(run.id)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        lines, replaced_at = await _finish(proc, log, '"event": "shard replaced"')
        await _check_data(stack, site, "crashy")
    replaced = [x for x in lines if x.get("event") == "shard replaced"]
    assert replaced and replaced[0]["state"] in ("Crashed", "Failed"), replaced
    assert replaced_at is not None
    print(
        f"kill -9 → replacement started: {replaced_at - killed:.1f} s "
        f"(from Prefect's {replaced[0]['state']} state: {replaced[0]['takeover_s']} s)"
    )
    assert replaced_at - killed < 30
    assert next(x for x in lines if x.get("event") == "crawl finished")["failed"] == []


async def test_vanished_machine_leases_expire_and_are_taken_over(
    prefect_stack: PrefectStack, workers: dict[str, Any], tmp_path: Path
) -> None:
    stack = prefect_stack
    hosts = [f"127.0.0.{i}" for i in range(85, 89)]
    async with TreeSite(hosts, pages=PAGES, delay=0.01, own_tree=True) as site:
        proc, log = await _start(stack, site, tmp_path, "vanish")
        run = await _shard_run(stack, "vanish")
        await _well_into(stack, site, "vanish")
        # The worker that runs it goes with it, as a machine would: nobody reports the run's end.
        logs = {n: await asyncio.to_thread(stack.log, n) for n in workers}
        name = next(n for n in workers if str(run.id) in logs[n])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(workers[name].pid, signal.SIGKILL)
        for pid in await asyncio.to_thread(_processes_of, str(run.id)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.time()
        lines, moved_at = await _finish(proc, log, '"moved": ["')
        await _check_data(stack, site, "vanish")
    moved = [x for x in lines if x.get("event") == "hosts leased" and x.get("moved")]
    assert moved, "the crawl flow's shard took hosts over, with what shard 1 had learned of them"
    assert any(x.get("event", "").startswith("shard run lost") for x in lines)
    assert moved_at is not None
    print(f"machine gone → its hosts taken over after {moved_at - killed:.1f} s (lease {LEASE} s): {moved[0]['moved']}")
    assert moved_at - killed < 60
    async with PrefectClient(stack.api) as client:
        lost = await client.read_flow_run(run.id)
    assert lost.state is not None and lost.state.name == "Crashed"
