"""What the flows share: building settings at the flow's edge and telling which run this is."""

from __future__ import annotations

from typing import Any

from prefect.runtime import flow_run

from trawl.settings import Settings

__all__ = ["current_flow_run_id", "settings_for"]


def settings_for(staging: str | None) -> Settings:
    """Settings from the environment, with the flow's staging parameter on top."""
    overrides: dict[str, Any] = {"staging": staging} if staging else {}
    return Settings(**overrides)


def current_flow_run_id() -> str | None:
    """The Prefect flow run id, when running inside one."""
    run_id = flow_run.id
    return str(run_id) if run_id else None
