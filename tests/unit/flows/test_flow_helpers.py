"""Flow helpers without a Prefect server: which failures retry, part cache keys, parameters, the summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import TypeAdapter, ValidationError

from flows._common import retry_if_transient
from flows.artifacts import summary_markdown, top_errors
from flows.load import _part_cache_key
from flows.params import Politeness, RunId, StagingURL, check_run_ids, check_sources
from trawl.errors import (
    ConfigError,
    DatabaseUnavailable,
    LoadError,
    ParameterError,
    PermanentFetchError,
    TransientFetchError,
)
from trawl.retry import is_transient
from trawl.staging import StagedPart

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (DatabaseUnavailable("down"), True),
        (TransientFetchError("reset", url="http://x/"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (asyncpg.CannotConnectNowError("starting up"), True),
        (PermanentFetchError("404", url="http://x/"), False),
        (LoadError("bad column", staged_object="file:///p"), False),
        (ConfigError("bad file"), False),
        (ValueError("bad data"), False),
    ],
)
def test_only_transient_failures_are_retried(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


async def test_the_retry_condition_sees_the_error_inside_an_event_loop() -> None:
    """Prefect's async engine calls it from a coroutine, where ``state.result()`` alone would be a coroutine."""
    from types import SimpleNamespace

    from prefect.states import Failed

    run: Any = SimpleNamespace(name="load-part")
    assert retry_if_transient(None, run, Failed(data=TransientFetchError("reset", url="http://x/"))) is True  # type: ignore[arg-type]
    assert retry_if_transient(None, run, Failed(data=ConfigError("bad file"))) is False  # type: ignore[arg-type]


class _Loader:
    identity = "test:5432:trawl"


def test_part_cache_key_holds_for_a_retried_flow_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    part = StagedPart("file:///s/part-00001.jsonl.gz", 10, 100, "ab" * 32)
    params: dict[str, Any] = {"part": part, "loader": _Loader()}
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000001")
    first = _part_cache_key(None, params)  # type: ignore[arg-type]
    assert first == _part_cache_key(None, params)  # type: ignore[arg-type]  # a retry of the same flow run
    other_part = {**params, "part": StagedPart(part.uri.replace("1.", "2."), 10, 100, "cd" * 32)}
    assert _part_cache_key(None, other_part) != first  # type: ignore[arg-type]
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "00000000-0000-0000-0000-000000000002")
    assert _part_cache_key(None, params) != first  # type: ignore[arg-type]  # a new flow run asks the ledger


@pytest.mark.parametrize(
    "url", ["file://./x", "file:///tmp/x", "./staging", "/abs/dir", "s3://bucket/prefix", "s3://my-bucket"]
)
def test_staging_parameter_accepts(url: str) -> None:
    TypeAdapter(StagingURL).validate_python(url)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://x/y", "s3://", ""])
