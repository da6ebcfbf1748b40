"""nginx on loopback serving a directory, for the benchmark: a subprocess with its own config in a temp dir.

    with Nginx(site.root) as server:
        print(server.url)

``daemon off`` (the process is ours to stop), pid, error log and temp paths in
the temp dir, no access log, ``sendfile``, long keep-alive. No
``open_file_cache``: with a max above the open-file limit nginx answers 500
(FIELD-NOTES) and the page cache serves 20,000 small files well anyway.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.helpers.net import free_port

__all__ = ["Nginx", "NginxError", "find_nginx"]

_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
_CONFIG = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    types {{
        text/html html;
        text/plain txt;
    }}
    default_type application/octet-stream;
    charset utf-8;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {root};
        index index.html;
    }}
}}
"""


class NginxError(RuntimeError):
    """nginx is missing, or did not start serving."""


def find_nginx() -> str:
    """The nginx binary: on PATH or where Debian puts it; NginxError with the fix when there is none."""
    found = shutil.which("nginx") or next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise NginxError("nginx is not installed: `apt-get install -y nginx` (or run `make bench`, which does)")
    return found


def _cpu_seconds(pid: int) -> float:
    """user+sys CPU of one process from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Nginx:
    """nginx serving ``root`` on 127.0.0.1 at a free port, for as long as the context lasts."""

    def __init__(self, root: Path, *, workers: int | str = "auto", start_timeout: float = 10.0) -> None:
        self.root = root.resolve()
        self.workers = workers
        self.start_timeout = start_timeout
        self.port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL, no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = find_nginx()
        self._tmp = tempfile.TemporaryDirectory(prefix="trawl-bench-nginx-")
        tmp = Path(self._tmp.name)
        # The port is free when we look; if someone takes it before nginx binds, nginx exits and we retry.
        for _ in range(3):
            self.port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(
                _CONFIG.format(
                    user="user root;\n" if os.geteuid() == 0 else "",  # as root nginx would switch to `nobody`
                    workers=self.workers,
                    tmp=tmp,
                    port=self.port,
                    root=self.root,
                )
            )
            # -e: the error log before the config is read (else /var/log/nginx/error.log); -p: prefix for the rest.
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_serving():
                return
            self.stop()
            self._tmp = tempfile.TemporaryDirectory(prefix="trawl-bench-nginx-")
            tmp = Path(self._tmp.name)
        raise NginxError(f"nginx did not start serving {self.root}")

    def _wait_serving(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
                if "Address already in use" in err:
                    return False
                raise NginxError(f"nginx exited with {self._proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(f"{self.url}/robots.txt", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def pids(self) -> list[int]:
        """The master and its workers."""
        if self._proc is None:
            return []
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return [self._proc.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        """CPU used so far by the master and its live workers (deltas around a run give its share)."""
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def error_log(self) -> str:
        """nginx's error log so far (a 500 or a refused file shows here)."""
        if self._tmp is None:
            return ""
        try:
            return (Path(self._tmp.name) / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
