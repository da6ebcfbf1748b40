"""The README's api examples are the sources files the tests run (examples/api/), word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "api").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_readme_shows_the_example_the_tests_run(example: Path) -> None:
    lines = example.read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):  # the file's header says which test runs it
        lines.pop(0)
    assert f"```yaml\n{''.join(lines)}```" in (REPO / "README.md").read_text()


def test_every_example_is_run_by_a_test() -> None:
    assert {p.name for p in EXAMPLES} == {"auth.yaml", "graphql.yaml", "shapes.yaml", "tickets.yaml"}
    tests = "".join(p.read_text() for p in (REPO / "tests").rglob("test_api_*.py"))
    for p in EXAMPLES:
        assert f'"{p.name}"' in tests, p.name
