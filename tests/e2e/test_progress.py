"""Progress you can see: `trawl crawl` on a pseudo-terminal redraws a live view and leaves it above the summary;
without a terminal it logs a progress line per source every TRAWL_PROGRESS_INTERVAL seconds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers.sitemap_site import SitemapSite

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKTREE = Path(__file__).resolve().parents[2]


def _sources(site: SitemapSite, n: int) -> str:
    urls = "\n".join(f"      - {site.url}/item/{i}" for i in range(n))
    return (
        "sources:\n  - kind: html\n    name: items\n    robots: false\n    politeness: {concurrency: 2}\n"
        f"    fields: {{title: {{selector: h1}}}}\n    urls:\n{urls}\n"
    )


def _env(tmp_path: Path, prefect_api: str, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))}
    return {
        **keep,
        "PYTHONPATH": str(WORKTREE),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "TRAWL_STAGING": f"file://{tmp_path / 'staging'}",
        "TRAWL_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        **extra,
    }


async def _write(path: Path, text: str) -> None:
    await asyncio.to_thread(path.write_text, text)


async def test_a_terminal_shows_the_live_view_updating_then_the_summary(tmp_path: Path, prefect_api: str) -> None:
    async with SitemapSite(0) as site:
        site.delay = 0.2
        spec = tmp_path / "sources.yaml"
        await _write(spec, _sources(site, 40))
        master, slave = os.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trawl.cli",
            "crawl",
            str(spec),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=_env(tmp_path, prefect_api, TERM="xterm", COLUMNS="120"),
            cwd=WORKTREE,
        )
        os.close(slave)
        chunks: list[bytes] = []

        def read_all() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = asyncio.create_task(asyncio.to_thread(read_all))
        assert await asyncio.wait_for(proc.wait(), 180) == 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 10)
        os.close(master)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    views = re.findall(r"items\s+(running|complete)\s+(\d+)/(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+) pages/s", screen)
    running = [int(done) for status, done, *_ in views if status == "running"]
    # Redrawn while the crawl ran, counting up; then the final state stays on screen.
    assert len(set(running)) >= 3, views
    assert running == sorted(running)
    assert views[-1][:5] == ("complete", "40", "40", "40", "0")
    last_view = screen.rindex("complete  40/40")
    summary = re.search(r"source\s+status\s+pages\s+records\s+rejects\s+failures\s+seconds", screen)
    assert summary is not None and summary.start() > last_view  # the summary table sits below the view
    assert re.search(r"items\s+complete\s+40\s+40\s+-\s+0", screen[summary.start() :])


async def test_without_a_terminal_progress_lines_come_at_the_interval(tmp_path: Path, prefect_api: str) -> None:
    async with SitemapSite(0) as site:
        site.delay = 0.4  # 100 pages, 2 at a time: a crawl of about 20 s
        spec = tmp_path / "sources.yaml"
        await _write(spec, _sources(site, 100))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trawl.cli",
            "crawl",
            str(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(tmp_path, prefect_api, TRAWL_PROGRESS_INTERVAL="2"),
            cwd=WORKTREE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, err.decode()[-3000:]
    logs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    lines = [r for r in logs if r["event"].startswith("crawled ") and r.get("source") == "items"]
    assert len(lines) >= 7, [r["event"] for r in logs]
    # As Scrapy's: "crawled N pages (at X pages/min), scraped M records (at Y records/min)", with the counts as fields.
    assert re.fullmatch(
        r"crawled \d+ pages \(at \d+ pages/min\), scraped \d+ records \(at \d+ records/min\)", lines[0]["event"]
    )
    pages = [r["pages"] for r in lines]
    assert pages == sorted(pages) and pages[-1] > pages[0] > 0
    assert all(r["discovered"] == 100 and r["failures"] == 0 and r["pages_per_min"] > 0 for r in lines)
    times = [datetime.fromisoformat(r["timestamp"]) for r in lines]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(1.5 <= g <= 3.5 for g in gaps), gaps