def test_staging_parameter_refuses(url: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(StagingURL).validate_python(url)


def test_staging_pattern_is_in_the_json_schema() -> None:
    """The server enforces the schema: the pattern must be in it, not only in a Python validator."""
    assert "pattern" in TypeAdapter(StagingURL).json_schema()


def test_politeness_overrides_only_what_is_set() -> None:
    assert Politeness(per_host_delay=0.5).overrides() == {"per_host_delay": 0.5}
    with pytest.raises(ValidationError, match="per_host_concurrency"):
        Politeness(per_host_concurrency=0)
    with pytest.raises(ValidationError):
        Politeness.model_validate({"per_host_concurency": 2})  # a typo is refused, not ignored


def test_check_sources_names_the_parameter() -> None:
    demo = str(REPO / "examples" / "demo.yaml")
    assert [s.name for s in check_sources(demo, ["items"])] == ["items"]
    with pytest.raises(ParameterError, match=r"parameter 'sources': unknown source\(s\): nope"):
        check_sources(demo, ["nope"])
    with pytest.raises(ParameterError, match="parameter 'sources_file'"):
        check_sources("does/not/exist.yaml", None)


def test_summary_and_top_errors() -> None:
    crawl = [
        {
            "source": "a",
            "status": "complete",
            "pages": 3,
            "records": 2,
            "bytes": 2_500_000,
            "seconds": 1.5,
            "breaker_trips": 1,
            "outcomes": {"fetched": 3, "failed": 2, "skipped_breaker": 4},
            "top_errors": [
                {"outcome": "skipped_breaker", "error": "breaker open", "count": 4, "example_url": "http://h/4"},
                {"outcome": "failed", "error": "HTTP 500 | x", "count": 2, "example_url": "http://h/2"},
            ],
        },
        {"source": "b", "status": "failed", "error": "boom", "outcomes": {}, "top_errors": []},
    ]
    md = summary_markdown("r1", crawl, {"a": {"inserted": 2, "updated": 0, "unchanged": 0, "rejected": 1}})
    rows = [line for line in md.splitlines() if line.startswith(("| a ", "| b "))]
    assert rows[0].split(" | ")[1:] == [
        "complete",
        "3",
        "2",
        "1",
        "3",
        "0",
        "failed 2, skipped_breaker 4",
        "1",
        "2.5",
        "1.5 |",
    ]
    assert "failed (boom)" in rows[1] and "not loaded" in rows[1]
    errors = top_errors(crawl)
    assert [(e["rank"], e["outcome"], e["count"]) for e in errors] == [(1, "skipped_breaker", 4), (2, "failed", 2)]


BAD_RUN_IDS = ["../../etc", "x/../../../escape", "a\\b", ".hidden", "run\n", "", "a b"]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_run_id_parameters_refuse_anything_that_is_not_one_path_segment(run_id: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(RunId).validate_python(run_id)
    with pytest.raises(ParameterError, match="parameter 'resume_run_id': run id"):
        check_run_ids(run_id=None, resume_run_id=run_id)
    with pytest.raises(ParameterError, match="parameter 'run_ids'"):
        check_run_ids(run_ids=["20261128T121501Z-3f9a1c", run_id])
    assert "pattern" in TypeAdapter(RunId).json_schema()


@pytest.mark.parametrize("flow", ["crawl", "pipeline", "load"])
async def test_the_flows_refuse_a_bad_run_id_before_anything_runs(flow: str, tmp_path: Path) -> None:
    from flows.crawl import crawl
    from flows.load import load
    from flows.pipeline import pipeline

    missing = str(tmp_path / "no-such-sources.yaml")  # would fail too, but later: the run id is checked first
    calls = {
        "crawl": lambda: crawl.fn(sources_file=missing, run_id="../escape"),
        "pipeline": lambda: pipeline.fn(sources_file=missing, resume_run_id="x/../../escape"),
        "load": lambda: load.fn(run_ids=["../escape"]),
    }
    with pytest.raises(ParameterError, match="run_id"):
        await calls[flow]()


def test_flow_forms_expose_the_incremental_overrides() -> None:
    """The crawl and pipeline flows' parameter schema (the Prefect UI's form) has the incremental window."""
    from prefect.utilities.callables import parameter_schema

    from flows.crawl import crawl
    from flows.pipeline import pipeline

    for flow_ in (crawl, pipeline):
        schema = parameter_schema(flow_.fn).model_dump_for_openapi()
        assert "incremental" in schema["properties"], flow_.name
        override = schema["definitions"]["IncrementalOverride"]
        assert set(override["properties"]) == {"initial_value", "end_value"}
        assert "back-fill" in override["properties"]["end_value"]["description"]


def test_summary_shows_each_shard_of_a_sharded_source() -> None:
    crawl = [
        {
            "source": "big",
            "status": "complete",
            "pages": 10,
            "records": 9,
            "seconds": 42.5,
            "outcomes": {"fetched": 10},
            "top_errors": [],
            "host_moves": 3,
            "shard_replacements": ["big-r-shard-1: Crashed"],
            "per_shard": {
                "0": {"pages": 6, "records": 5, "outcomes": {"fetched": 6}},
                "1": {"pages": 4, "records": 4, "outcomes": {"fetched": 4}},
            },
        }
    ]
    md = summary_markdown("r1", crawl, None)
    assert "| big | complete | 10 | 9 |" in md and "| 42.5 |" in md  # the source's real duration
    assert "**big** by shard (3 host moves):" in md
    assert "| 0 | 6 | 5 | fetched 6 |" in md and "| 1 | 4 | 4 | fetched 4 |" in md
    assert "Shard runs replaced: big-r-shard-1: Crashed" in md
