"""The command line in-process: parsing, `--help`, exit codes (0 done, 1 some failed, 2 usage or config), one-line errors.

No Prefect server, database or crawl here: what needs them is stubbed at the flow
boundary, and tests/e2e/test_cli.py runs the real thing in subprocesses.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import State

import trawl
from flows._common import failed_sources, run_state
from trawl import cli
from trawl.cli import main

REPO = Path(__file__).resolve().parents[3]

GOOD = 'sources:\n  - name: shop\n    kind: html\n    urls: ["https://shop.example.com/a"]\n    fields: {title: {selector: h1}}\n'


@pytest.fixture(autouse=True)
def clean_logging(restore_logging: None) -> None:
    """main() configures logging onto this test's captured stdout, closed when the test ends: undo it, or every
    later test logs into a closed stream."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """main() writes its flags into os.environ (TRAWL_*, PREFECT_*): start without them, leave nothing behind.

    The working directory is an empty tmp dir, so nothing can be found relative to the checkout.
    """
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("TRAWL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _errors(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert all(line.startswith("trawl: error: ") for line in lines), err
    assert "Traceback" not in err
    return lines


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- parsing and --help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage", "mentions"),
    [
        ([], "usage: trawl ", ["run", "crawl", "load", "check", "lineage", "demo", "runs", "stage"]),
        (["run"], "usage: trawl run ", ["SOURCES.yaml", "--staging", "--database-url", "--source", "--resume"]),
        (["crawl"], "usage: trawl crawl ", ["SOURCES.yaml", "--staging", "--database-url", "--source", "--resume"]),
        (["load"], "usage: trawl load ", ["--run-id", "--staging", "--database-url", "--source"]),
        (["check"], "usage: trawl check ", ["SOURCES.yaml", "--log-format"]),
        (["lineage"], "usage: trawl lineage ", ["SOURCE", "KEY", "--database-url"]),
        (["demo"], "usage: trawl demo ", ["--staging", "--database-url", "--source", "--metrics-port"]),
        (["runs"], "usage: trawl runs ", ["ls"]),
        (["runs", "ls"], "usage: trawl runs ls ", ["--staging"]),
        (["stage"], "usage: trawl stage ", ["resume"]),
        (["stage", "resume"], "usage: trawl stage resume ", ["RUN_ID", "--staging"]),
    ],
)
def test_help_of_every_command_exits_0(
    argv: list[str], usage: str, mentions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage), out
    missing = [m for m in mentions if m not in out]
    assert not missing, out


def test_check_takes_no_staging_or_database_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["check", _write(tmp_path / "s.yaml", GOOD), "--staging", "file:///x"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --staging" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["run"], "the following arguments are required: SOURCES.yaml"),
        (["lineage", "items"], "the following arguments are required: KEY"),
        (["runs"], "the following arguments are required: ACTION"),
        (["stage", "resume"], "the following arguments are required: RUN_ID"),
        (["run", "s.yaml", "--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
    ],
)
def test_bad_usage_exits_2_with_the_usage_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: trawl"), err
    assert complaint in err


# -- trawl check -------------------------------------------------------------------------------------------------


def test_check_a_good_file_exits_0_listing_its_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "good.yaml", GOOD)
    assert main(["check", path]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: OK, 1 source(s): shop (html)\n"
    assert err == ""


def test_check_a_bad_file_exits_2_with_one_line_naming_file_entry_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path / "bad.yaml",
        'sources:\n  - name: shop\n    kind: html\n    urls: ["ftp://x"]\n    fields: {title: {selector: h1}}\n',
    )
    assert main(["check", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert _errors(err) == [f"trawl: error: {path}: sources[0] (shop): urls.0: not an http(s) URL: 'ftp://x'"]


def test_check_reports_every_problem_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path / "bad.yaml",
        "sources:\n"
        "  - name: shop\n    kind: html\n    urls: [ftp://x]\n    fields: {price: {selector: p, type: money}}\n"
        "  - name: feed\n    kind: api\n    url: https://api.example.com\n    pagination: {type: cursor}\n",
    )
    assert main(["check", path]) == 2
    lines = _errors(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert any(f"{path}: sources[0] (shop): fields.price.type:" in line for line in lines)
    assert any(f"{path}: sources[1] (feed): pagination" in line and "cursor_path" in line for line in lines)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "cannot read sources file: No such file or directory"),
        ("sources: [\n", "line 2, column 1: invalid YAML:"),
        ("- just\n- a list\n", "(file): expected a mapping with a `sources:` list"),
        (
            "sources:\n  - name: x\n    kind: api\n    url: ${NOT_SET_ANYWHERE}\n",
            "environment variable NOT_SET_ANYWHERE",
        ),
    ],
)
def test_an_unusable_sources_file_is_one_line_and_exit_2(
    text: str | None, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sources.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["check", str(path)]) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(f"trawl: error: {path}: ")
    assert problem in line


def test_check_accepts_the_bundled_demo_sources(capsys: pytest.CaptureFixture[str]) -> None:
    demo = files("trawl.demo") / "sources.yaml"
    assert main(["check", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "4 source(s): products (html), items (api), js_products (browser), orders (spider)" in out


# -- config errors on the commands that run, before anything starts -----------------------------------------------


def test_run_with_a_bad_sources_file_exits_2_before_touching_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "bad.yaml", "sources:\n  - name: shop\n    kind: html\n    urls: [ftp://x]\n")
    # The database URL is unreachable: exit 2 for the file, not for the database, means the file is checked first.
    argv = ["run", path, "--staging", f"file://{tmp_path / 'st'}", "--database-url", "postgresql://u@127.0.0.1:1/x"]
    assert main(argv) == 2
    lines = _errors(capsys.readouterr().err)
    assert lines[0] == f"trawl: error: {path}: sources[0] (shop): urls.0: not an http(s) URL: 'ftp://x'"
    assert not any("PostgreSQL" in line for line in lines)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--source", "nope"], "trawl: error: unknown source(s): nope (known: shop)"),
        (["--staging", "ftp://example.com/x"], "trawl: error: staging ftp://example.com/x: unsupported scheme 'ftp'"),
    ],
)
def test_crawl_refuses_bad_flags_in_one_line_with_exit_2(
    extra: list[str], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["crawl", _write(tmp_path / "good.yaml", GOOD), "--staging", f"file://{tmp_path / 'st'}", *extra]
    assert main(argv) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(problem), line


def test_a_bad_setting_in_the_environment_names_the_variable_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAWL_LOG_FORMAT", "xml")
    assert main(["crawl", _write(tmp_path / "good.yaml", GOOD)]) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith("trawl: error: setting TRAWL_LOG_FORMAT: ")


def test_an_unreachable_database_is_one_masked_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--database-url", "postgresql://trawl:s3cret@127.0.0.1:1/nowhere"]) == 2
    out, err = capsys.readouterr()
    (line,) = _errors(err)
    assert line.startswith("trawl: error: cannot connect to PostgreSQL at postgresql://***@127.0.0.1:1/nowhere")
    assert "s3cret" not in out + err


# -- exit 0 and 1 from the flows' results (the flows themselves stubbed) ------------------------------------------


def _crawled(*statuses: str) -> dict[str, Any]:
    sources = [
        {"source": f"s{i}", "status": status, "pages": 3, "records": 2, "failures": 0, "seconds": 0.5}
        | ({"error": "page https://shop.example.com/a failed"} if status != "complete" else {})
        for i, status in enumerate(statuses)
    ]
    return {"sources": sources, "run_id": "R1", "staging": "file:///st"}


@pytest.mark.parametrize(("statuses", "code"), [(("complete", "complete"), 0), (("complete", "failed"), 1)])
@pytest.mark.usefixtures("restore_logging")
def test_crawl_exits_0_when_every_source_is_done_and_1_when_some_failed(
    statuses: tuple[str, ...],
    code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import flows.crawl

    calls: list[dict[str, Any]] = []

    async def crawl(**kwargs: Any) -> State[Any]:
        calls.append(kwargs)
        result = _crawled(*statuses)
        return run_state(result, len(statuses), failed_sources(result["sources"]))

    monkeypatch.setattr(flows.crawl, "crawl", crawl)
    path = _write(tmp_path / "good.yaml", GOOD)
    assert main(["crawl", path, "--staging", f"file://{tmp_path / 'st'}", "--source", "shop"]) == code
    assert calls == [{"sources_file": path, "sources": ["shop"], "resume_run_id": None, "return_state": True}]
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith(("s0 ", "s1 "))}
    assert rows == {"s0": statuses[0], "s1": statuses[1]}
    assert "run R1: staged under file:///st" in out
    assert ("s1: page https://shop.example.com/a failed" in out) is (code == 1)


@pytest.mark.parametrize(("error", "code"), [(None, 0), ("part p1 is corrupt", 1)])
@pytest.mark.usefixtures("restore_logging")
def test_load_exits_1_when_a_load_failed(
    error: str | None, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flows.load

    counts = dict.fromkeys(
        ("parts_loaded", "parts_skipped", "inserted", "updated", "unchanged", "rejected", "outcomes"), 1
    )

    async def load(**kwargs: Any) -> State[Any]:
        return run_state({"sources": {"shop": counts | ({"error": error} if error else {})}}, 1, {})

    monkeypatch.setattr(flows.load, "load", load)
    monkeypatch.setattr(cli, "_check_database", lambda settings: "postgresql://u@127.0.0.1:5432/stub")
    assert main(["load", "--staging", f"file://{tmp_path / 'st'}"]) == code
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["shop", "1", "1", "1", "1", "1", "1", "1"]
    assert (f"shop: load failed: {error}" in out) is (code == 1)


def test_runs_ls_on_empty_staging_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    staging = f"file://{tmp_path / 'st'}"
    assert main(["runs", "ls", "--staging", staging]) == 0
    assert capsys.readouterr().out == f"no staged runs in {staging}\n"


# -- trawl demo: its sources are package data ----------------------------------------------------------------------


def test_demo_sources_are_package_data_of_trawl_demo() -> None:
    resource = files("trawl.demo") / "sources.yaml"
    assert resource.is_file()
    assert "name: products" in resource.read_text(encoding="utf-8")
    # In the wheel: setuptools ships only what package-data lists.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "sources.yaml" in pyproject["tool"]["setuptools"]["package-data"]["trawl.demo"]


@pytest.mark.usefixtures("restore_logging")
def test_demo_runs_the_packaged_sources_against_its_own_site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def run(args: Any) -> int:
        seen["sources_file"] = Path(args.sources_file)
        seen["text"] = Path(args.sources_file).read_text(encoding="utf-8")
        seen["demo_url"] = os.environ.get("TRAWL_DEMO_URL")
        seen["networks"] = os.environ.get("TRAWL_ALLOWED_NETWORKS")
        return 0

    monkeypatch.setattr(cli, "_run", run)
    assert main(["demo", "--staging", f"file://{tmp_path / 'st'}"]) == 0
    # The package's own file (cwd is an empty tmp dir: no examples/ to find).
    packaged = Path(trawl.__file__).parent / "demo" / "sources.yaml"
    assert seen["sources_file"] == packaged  # not resolved: examples/demo.yaml in a checkout links to it
    assert seen["text"] == (files("trawl.demo") / "sources.yaml").read_text(encoding="utf-8")
    assert seen["demo_url"] is not None and seen["demo_url"].startswith("http://127.0.0.1:")
    assert seen["networks"] == '["127.0.0.0/8"]'


def test_check_the_api_examples(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`trawl check` validates incremental, auth, bodies and details; Secret blocks are read only by a flow."""
    examples = Path(__file__).resolve().parents[3] / "examples" / "api"
    monkeypatch.setenv("API_URL", "https://api.example.com")
    for name in ("API_TOKEN", "API_PASSWORD", "API_KEY", "PRODUCT_KEY"):
        monkeypatch.setenv(name, "value-123456")
    assert main(["check", str(examples / "tickets.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{examples / 'tickets.yaml'}: OK, 2 source(s): tickets (api), products (api)",
        "(${secret:NAME} references are read from Prefect Secret blocks when a flow runs)",
    ]
    for name in ("auth.yaml", "graphql.yaml", "shapes.yaml"):
        assert main(["check", str(examples / name)]) == 0
    bad = _write(
        tmp_path / "bad.yaml",
        "sources:\n  - name: feed\n    kind: api\n    url: https://api.example.com/x\n"
        "    incremental: {cursor_path: updated_at, lag: -5}\n"
        "  - name: search\n    kind: api\n    url: https://api.example.com/x\n    body: {q: 1}\n",
    )
    assert main(["check", bad]) == 2
    assert _errors(capsys.readouterr().err) == [
        f"trawl: error: {bad}: sources[0] (feed): incremental.lag: Input should be greater than or equal to 0",
        f"trawl: error: {bad}: sources[1] (search): `body` needs `method: POST`",
    ]
