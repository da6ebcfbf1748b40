"""Start-up: how long `trawl crawl` takes from its launch to its first request, with and without a Prefect server.

    python -m benchmarks.startup [--runs 3]

`trawl crawl` runs the ``crawl`` flow through Prefect. Without ``PREFECT_API_URL``
Prefect starts a temporary server of its own for every process (ephemeral
mode); with one it talks to that. This measures, for a one-page html source
against a local HTTP server (started here, in a thread), the time from
launching ``trawl crawl SOURCES.yaml`` to the first request (trawl's robots.txt)
and to the first page arriving at that server, and to the process's exit:

- ``no Prefect server``: no ``PREFECT_API_URL``, so each run pays for the
  temporary server;
- ``running Prefect server``: ``prefect server start`` on a free loopback port,
  started here and waited for (``/api/health``), ``PREFECT_API_URL`` pointing at
  it: what ``make server`` + ``PREFECT_API_URL=http://127.0.0.1:4200/api`` gives
  when iterating locally;
- ``no Prefect (crawl alone)``: for reference, the same source crawled by
  ``benchmarks.trawl_crawl``, which calls ``crawl_source`` without Prefect:
  interpreter, imports and trawl's own start.

Every case runs once untimed first (Prefect's first use of a new home creates
and migrates its database), then ``--runs`` times; the table has the medians.
Prefect's home (``PREFECT_HOME``: its database, the server's too) and staging
are in a temporary directory, so nothing of the user's Prefect is touched.
Telemetry is off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
_PAGE = b'<!doctype html><html><head><title>start-up</title></head><body><h1 class="name">One</h1></body></html>'
_FILES = {"/index.html": (_PAGE, "text/html"), "/robots.txt": (b"User-agent: *\n", "text/plain")}
_SOURCES = """\
version: 1
sources:
  - name: startup
    kind: html
    start_urls: ["{url}/index.html"]
    fields:
      name: {{selector: h1.name, required: true}}
"""


class _Site(ThreadingHTTPServer):
    """A one-page site that notes when each request arrives (this process's perf_counter)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.first = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.arrivals.clear()
            self.first.clear()

    def note(self, path: str) -> None:
        with self.lock:
            self.arrivals.append((time.perf_counter(), path))
        self.first.set()


class _Handler(BaseHTTPRequestHandler):
    server: _Site
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.note(self.path)
        body, ctype = _FILES.get(self.path, (b"", "text/plain"))
        self.send_response(200 if self.path in _FILES else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@dataclass(slots=True)
class _Run:
    first_request_s: float | None  # launch -> the first request (robots.txt) at the site
    first_page_s: float | None  # launch -> the page itself
    exit_s: float
    exit_code: int | None


@dataclass(slots=True)
class _Case:
    name: str
    warmup: _Run | None = None
    runs: list[_Run] = field(default_factory=list)
    note: str = ""

    def median(self, attr: str) -> float | None:
        values = [v for r in self.runs if (v := getattr(r, attr)) is not None]
        return statistics.median(values) if values else None

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.exit_code == 0 and r.first_page_s is not None for r in self.runs)


def _env(tmp: Path, api_url: str | None) -> dict[str, str]:
    # Nothing of the user's Prefect: not their API, profile or database (Prefect's stock profiles, "ephemeral" on).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRAWL_", "PREFECT_API_", "PREFECT_PROFILES_PATH", "PREFECT_SERVER_"))
    }
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_PROFILE="ephemeral",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TRAWL_ALLOWED_NETWORKS='["127.0.0.0/8"]',
        TRAWL_STAGING=(tmp / "staging").as_uri(),
        TRAWL_PROGRESS="off",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _one(argv: list[str], env: dict[str, str], site: _Site, log: Path, timeout: float) -> _Run:
    site.reset()
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        exit_s = time.perf_counter() - t0
    with site.lock:
        arrivals = list(site.arrivals)
    first = arrivals[0][0] - t0 if arrivals else None
    page = next((t - t0 for t, path in arrivals if path == "/index.html"), None)
    return _Run(first, page, exit_s, code)


