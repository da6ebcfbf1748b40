"""Shared fixtures: a real PostgreSQL (a fresh database per test), the demo site, settings for local servers."""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog
from blockbuster import BlockBuster

from tests.helpers.databases import fresh_database
from tests.helpers.net import free_port
from trawl.demo.site import DemoSite
from trawl.settings import Settings

# The loader's fixtures (pool, loader), shared by every module that loads staged parts.
pytest_plugins = ["tests.helpers.loading", "tests.helpers.hostile", "tests.helpers.prometheus"]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parents[1]

# -- No blocking calls on the event loop (as aiohttp's own suite does with blockbuster) ------------------------------

# Code whose blocking calls count: ours, and the tests themselves (a folder, not a package, hence the stand-in
# module). A blocking call fails when one of these is on the stack, including through a library we called from a
# coroutine; a library's own background loop threads (Prefect's services, the test harness's uvicorn) are not ours.
_TESTS = ModuleType("tests")
_TESTS.__path__ = [str(REPO / "tests")]
_SCANNED: list[str | ModuleType] = ["trawl", "sinks", "flows", "spiders", _TESTS]


_FILE_READS = ("os.stat", "io.BufferedReader.read", "io.TextIOWrapper.read")
_SOCKET_IO = tuple(f"socket.socket.{m}" for m in ("connect", "send", "sendall", "recv", "recv_into"))


