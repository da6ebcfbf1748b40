"""coerce(): how staged JSON values become the typed values written to PostgreSQL, and what is rejected."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from sinks.postgres import PG_TYPES, coerce

ACCEPTED: list[tuple[str, Any, Any]] = [
    # text: strings as they are, scalars as their JSON text
    ("text", "héllo", "héllo"),
    ("text", "", ""),
    ("text", 42, "42"),
    ("text", 1.5, "1.5"),
    ("text", True, "true"),
    # int: ints, integral floats, integer strings (signs and padding allowed)
    ("int", 7, 7),
    ("int", -7, -7),
    ("int", 3.0, 3),
    ("int", "42", 42),
    ("int", " -17 ", -17),
    ("int", "+5", 5),
    ("int", 2**63 - 1, 2**63 - 1),
    ("int", -(2**63), -(2**63)),
    # float: numbers and numeric strings
    ("float", 1, 1.0),
    ("float", 2.5, 2.5),
    ("float", " 3.25 ", 3.25),
    ("float", "1e3", 1000.0),
    ("float", "-0.5", -0.5),
    # bool: JSON booleans, 0/1, and the usual words in any case
    ("bool", True, True),
    ("bool", False, False),
    ("bool", 1, True),
    ("bool", 0, False),
    ("bool", "YES", True),
    ("bool", " off ", False),
    ("bool", "t", True),
    ("bool", "0", False),
    # date: ISO dates, and the date part of an ISO timestamp
    ("date", "2021-02-28", date(2021, 2, 28)),
    ("date", " 2024-02-29 ", date(2024, 2, 29)),
    ("date", "2021-02-28T23:30:00+05:00", date(2021, 2, 28)),
    ("date", "2021-02-28 08:00:00", date(2021, 2, 28)),
    # timestamp: ISO 8601; naive means UTC; offsets are kept
    ("timestamp", "2021-02-28T10:11:12Z", datetime(2021, 2, 28, 10, 11, 12, tzinfo=UTC)),
    ("timestamp", "2021-02-28T10:11:12", datetime(2021, 2, 28, 10, 11, 12, tzinfo=UTC)),
    (
        "timestamp",
        "2021-02-28 10:11:12.5+02:00",
        datetime(2021, 2, 28, 10, 11, 12, 500000, tzinfo=timezone(timedelta(hours=2))),
    ),
    ("timestamp", "2021-02-28", datetime(2021, 2, 28, tzinfo=UTC)),
    # json: any JSON value, as JSON text for jsonb
    ("json", {"a": [1, 2]}, '{"a":[1,2]}'),
    ("json", [1, "x"], '[1,"x"]'),
    ("json", "s", '"s"'),
    ("json", 3, "3"),
    ("json", False, "false"),
]

REJECTED: list[tuple[str, Any, str]] = [
    ("text", {"a": 1}, "expected text, got dict"),
    ("text", [1], "expected text, got list"),
    ("int", "abc", "expected int, got 'abc'"),
    ("int", "1.5", "expected int, got '1.5'"),
    ("int", 1.5, "expected int, got 1.5"),
    ("int", "", "expected int, got ''"),
    ("int", True, "expected int, got bool"),
    ("int", [1], "expected int"),
    ("int", 2**63, "int 9223372036854775808 does not fit in bigint"),
    ("int", -(2**63) - 1, "int -9223372036854775809 does not fit in bigint"),
    ("int", 1e20, "int 100000000000000000000 does not fit in bigint"),
    ("float", "abc", "expected float, got 'abc'"),
    ("float", False, "expected float, got bool"),
    ("float", {"v": 1}, "expected float"),
    ("bool", "maybe", "expected bool, got 'maybe'"),
    ("bool", 2, "expected bool, got 2"),
    ("bool", 1.0, "expected bool"),
    ("date", "2021-13-45", "expected date (YYYY-MM-DD), got '2021-13-45'"),
    ("date", "2021-02-30", "expected date"),
    ("date", "yesterday", "expected date"),
    ("date", "2021-02-28 and more", "expected date"),
    ("date", "2021-02-28xyz", "expected date"),
    ("date", 20210228, "expected date"),
    ("timestamp", "2021-13-01T00:00:00", "expected ISO 8601 timestamp"),
    ("timestamp", "noon", "expected ISO 8601 timestamp"),
    ("timestamp", 1614506400, "expected ISO 8601 timestamp"),
    ("uuid", "x", "unknown type 'uuid'"),
]


@pytest.mark.parametrize(("kind", "value", "expected"), ACCEPTED)
def test_coerce_accepts(kind: str, value: Any, expected: Any) -> None:
    got = coerce(value, kind)

    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(("kind", "value", "message"), REJECTED)
def test_coerce_rejects(kind: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        coerce(value, kind)


@pytest.mark.parametrize("kind", sorted(PG_TYPES))
def test_none_is_null_for_every_type(kind: str) -> None:
    assert coerce(None, kind) is None


def test_timestamp_offset_is_preserved_as_the_same_instant() -> None:
    got = coerce("2021-02-28T10:00:00-05:00", "timestamp")

    assert got == datetime(2021, 2, 28, 15, 0, tzinfo=UTC)
    assert got.utcoffset() == timedelta(hours=-5)


def test_json_round_trips_nested_values() -> None:
    value = {"tags": ["a", "b"], "dims": {"w": 1.5, "h": None}, "ok": True}

    assert orjson.loads(coerce(value, "json")) == value


def test_every_declared_type_has_a_column_type() -> None:
    assert dict(PG_TYPES) == {
        "text": "text",
        "int": "bigint",
        "float": "double precision",
        "bool": "boolean",
        "date": "date",
        "timestamp": "timestamp with time zone",
        "json": "jsonb",
    }
