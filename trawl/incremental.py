"""Incremental extraction: which cursor value a run sends, and the largest one it saw.

The state itself (the largest value of each source's last loaded run) lives in
PostgreSQL (:mod:`sinks.state`); the crawl flow reads it when a source starts
and hands the connector a :class:`CursorWindow`. The connector puts what it saw
into the manifest's stats (:meth:`CursorWindow.summary`), and the load moves the
state once the run's load has committed: a failed run, or a back-fill with an
``end_value``, leaves it where it was.

Values are what APIs use as cursors: ISO 8601 timestamps (compared as instants,
``lag`` in seconds), numbers, or other strings (compared as strings, no lag).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trawl.config import Incremental

__all__ = ["CursorValue", "CursorWindow", "later", "minus_lag", "window_for"]

CursorValue = str | int | float
"""A cursor value as stored and sent."""


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 10 or not value[:4].isdigit():
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        return None
    return parsed


def _key(value: Any) -> tuple[int, Any]:
    """An order over cursor values: numbers by value, timestamps as instants, other strings as strings."""
    if isinstance(value, bool):
        return (3, str(value))
    if isinstance(value, int | float):
        return (0, value)
    instant = _instant(value)
    if instant is not None:
        # Naive timestamps are taken as UTC: an API that sends them means one zone throughout.
        return (1, (instant if instant.tzinfo else instant.replace(tzinfo=UTC)).timestamp())
    return (2, str(value))


def later(a: CursorValue | None, b: CursorValue | None) -> CursorValue | None:
    """The later of two cursor values (None is earlier than anything)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if _key(b) > _key(a) else a


def minus_lag(value: CursorValue, lag: float) -> CursorValue:
    """``value`` moved back by ``lag`` (seconds for a timestamp, units for a number), spelled as it came."""
    if not lag:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        back = value - lag
        return int(back) if isinstance(value, int) and float(lag).is_integer() else back
    instant = _instant(value)
    if instant is None:
        return value  # an opaque string cannot be moved back
    moved = instant - timedelta(seconds=lag)
    text = moved.isoformat()
    if isinstance(value, str) and value.endswith("Z") and text.endswith("+00:00"):
        text = text[: -len("+00:00")] + "Z"
    return text


@dataclass(slots=True)
class CursorWindow:
    """One run's incremental window: what it sends, what it started from, the largest value it saw."""

    cursor_path: str
    start_value: CursorValue | None
    """Sent as the start (the stored value minus the lag, else ``initial_value``); None: nothing sent."""
    end_value: CursorValue | None = None
    stored: CursorValue | None = None
    """The state this run started from (a resumed run keeps the one it first started with)."""
    moves_state: bool = True
    """False for back-fills (an ``end_value``): their state stays where it was."""
    last_value: CursorValue | None = field(default=None)

    def observe(self, value: Any) -> None:
        """Count one item's cursor value (None and values of other types than cursors are ignored)."""
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            self.last_value = later(self.last_value, value)

    def summary(self) -> dict[str, Any]:
        """What the manifest carries for the load to apply (``sinks.state.advance_state``)."""
        return {
            "cursor_path": self.cursor_path,
            "start_value": self.start_value,
            "end_value": self.end_value,
            "stored": self.stored,
            "last_value": self.last_value,
            "moves_state": self.moves_state,
        }


def window_for(
    config: Incremental,
    stored: CursorValue | None,
    *,
    initial_value: CursorValue | None = None,
    end_value: CursorValue | None = None,
) -> CursorWindow:
    """The window a run asks for: an explicit ``initial_value`` (a run's override), else the stored state minus
    ``lag``, else the configured ``initial_value``; up to ``end_value`` (override, else configured)."""
    if initial_value is not None:
        start: CursorValue | None = initial_value
    elif stored is not None:
        start = minus_lag(stored, config.lag)
    else:
        start = config.initial_value
    end = end_value if end_value is not None else config.end_value
    return CursorWindow(config.cursor_path, start, end, stored, moves_state=end is None)
