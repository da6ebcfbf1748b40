"""Prefect for in-process flow tests: one temporary API server for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Run flows against ``prefect_test_harness`` (a throwaway server and database); yields its API URL."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(prefect.settings.PREFECT_API_URL.value())