def _case(name: str, argv: list[str], env: dict[str, str], site: _Site, runs: int, log: Path) -> _Case:
    case = _Case(name)
    print(f"{name}: warm-up ...", end=" ", flush=True)
    case.warmup = _one(argv, env, site, log, timeout=300)
    print(f"{_fmt(case.warmup.first_request_s)} s; runs:", end=" ", flush=True)
    for _ in range(runs):
        r = _one(argv, env, site, log, timeout=300)
        case.runs.append(r)
        print(_fmt(r.first_request_s), end=" ", flush=True)
    print("" if case.ok else f"FAILED (exit codes {[r.exit_code for r in case.runs]}; log: {log})", flush=True)
    return case


def _healthy(api_url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def _start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """`prefect server start` on a free port; (the process, its API URL, seconds until /api/health answered)."""
    port = free_port()
    prefect = str(Path(sys.executable).with_name("prefect"))
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own group: its workers go with it
        )
    api_url = f"http://127.0.0.1:{port}/api"
    if not _healthy(api_url, timeout=120):
        _stop(proc)
        raise RuntimeError(f"prefect server did not answer {api_url}/health within 120 s (log: {log})")
    return proc, api_url, time.perf_counter() - t0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _table(cases: list[_Case], runs: int) -> str:
    head = ["case", "first request s", "first page s", "exit s", "first request, each run s", "first run s"]
    rows = [
        [
            c.name + ("" if c.ok else " (FAILED)"),
            _fmt(c.median("first_request_s")),
            _fmt(c.median("first_page_s")),
            _fmt(c.median("exit_s")),
            " / ".join(_fmt(r.first_request_s) for r in c.runs),
            _fmt(c.warmup.first_request_s if c.warmup else None),
        ]
        for c in cases
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for r in rows:
        lines.append(
            "| "
            + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
            + " |"
        )
    return "\n".join(lines) + f"\n\nmedians of {runs} runs after one untimed first run per case"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (the table shows their median)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, staging, Prefect)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="trawl-bench-startup-"))
    trawl = str(Path(sys.executable).with_name("trawl"))
    site = _Site()
    threading.Thread(target=site.serve_forever, name="startup-site", daemon=True).start()
    sources = tmp / "sources.yaml"
    sources.write_text(_SOURCES.format(url=site.url))
    crawl_argv = [trawl, "crawl", str(sources)]
    print(f"site: {site.url}; work dir: {tmp}; load average before: {_load()}", flush=True)
    cases: list[_Case] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        cases.append(_case("no Prefect server", crawl_argv, _env(tmp, None), site, args.runs, tmp / "ephemeral.log"))
        server, api_url, healthy_s = _start_server(_env(tmp, None), tmp / "prefect-server.log")
        print(f"prefect server start: {api_url} answered /api/health after {healthy_s:.1f} s", flush=True)
        with_server = _case(
            "running Prefect server", crawl_argv, _env(tmp, api_url), site, args.runs, tmp / "server.log"
        )
        with_server.note = (
            f"the server's own start: {healthy_s:.1f} s until /api/health answered (database made by the runs before)"
        )
        cases.append(with_server)
        _stop(server)
        server = None
        alone = [
            sys.executable,
            "-m",
            "benchmarks.trawl_crawl",
            f"--url={site.url}/index.html",
            f"--out={tmp / 'alone'}",
        ]
        cases.append(_case("no Prefect (crawl alone)", alone, _env(tmp, None), site, args.runs, tmp / "alone.log"))
    except RuntimeError as exc:
        print(f"error: {exc} (work dir kept: {tmp})", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            _stop(server)
        site.shutdown()

    print(
        f"\n`trawl crawl` of a one-page html source, launch to the first request at the site (load average "
        f"after: {_load()}, {os.cpu_count()} CPUs)\n"
    )
    print(_table(cases, args.runs))
    for c in cases:
        if c.note:
            print(f"{c.name}: {c.note}")
    ok = all(c.ok for c in cases)
    if ok and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"logs, staging and Prefect's home kept in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
