"""Progress you can see while a run works: a live view on a terminal, a progress line per source elsewhere.

:class:`Progress` holds one row per source (a crawl's running counts, or a load's
rows against its total). :func:`show_progress` shows it while a block runs: on a
terminal a live table drawn with rich (pages done/discovered, records, failures,
pages/s; a bar per source for a load) that stays in place when the block ends, so
the summary printed after it sits below it; without a terminal (CI, workers,
Prefect) one log line per running source every ``progress_interval`` seconds, as
Scrapy's "Crawled N pages (at X pages/min)".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import structlog

if TYPE_CHECKING:
    from rich.console import RenderableType

    from trawl.connectors.base import SourceStats
    from trawl.settings import Settings

__all__ = ["Progress", "ProgressMode", "progress_mode", "show_progress"]

log = structlog.get_logger("trawl.progress")

ProgressMode = Literal["auto", "live", "log", "off"]
_WINDOW = 10.0  # seconds of samples the live view's rates are taken over


@dataclass(slots=True)
class _Row:
    name: str
    kind: str
    stats: SourceStats | None = None  # a crawl's running counts
    total: int = 0  # a load: rows to load, and loaded so far
    loaded: int = 0
    status: str = "running"
    started: float = field(default_factory=time.monotonic)
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=64))
    logged: tuple[float, int, int] | None = None  # (time, done, records) at the last progress line

    @property
    def done(self) -> int:
        return self.stats.done if self.stats is not None else self.loaded

    @property
    def records(self) -> int:
        return self.stats.records if self.stats is not None else self.loaded

    def sample(self, now: float) -> None:
        self.samples.append((now, self.done, self.records))

    def rate(self, now: float) -> float:
        """Pages (rows for a load) per second over the last :data:`_WINDOW` seconds."""
        old = next((s for s in self.samples if now - s[0] <= _WINDOW), None)
        if old is None or now - old[0] < 0.5:
            elapsed = now - self.started
            return self.done / elapsed if elapsed > 0 else 0.0
        return (self.done - old[1]) / (now - old[0])


class Progress:
    """The rows a run's progress view shows: one per source."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._rows: dict[str, _Row] = {}

    def crawl(self, name: str, kind: str, stats: SourceStats) -> None:
        """Show a source's crawl, counting from its live ``stats``."""
        self._rows[name] = _Row(name, kind, stats)

    def load(self, name: str, total: int) -> None:
        """Show a source's load: ``total`` rows to load."""
        row = self._rows.setdefault(name, _Row(name, "load"))
        row.total += total

    def advance(self, name: str, rows: int) -> None:
        """A load's part landed: ``rows`` more loaded."""
        if name in self._rows:
            self._rows[name].loaded += rows

    def finished(self, name: str, status: str) -> None:
        """The source is done (``complete``/``failed``): its row stops counting."""
        if name in self._rows:
            self._rows[name].status = status

    def rows(self) -> list[_Row]:
        return list(self._rows.values())

    def lines(self, now: float | None = None) -> list[str]:
        """One progress line per running source since the last call (what the log gets every interval)."""
        now = time.monotonic() if now is None else now
        out = []
        for row in self._rows.values():
            if row.status != "running":
                continue
            t0, done0, records0 = row.logged or (row.started, 0, 0)
            minutes = max(now - t0, 1e-9) / 60
            row.logged = (now, row.done, row.records)
            if row.stats is None:
                pct = f" ({100 * row.loaded / row.total:.0f}%)" if row.total else ""
                out.append(
                    f"loaded {row.loaded} of {row.total} rows{pct} (at {(row.loaded - done0) / minutes:.0f} rows/min)"
                )
                log.info(out[-1], source=row.name, rows_loaded=row.loaded, rows_total=row.total)
                continue
            st = row.stats
            ppm, rpm = (row.done - done0) / minutes, (row.records - records0) / minutes
            out.append(
                f"crawled {row.done} pages (at {ppm:.0f} pages/min), scraped {row.records} records "
                f"(at {rpm:.0f} records/min)"
            )
            log.info(
                out[-1],
                source=row.name,
                pages=row.done,
                discovered=max(st.discovered, row.done),
                records=row.records,
                failures=st.failures,
                pages_per_min=round(ppm, 1),
                records_per_min=round(rpm, 1),
            )
        return out

    def table(self) -> RenderableType:
        """The live view: one line per source."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        now = time.monotonic()
        table = Table(title=self.title, title_justify="left", expand=False, box=None, padding=(0, 1))
        for col, justify in (
            ("source", "left"),
            ("status", "left"),
            ("pages", "right"),
            ("records", "right"),
            ("failures", "right"),
            ("rate", "right"),
            ("", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for row in self._rows.values():
            if row.status == "running":
                row.sample(now)
            rate = row.rate(now) if row.status == "running" else row.done / max(now - row.started, 1e-9)
            if row.stats is not None:
                st = row.stats
                discovered = max(st.discovered, row.done)
                bar = ProgressBar(total=discovered or None, completed=row.done, width=24)
                table.add_row(
                    row.name,
                    row.status,
                    f"{row.done}/{discovered}",
                    str(row.records),
                    str(st.failures),
                    f"{rate:.1f} pages/s",
                    bar,
                )
            else:
                bar = ProgressBar(total=row.total or None, completed=row.loaded, width=24)
                table.add_row(row.name, row.status, "-", f"{row.loaded}/{row.total}", "-", f"{rate:.0f} rows/s", bar)
        return table


def progress_mode(mode: ProgressMode) -> Literal["live", "log", "off"]:
    """``auto``: the live view on a terminal (not ``TERM=dumb``), log lines elsewhere."""
    if mode != "auto":
        return mode
    tty = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
    return "live" if tty else "log"


@contextlib.asynccontextmanager
async def show_progress(progress: Progress, settings: Settings) -> AsyncIterator[Progress]:
    """Show ``progress`` while the block runs, as the ``progress`` setting says (:func:`progress_mode`)."""
    mode = progress_mode(settings.progress)
    if mode == "off":
        yield progress
        return
    if mode == "log":
        async with _logging(progress, settings.progress_interval):
            yield progress
        return
    async with _live(progress):
        yield progress


@contextlib.asynccontextmanager
async def _logging(progress: Progress, interval: float) -> AsyncIterator[None]:
    async def tick() -> None:
        while True:
            await asyncio.sleep(interval)
            progress.lines()

    ticker = asyncio.create_task(tick(), name="progress-log")
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


@contextlib.asynccontextmanager
async def _live(progress: Progress) -> AsyncIterator[None]:
    from rich.live import Live

    # Log lines go above the view, not through it: trawl's console handler writes to the stdout Live redirects.
    handler = next((h for h in logging.getLogger().handlers if h.get_name() == "trawl"), None)
    live = Live(get_renderable=progress.table, refresh_per_second=4, transient=False, redirect_stdout=True)
    with live:
        old = handler.setStream(sys.stdout) if isinstance(handler, logging.StreamHandler) else None
        try:
            yield
        finally:
            if old is not None and isinstance(handler, logging.StreamHandler):
                handler.setStream(old)
            live.refresh()  # the final counts stay on screen, above the summary printed next
