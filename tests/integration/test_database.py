"""PostgreSQL errors at connect time, classified by SQLSTATE: what may pass is retried, what will not is one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from trawl.database import connect_pool
from trawl.errors import DatabaseRefused, DatabaseUnavailable

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _other_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def test_an_unknown_database_is_refused_not_retried(pg_server_dsn: str) -> None:
    with pytest.raises(DatabaseRefused, match='"trawl_no_such_db" does not exist') as caught:
        await connect_pool(_other_database(pg_server_dsn, "trawl_no_such_db"))
    assert not caught.value.transient


async def test_nothing_listening_is_unavailable_and_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(DatabaseUnavailable, match=f"127.0.0.1:{port}") as caught:
        await connect_pool(f"postgresql://postgres@127.0.0.1:{port}/x")
    assert caught.value.transient


def test_cli_says_one_line_and_exits_2_for_a_refused_database(pg_server_dsn: str, tmp_path: Path) -> None:
    dsn = _other_database(pg_server_dsn, "trawl_no_such_db")
    proc = subprocess.run(
        [sys.executable, "-m", "trawl.cli", "load", "--staging", str(tmp_path), "--database-url", dsn],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trawl: error:")]
    assert len(lines) == 1 and "trawl_no_such_db" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
