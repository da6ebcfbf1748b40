"""Secrets out of data: the registry config and Secret blocks fill, and every place trawl writes through it."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import structlog
import yaml
from aiohttp import web
from prometheus_client import generate_latest

from trawl.config import load_sources
from trawl.errors import FetchError
from trawl.fetch import Fetcher
from trawl.logs import configure_logging
from trawl.masking import clear_secrets, mask, mask_text, register_secret
from trawl.metrics import METRICS
from trawl.records import Outcome, OutcomeKind, Record
from trawl.settings import Settings
from trawl.urls import host_of

TOKEN = "s3cr3t-T0ken/with+chars"


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    clear_secrets()
    yield
    clear_secrets()


async def _load(tmp_path: Path, entries: list[dict[str, object]], env: dict[str, str]) -> None:
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump({"sources": entries}))
    await asyncio.to_thread(load_sources, path, env)


async def test_env_values_are_registered_except_addresses_and_defaults(tmp_path: Path) -> None:
    env = {
        "TOKEN": TOKEN,
        "BASE": "https://api.example.com/v1",
        "HOST": "hostname-only.example",
        "PASS": "pw-from-env-1",
        "KEY": "key-in-a-query-9",
    }
    await _load(
        tmp_path,
        [
            {
                "name": "a",
                "kind": "api",
                "url": "${BASE}/items?k=${KEY}",
                "params": {"token": "${TOKEN}", "page_size": "${SIZE:-default-size-100}"},
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "credentials_origins": ["https://${HOST}"],
            },
            {"name": "b", "kind": "api", "url": "https://user:${PASS}@other.example/x"},
        ],
        env,
    )
    assert mask(f"a {TOKEN} b") == "a *** b"
    assert mask("q=s3cr3t-T0ken%2Fwith%2Bchars") == "q=***"  # its URL-encoded spelling too
    assert mask("key-in-a-query-9") == "***"  # in a URL's query: a secret
    assert mask("pw-from-env-1") == "***"  # in a URL's user:password@: a secret
    assert mask("https://api.example.com/v1/items") == "https://api.example.com/v1/items"  # an address
    assert mask("hostname-only.example") == "hostname-only.example"  # a host in a URL field: an address
    assert mask("default-size-100") == "default-size-100"  # written in the file


def test_record_and_outcome_envelopes_are_masked() -> None:
    register_secret(TOKEN)
    url = f"https://bob:hunter2@api.example/x?token={TOKEN}"
    now = datetime.now(UTC)
    by_url = Record("s", url, url, now, "r", {"a": 1}).envelope()
    assert by_url["url"] == by_url["key"] == "https://bob:***@api.example/x?token=***"
    by_field = Record("s", f"id-{TOKEN}", url, now, "r", {"a": 1}).envelope()
    assert by_field["key"] == "id-***"
    outcome = Outcome("r", "s", url, OutcomeKind.FAILED, error=f"GET {url} failed: {TOKEN}").envelope()
    assert TOKEN not in orjson.dumps(outcome).decode() and "hunter2" not in orjson.dumps(outcome).decode()


@pytest.mark.usefixtures("restore_logging")
def test_tracebacks_are_masked_after_formatting(capsys: pytest.CaptureFixture[str]) -> None:
    register_secret(TOKEN)
    configure_logging("json", "INFO")
    try:
        raise RuntimeError(f"the API refused {TOKEN}")
    except RuntimeError:
        structlog.get_logger("trawl.test").exception("source crashed")
        logging.getLogger("scrapy.core.scraper").error("Spider error", exc_info=True)
    out = capsys.readouterr().out
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["event"] for line in lines] == ["source crashed", "Spider error"]
    assert all("the API refused ***" in line["exception"] for line in lines)
    assert TOKEN not in out


@pytest.mark.usefixtures("restore_logging")
def test_records_shipped_to_the_prefect_api_are_masked() -> None:
    import prefect  # noqa: F401  - imported before logging is configured, as the CLI does

    register_secret(TOKEN)
    configure_logging("json", "INFO")
    handlers = [h for h in logging.getLogger("prefect.flow_runs").handlers if "APILogHandler" in type(h).__name__]
    assert handlers
    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        record = logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, "run failed: %s", (TOKEN,), sys.exc_info()
        )
    text = handlers[0].format(record)
    assert "run failed: ***" in text and "RuntimeError: failed with ***" in text
    assert TOKEN not in text


def test_host_of_never_keeps_userinfo() -> None:
    assert host_of("http://bob:p@ss@Example.COM:8080/x") == "example.com:8080"
    assert host_of("https://tok@h/x") == "h"
    assert mask_text("see http://bob:p@ss@h/x") == "see http://bob:***@h/x"


async def test_userinfo_never_reaches_the_host_label_or_breaker_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(METRICS, "max_hosts", len(METRICS._hosts) + 10)

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/{tail:.*}", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    settings = Settings(allowed_networks=["127.0.0.0/8"], max_retries=0, breaker_fail_max=1)
    try:
        with structlog.testing.capture_logs() as logs:
            async with Fetcher(settings) as fetcher:
                with pytest.raises(FetchError):
                    await fetcher.get(f"http://bob:p@ss-w0rd-9@127.0.0.1:{port}/x", robots=False)
    finally:
        await runner.cleanup()
    exposition = generate_latest(METRICS.registry).decode()
    assert f'host="127.0.0.1:{port}"' in exposition
    assert "ss-w0rd-9" not in exposition and "bob" not in exposition
    breaker = [e for e in logs if e["event"] == "breaker state changed"]
    assert breaker and all(e["host"] == f"127.0.0.1:{port}" for e in breaker)
