"""Custom checks by registered name: registered in code or installed as a `trawl.checks` entry point, nothing else."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trawl import checks


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution on sys.path whose metadata declares a `trawl.checks` entry point `unit_even`."""
    (tmp_path / "unit_checks_mod.py").write_text(
        "def even(value, data):\n    return value % 2 == 0\n\nnot_callable = 3\n", encoding="utf-8"
    )
    info = tmp_path / "unit_checks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unit-checks\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[trawl.checks]\nunit_even = unit_checks_mod:even\nunit_number = unit_checks_mod:not_callable\n"
        "unit_gone = no_such_module_xyz:f\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checks._entry_points.cache_clear()
    yield tmp_path
    checks._entry_points.cache_clear()
    for name in ("unit_even", "unit_number", "unit_gone"):
        checks._LOADED.pop(name, None)
    sys.modules.pop("unit_checks_mod", None)


def test_an_installed_entry_point_is_a_check_loaded_when_first_named(installed: Path) -> None:
    assert "unit_even" in checks.registered()
    assert "unit_checks_mod" not in sys.modules  # listed, not imported
    even = checks.resolve("unit_even")
    assert even(4, {}) is True and even(3, {}) is False
    assert checks.resolve("unit_even") is even
    with pytest.raises(checks.UnknownCheck, match=r"entry point unit_checks_mod:not_callable is not callable"):
        checks.resolve("unit_number")
    with pytest.raises(checks.UnknownCheck, match=r"entry point no_such_module_xyz:f cannot be loaded"):
        checks.resolve("unit_gone")


def test_registered_in_code_and_nothing_else() -> None:
    @checks.register("unit_positive")
    def positive(value: Any, data: Any) -> bool:
        return bool(value > 0)

    assert checks.resolve("unit_positive") is positive
    for name in ("builtins:exec", "os:system", "nope"):
        with pytest.raises(checks.UnknownCheck, match=f"no check registered as '{name}'"):
            checks.resolve(name)
    for bad in ("a:b", "bad name", "ok\n", ""):
        with pytest.raises(ValueError, match="must match"):
            checks.register(bad)
