"""What the crawler computes without a network: a sharded run's summary from its shards' summaries."""

from __future__ import annotations

from trawl.crawler import merge_stats


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