def _allow_third_party(bb: BlockBuster) -> None:
    """Blocking calls made by libraries we do not control, each allowed where it happens and nowhere else."""

    # pytest's logging plugin writes every record to its log_file handler, /dev/null when no log_file is set.
    write = bb.functions["io.TextIOWrapper.write"]
    can_write = write.can_block_predicate
    write.can_block_predicate = lambda f, *a, **k: getattr(f, "name", None) == os.devnull or can_write(f, *a, **k)

    def allow(functions: tuple[str, ...], file: str, function: str) -> None:
        for name in functions:
            bb.functions[name].can_block_in(file, function)

    # A module's first import (Scrapy, Playwright, Prefect are imported lazily, from coroutines) reads files and
    # runs its module-level code: Scrapy reads its VERSION and resolves paths, Prefect its logging config.
    allow(
        (*_FILE_READS, "os.path.abspath", "os.listdir", "os.scandir"), "<frozen importlib._bootstrap>", "_find_and_load"
    )
    # asyncpg looks for ~/.pgpass and ~/.postgresql certificates on every connect (stat, resolve, read).
    allow((*_FILE_READS, "os.path.abspath"), "asyncpg/connect_utils.py", "_parse_connect_dsn_and_args")
    # botocore (under aiobotocore's create_client) reads ~/.aws/config and credentials files synchronously.
    allow(_FILE_READS, "botocore/configloader.py", "raw_config_parse")
    # botocore (under aiobotocore's create_client) looks up and reads its JSON service models on disk.
    for function in ("load_data_with_path", "list_available_services", "list_api_versions", "load_service_model"):
        allow((*_FILE_READS, "os.listdir", "os.scandir", "os.path.abspath"), "botocore/loaders.py", function)
    # Tests check S3 with a sync boto3 client (trawl itself only uses aiobotocore, whose frames do not match).
    allow((*_SOCKET_IO, "io.BufferedReader.read"), "/botocore/client.py", "_make_api_call")
    allow(("io.BufferedReader.read",), "/botocore/response.py", "read")  # a sync response body
    # TcpProxy.cut()/restore() wait a moment for the proxy's thread; tests call them from their loop (test code).
    bb.functions["threading.Lock.acquire"].can_block_in("tests/conftest.py", "_call")
    # Prefect's flow engine asks the API for the default result storage with its sync client, on our loop.
    allow(_SOCKET_IO, "prefect/results.py", "_read_server_default_result_storage_block_id")
    # Prefect starts its log/event workers (a thread with a loop) from ours and waits for them to come up.
    bb.functions["threading.Lock.acquire"].can_block_in("prefect/_internal/concurrency/services.py", "_new_instance")
    # Prefect's local result storage resolves its base path for each result record.
    allow(("os.path.abspath", "os.stat"), "prefect/filesystems.py", "_resolve_path")
    # Prefect's LocalFileSystem checks and makes result directories synchronously in its async read/write.
    for function in ("aread_path", "awrite_path"):
        allow(("os.stat", "os.mkdir", "os.path.abspath"), "prefect/filesystems.py", function)
    # Prefect's console handler renders tracebacks with rich, which reads the source files.
    allow((*_FILE_READS, "os.path.abspath"), "rich/traceback.py", "_render_stack")
    # Prefect's Task() (made for each subflow run) reads the function's source (inspect.getsource) for its cache key.
    allow((*_FILE_READS, "os.path.abspath"), "prefect/tasks.py", "__init__")
    # Scrapy reads each callback's source once (inspect.getsource) to warn about generators with a return value.
    allow((*_FILE_READS, "os.path.abspath"), "scrapy/utils/misc.py", "is_generator_with_return_value")


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any blocking call (sleep, file or socket I/O, lock wait...) made on a running event loop.

    On for sync tests too: blockbuster only checks a thread while its event loop is running, so a plain sync
    test costs nothing, and one that drives a loop itself (``asyncio.run`` in the CLI, Prefect's sync wrappers)
    is held to the same rule as an async test.
    """
    bb = BlockBuster(_SCANNED)
    _allow_third_party(bb)
    bb.activate()
    try:
        yield bb
    finally:
        bb.deactivate()


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server: ``TRAWL_TEST_DATABASE_URL`` if set, else a throwaway pgserver cluster."""
    url = os.environ.get("TRAWL_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        server = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture
async def database_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A brand-new empty database on the test server, dropped afterwards: tests never share state."""
    async with fresh_database(pg_server_dsn, "trawl_test") as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's fresh database, for assertions."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def demo_site() -> AsyncIterator[DemoSite]:
    """The bundled demo site on a free loopback port, in the test's event loop."""
    async with DemoSite() as site:
        yield site


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for tests: loopback allowed (local servers), fast retries, staging in tmp."""
    return Settings(
        staging=f"file://{tmp_path / 'staging'}",
        allowed_networks=["127.0.0.0/8"],
        backoff_base=0.01,
        backoff_max=0.05,
        connect_timeout=2,
        read_timeout=2,
        total_timeout=5,
    )


@pytest.fixture(scope="session")
def prefect_api(pytestconfig: pytest.Config) -> Iterator[str]:
    """Run flows against ``prefect_test_harness`` (a throwaway server and database); yields its API URL.

    Subprocesses given this URL as ``PREFECT_API_URL`` skip the ~10 s ephemeral-server start.
    """
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        api = str(prefect.settings.PREFECT_API_URL.value())
        # Prefect's flow engine reads the server's default result storage with a sync client it never closes
        # (prefect/results.py, _read_server_default_result_storage_block_id): its socket to this server is
        # collected unclosed. Ignored for this server's port only; every other unclosed socket still fails.
        leaked = rf"Exception ignored in. <socket\.socket .*raddr=\('127\.0\.0\.1', {urlsplit(api).port}\)>"
        pytestconfig.addinivalue_line("filterwarnings", f"ignore:{leaked}:pytest.PytestUnraisableExceptionWarning")
        # The line above applies from the next test on; this, to the test that started the server.
        warnings.filterwarnings("ignore", leaked, pytest.PytestUnraisableExceptionWarning)
        yield api


# -- S3 over HTTP: moto's server, and a TCP proxy in front of it that a test can cut and restore -------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server (``moto_server``) on a free loopback port, for the whole session."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:  # pragma: no cover - the message says why
            pytest.fail("moto_server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on moto; AWS credentials and region for the default chain set in the environment."""
    import boto3

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"trawl-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


class TcpProxy:
    """A TCP proxy on a fixed loopback port in its own thread: ``cut()`` refuses and drops every connection."""

    def __init__(self, target_port: int) -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coro: object) -> None:
        # Waits (briefly) for the proxy's own loop; the blockbuster fixture lets tests call it from theirs.
        import asyncio

        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: object, writer: object) -> None:
        try:
            while data := await reader.read(65536):  # type: ignore[attr-defined]
                writer.write(data)  # type: ignore[attr-defined]
                await writer.drain()  # type: ignore[attr-defined]
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()  # type: ignore[attr-defined]

    async def _handle(self, reader: object, writer: object) -> None:
        import asyncio

        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()  # type: ignore[attr-defined]
            return
        self._writers.update((writer, up_writer))  # type: ignore[arg-type]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))  # type: ignore[arg-type]

    def restore(self) -> None:
        import asyncio

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(start())

    def cut(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()

        self._call(stop())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def s3_proxy(moto_endpoint: str) -> Iterator[TcpProxy]:
    """A cuttable TCP proxy in front of moto (point ``s3_endpoint_url`` at ``proxy.url``)."""
    from urllib.parse import urlsplit

    proxy = TcpProxy(int(urlsplit(moto_endpoint).port or 0))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger's handlers and level and structlog's configuration as they were (for tests that log)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
