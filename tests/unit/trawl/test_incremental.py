"""Cursor values: which is later, and moving one back by the lag."""

from __future__ import annotations

import pytest

from trawl.config import Incremental
from trawl.incremental import CursorWindow, later, minus_lag, window_for


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (None, "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
        ("2024-01-02T00:00:00Z", "2024-01-01T23:00:00Z", "2024-01-02T00:00:00Z"),
        ("2024-01-01T10:00:00+02:00", "2024-01-01T09:00:00Z", "2024-01-01T09:00:00Z"),  # instants, not strings
        (9, 10, 10),
        (10.5, 10, 10.5),
        ("b", "a", "b"),
    ],
)
def test_later(a: object, b: object, expected: object) -> None:
    assert later(a, b) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "lag", "expected"),
    [
        ("2024-01-03T02:00:00Z", 300, "2024-01-03T01:55:00Z"),
        ("2024-01-03T02:00:00+01:00", 60, "2024-01-03T01:59:00+01:00"),
        ("2024-01-03T02:00:00", 3600, "2024-01-03T01:00:00"),
        (1000, 10, 990),
        (1.5, 0.5, 1.0),
        ("opaque-cursor", 300, "opaque-cursor"),
        ("2024-01-03T02:00:00Z", 0, "2024-01-03T02:00:00Z"),
    ],
)
def test_minus_lag(value: object, lag: float, expected: object) -> None:
    assert minus_lag(value, lag) == expected  # type: ignore[arg-type]


def test_window_for() -> None:
    inc = Incremental(cursor_path="u", start_param="since", initial_value="2024-01-01T00:00:00Z", lag=60)
    assert window_for(inc, None).start_value == "2024-01-01T00:00:00Z"
    w = window_for(inc, "2024-02-01T00:00:00Z")
    assert (w.start_value, w.stored, w.moves_state) == ("2024-01-31T23:59:00Z", "2024-02-01T00:00:00Z", True)
    back = window_for(inc, "2024-02-01T00:00:00Z", initial_value="2023-01-01T00:00:00Z", end_value="2023-02-01")
    assert (back.start_value, back.end_value, back.moves_state) == ("2023-01-01T00:00:00Z", "2023-02-01", False)


def test_window_observes_only_cursor_values() -> None:
    w = CursorWindow("u", None)
    for v in ("2024-01-02T00:00:00Z", None, True, {"x": 1}, "2024-01-03T00:00:00Z", "2024-01-01T00:00:00Z"):
        w.observe(v)
    assert w.summary()["last_value"] == "2024-01-03T00:00:00Z"
