"""Debian's Prometheus tools for tests: a Pushgateway fixture, a Prometheus server, and reading what they hold."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.net import free_port

__all__ = ["Samples", "get", "pushgateway", "samples", "start", "tool", "value", "wait_ready"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs Debian's prometheus and prometheus-pushgateway"
    return path


def get(url: str) -> str:
    """GET a URL's body (blocking: call it through ``asyncio.to_thread`` from a coroutine)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


def start(argv: list[str], ready: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(ready, proc)
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """Debian's Pushgateway on a free loopback port, empty (its own persistence file); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(
        # Debian's build keeps its groups in /var/lib/prometheus by default: each test starts empty.
        [
            tool("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp_path / 'pushgateway.data'}",
        ],
        f"{url}/-/ready",
    )
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
