"""A real Prefect stack for the deployment tests: `prefect server`, `make deploy`, process workers via `make worker`.

Each module that asks for ``prefect_stack`` gets its own server (module scope,
~20 s to come up), its own PostgreSQL database and its own staging directory;
it starts the workers it needs with ``prefect_stack.start_worker``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.databases import scratch_database
from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process group; the Prefect worker ignores the first signal, so send two, then kill."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _wait_healthy(api: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class PrefectStack:
    """A running Prefect server with trawl deployed to it, a database and a staging directory of its own."""

    api: str
    ui: str
    env: dict[str, str]
    staging: Path
    database_url: str
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**self.env, **(extra or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str, extra: dict[str, str], args: str = "") -> subprocess.Popen[bytes]:
        """`make worker` with the environment flow runs get (database and staging of this stack, plus ``extra``)."""
        env = {"TRAWL_DATABASE_URL": self.database_url, "TRAWL_STAGING": f"file://{self.staging}", **extra}
        return self.start(name, ["make", "worker", *([f"WORKER_ARGS={args}"] if args else [])], env)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def stack_database_url(pg_server_dsn: str) -> Iterator[str]:
    """The stack's own database, dropped after the stack has stopped."""
    with scratch_database(pg_server_dsn, "trawl_stack") as url:
        yield url


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory, stack_database_url: str) -> Iterator[PrefectStack]:
    """Server, `trawl` pool and every deployment of prefect.yaml; no worker yet. Torn down after the module."""
    tmp = tmp_path_factory.mktemp("prefect-stack")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("TRAWL_", "PREFECT_"))}
    env = {
        **keep,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    logs = tmp / "logs"
    logs.mkdir()
    stack = PrefectStack(api, f"http://127.0.0.1:{port}", env, tmp / "staging", stack_database_url, logs)
    try:
        server = stack.start(
            "server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        )
        _wait_healthy(api, server, logs / "server.log")
        deployed = subprocess.run(
            ["make", "deploy"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield stack
    finally:
        for proc in reversed(stack.procs):
            _stop(proc)
