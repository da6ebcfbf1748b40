"""What the crawler computes without a network: a sharded run's summary, and a source's status from its outcomes."""

from __future__ import annotations

import pytest

from trawl.crawler import merge_stats, verdict


def test_merge_stats_adds_up_shards() -> None:
    merged = merge_stats(
        [
            {
                "pages": 3,
                "records": 2,
                "bytes": 10,
                "discovered": 4,
                "failures": 1,
                "outcomes": {"fetched": 2, "failed": 1},
                "top_errors": [{"outcome": "failed", "error": "HTTP 500", "count": 1, "example_url": "http://a/x"}],
            },
            {"pages": 5, "records": 5, "bytes": 20, "discovered": 6, "failures": 0, "outcomes": {"fetched": 5}},
            {},  # a shard that never checkpointed
        ]
    )
    assert merged["pages"] == 8 and merged["records"] == 7 and merged["bytes"] == 30 and merged["discovered"] == 10
    assert merged["outcomes"] == {"fetched": 7, "failed": 1}
    assert merged["failures"] == 1 and merged["shards"] == 3
    assert merged["top_errors"][0]["error"] == "HTTP 500"


def _summary(**outcomes: int) -> dict[str, object]:
    errors = [
        {"outcome": k, "error": f"{k} error", "count": n, "example_url": "http://a/x"}
        for k, n in sorted(outcomes.items(), key=lambda kv: -kv[1])
        if k not in ("fetched", "not_modified")
    ]
    return {"outcomes": outcomes, "top_errors": errors}


@pytest.mark.parametrize(
    ("outcomes", "ratio", "reason"),
    [
        ({"fetched": 3}, 1.0, None),
        ({}, 1.0, None),  # nothing to crawl is no failure
        ({"skipped_breaker": 1}, 1.0, "no URL fetched, 1 of 1 failed; most often skipped_breaker: skipped_breaker"),
        ({"blocked_network": 2, "skipped_robots": 1}, 1.0, "no URL fetched, 2 of 3 failed"),
        ({"skipped_robots": 2, "filtered": 1}, 1.0, None),  # the source's own rules, not failures
        ({"not_modified": 1, "failed": 1}, 1.0, None),  # a 304 is a fetch
        ({"fetched": 2, "failed": 3}, 1.0, None),  # ratio rule off
        ({"fetched": 2, "failed": 3}, 0.5, "3 of 5 URLs failed (60%, above max_failed_ratio 0.5)"),
        ({"fetched": 2, "failed": 3}, 0.6, None),  # exactly at the limit is allowed
    ],
)
def test_verdict_is_the_one_source_status_rule(outcomes: dict[str, int], ratio: float, reason: str | None) -> None:
    got = verdict(_summary(**outcomes), ratio)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got
