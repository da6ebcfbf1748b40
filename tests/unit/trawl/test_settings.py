"""Every setting is documented, in the code and in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from trawl.settings import Settings

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_setting_is_documented(name: str) -> None:
    assert Settings.model_fields[name].description, f"{name} has no description"
    assert f"`TRAWL_{name.upper()}`" in README, f"README's settings table lacks TRAWL_{name.upper()}"


def test_environment_overrides_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAWL_PER_HOST_CONCURRENCY", "3")
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_DATABASE_URL", "postgresql://u:pw@h/db")
    s = Settings()
    assert (s.per_host_concurrency, s.allowed_networks) == (3, ["10.0.0.0/8"])
    assert "pw" not in repr(s) and s.database_dsn() == "postgresql://u:pw@h/db"
    monkeypatch.setenv("TRAWL_PER_HOST_CONCURRENCY", "0")
    with pytest.raises(ValidationError, match="per_host_concurrency"):
        Settings()
