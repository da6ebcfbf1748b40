"""The progress view's rows, lines and modes (the terminal and non-terminal runs are tests/e2e/test_progress.py)."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from trawl.connectors.base import SourceStats
from trawl.progress import Progress, progress_mode, show_progress
from trawl.settings import Settings


def stats(fetched: int, failed: int = 0, records: int = 0, discovered: int = 0) -> SourceStats:
    st = SourceStats(records=records, discovered=discovered)
    st.outcomes.update({"fetched": fetched, "failed": failed})
    return st


def test_a_line_per_running_source_with_rates_since_the_last_line() -> None:
    p = Progress("crawl r1")
    st = stats(100, 20, records=90, discovered=400)
    p.crawl("shop", "html", st)
    p.crawl("done", "api", stats(5))
    p.finished("done", "complete")
    t0 = p.rows()[0].started
    with capture_logs() as logs:
        assert p.lines(now=t0 + 60) == ["crawled 120 pages (at 120 pages/min), scraped 90 records (at 90 records/min)"]
        st.outcomes["fetched"] += 60
        st.records += 30
        assert p.lines(now=t0 + 90) == ["crawled 180 pages (at 120 pages/min), scraped 120 records (at 60 records/min)"]
    assert logs[0]["source"] == "shop"
    assert (logs[0]["pages"], logs[0]["discovered"], logs[0]["records"], logs[0]["failures"]) == (120, 400, 90, 20)
    assert logs[1]["pages_per_min"] == 120.0


def test_load_rows_count_against_their_total() -> None:
    p = Progress("load")
    p.load("shop", 200)
    p.advance("shop", 50)
    assert p.lines(now=p.rows()[0].started + 60) == ["loaded 50 of 200 rows (25%) (at 50 rows/min)"]


def test_the_live_table_shows_counts_and_rate() -> None:
    p = Progress("crawl r1")
    p.crawl("shop", "html", stats(120, 3, records=100, discovered=300))
    p.load("shop_load", 10)
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(p.table())
    text = out.getvalue()
    assert "crawl r1" in text
    assert "shop" in text and "running" in text and "123/300" in text and "pages/s" in text
    assert "0/10" in text and "rows/s" in text


async def test_log_mode_logs_at_the_interval() -> None:
    p = Progress("crawl r1")
    st = stats(0)
    p.crawl("shop", "html", st)
    with capture_logs() as logs:
        async with show_progress(p, Settings(progress="log", progress_interval=0.05)):
            for _ in range(6):
                st.outcomes["fetched"] += 10
                await asyncio.sleep(0.05)
    lines = [e for e in logs if e["event"].startswith("crawled ")]
    assert len(lines) >= 3
    assert [e["pages"] for e in lines] == sorted(e["pages"] for e in lines)


async def test_off_mode_logs_nothing() -> None:
    p = Progress("crawl r1")
    p.crawl("shop", "html", stats(1))
    with capture_logs() as logs:
        async with show_progress(p, Settings(progress="off", progress_interval=0.01)):
            await asyncio.sleep(0.05)
    assert logs == []


def test_auto_is_log_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert progress_mode("auto") == "log"
    assert progress_mode("live") == "live"


def test_bad_progress_setting_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'auto', 'live', 'log' or 'off'"):
        Settings(progress="fancy")  # type: ignore[arg-type]
