"""Records and outcomes: hashing, immutability, staging envelopes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from trawl.records import Outcome, OutcomeKind, Record, canonical_json, content_hash, utcnow

AT = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def record(data: dict[str, object], **kwargs: object) -> Record:
    return Record("shop", "k1", "http://shop.test/p/1", AT, "run-1", data, **kwargs)  # type: ignore[arg-type]


def test_content_hash_ignores_key_order() -> None:
    a = {"sku": "SKU-1", "price": 9.5, "tags": ["x", "y"], "attrs": {"w": 1, "h": 2}}
    b = {"attrs": {"h": 2, "w": 1}, "tags": ["x", "y"], "price": 9.5, "sku": "SKU-1"}
    assert list(a) != list(b)
    assert content_hash(a) == content_hash(b)
    assert record(a).content_hash == record(b).content_hash == content_hash(a)
    assert len(content_hash(a)) == 64
    assert int(content_hash(a), 16) >= 0  # hex digest


@pytest.mark.parametrize(
    "changed",
    [
        {"sku": "SKU-2", "price": 9.5, "tags": ["x", "y"]},
        {"sku": "SKU-1", "price": 9.51, "tags": ["x", "y"]},
        {"sku": "SKU-1", "price": 9.5, "tags": ["y", "x"]},  # list order is data
        {"sku": "SKU-1", "price": 9.5, "tags": ["x", "y"], "extra": None},
        {"sku": "SKU-1", "price": "9.5", "tags": ["x", "y"]},
        {"sku": "SKU-1", "tags": ["x", "y"]},
    ],
)
def test_content_hash_changes_with_data(changed: dict[str, object]) -> None:
    base = {"sku": "SKU-1", "price": 9.5, "tags": ["x", "y"]}
    assert content_hash(changed) != content_hash(base)


def test_content_hash_is_over_data_only() -> None:
    data = {"a": 1}
    other = Record("other", "k2", "http://x.test/", AT + timedelta(days=1), "run-2", dict(data))
    assert other.content_hash == record(data).content_hash


def test_canonical_json_is_deterministic() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert canonical_json({"b": 1, "a": [2, {"d": 3, "c": 4}], 5: "int key"}) == (
        b'{"5":"int key","a":[2,{"c":4,"d":3}],"b":1}'
    )
    assert canonical_json({"at": AT}) == b'{"at":"2026-11-28T12:00:00Z"}'
    assert orjson.loads(canonical_json({"at": when}))["at"] == "2026-01-02T03:04:05+02:00"


def test_explicit_content_hash_is_kept() -> None:
    assert record({"a": 1}, content_hash="abc").content_hash == "abc"


def test_record_is_frozen() -> None:
    r = record({"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.key = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.content_hash = "x"  # type: ignore[misc]
    assert not hasattr(r, "__dict__")  # slotted


def test_record_envelope() -> None:
    r = record({"sku": "SKU-1"})
    env = r.envelope()
    assert env == {
        "source": "shop",
        "key": "k1",
        "url": "http://shop.test/p/1",
        "fetched_at": AT,
        "run_id": "run-1",
        "content_hash": content_hash({"sku": "SKU-1"}),
        "data": {"sku": "SKU-1"},
    }
    assert orjson.loads(canonical_json(env))["fetched_at"] == "2026-11-28T12:00:00Z"


def test_outcome_envelope_and_defaults() -> None:
    before = utcnow()
    o = Outcome("run-1", "shop", "http://shop.test/", OutcomeKind.FILTERED, 200, 1, 123, 4, "content-type image/png")
    assert before <= o.at <= utcnow()
    assert o.at.tzinfo is not None
    env = o.envelope()
    assert set(env) == {
        "run_id",
        "source",
        "url",
        "outcome",
        "http_status",
        "attempts",
        "bytes",
        "elapsed_ms",
        "error",
        "at",
        "etag",
        "last_modified",
    }
    assert env["outcome"] == "filtered"
    assert type(env["outcome"]) is str
    assert (env["http_status"], env["attempts"], env["bytes"], env["elapsed_ms"]) == (200, 1, 123, 4)
    assert env["error"] == "content-type image/png"
    bare = Outcome("run-1", "shop", "http://shop.test/x", OutcomeKind.BLOCKED_NETWORK).envelope()
    assert (bare["http_status"], bare["attempts"], bare["bytes"], bare["error"]) == (None, 0, 0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.outcome = OutcomeKind.FETCHED  # type: ignore[misc]


def test_outcome_kinds_are_the_documented_set() -> None:
    assert {k.value for k in OutcomeKind} == {
        "fetched",
        "not_modified",
        "failed",
        "skipped_robots",
        "skipped_breaker",
        "blocked_network",
        "filtered",
    }


def test_outcome_envelope_carries_lastmod_and_proxy_when_set() -> None:
    o = Outcome("run-1", "shop", "http://shop.test/", OutcomeKind.FETCHED, lastmod="2026-01-01", proxy="http://p:1")
    env = o.envelope()
    assert (env["lastmod"], env["proxy"]) == ("2026-01-01", "http://p:1")
