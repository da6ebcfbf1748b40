"""A token from the environment never lands where trawl writes: staging, PostgreSQL, metrics, artifacts, logs."""

from __future__ import annotations

import asyncio
import gzip
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus
from uuid import UUID

import asyncpg
import pytest
import scrapy
import yaml
from aiohttp import web
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

from flows.pipeline import pipeline
from trawl.logs import configure_logging
from trawl.masking import clear_secrets
from trawl.metrics import METRICS

pytestmark = [pytest.mark.integration]

HERE = sys.modules[__name__].__name__  # the spiders below are loaded as `HERE:Class`
TOKEN = "Tk+7Qx/9Lk2Vb8Zr-secret"  # "+" and "/": the URL-encoded spellings must be masked too
SPELLINGS = (TOKEN, quote(TOKEN, safe=""), quote_plus(TOKEN), "7Qx/9Lk2Vb8Zr", "7Qx%2F9Lk2Vb8Zr")


class CrashingSpider(scrapy.Spider):
    """Fetches ``{base}/crash?key={token}`` and fails parsing it with the token in the exception (a traceback)."""

    name = "crashing"

    def __init__(self, base: str, token: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = [f"{base}/crash?key={quote_plus(token)}"]
        self.token = token

    def parse(self, response: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        raise RuntimeError(f"cannot parse the page given {self.token}")


class BrokenSpider(scrapy.Spider):
    """Cannot even start: its error (holding the token) fails the source."""

    name = "broken"

    def __init__(self, token: str, **kwargs: Any) -> None:
        raise RuntimeError(f"login refused for token {token}")


class Api:
    """Two JSON pages on a loopback port: the second reached through a ``next`` URL carrying the token."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        self.keys: list[str] = []
        self.base = ""
        self._runner: web.AppRunner | None = None

    async def page(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization", ""))
        self.keys.append(request.query.get("api_key", ""))
        n = int(request.match_info["n"])
        nxt = f"/api/p{n + 1}?api_key={quote_plus(TOKEN)}" if n < 2 else None
        return web.json_response({"items": [{"id": n, "name": f"item {n}"}], "next": nxt})

    async def crash(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>boom</body></html>", content_type="text/html")

    async def __aenter__(self) -> Api:
        app = web.Application()
        app.router.add_get("/api/p{n}", self.page)
        app.router.add_get("/crash", self.crash)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with Api() as server:
        yield server


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    clear_secrets()
    yield
    clear_secrets()


def _leaks(where: str, text: str) -> list[str]:
    return [f"{where}: {s!r}" for s in SPELLINGS if s in text]


def _staged_text(root: Path) -> str:
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            out.append((gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace"))
    return "\n".join(out)


async def _database_text(db: asyncpg.Connection) -> str:
    tables = await db.fetch(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'"
    )
    assert {r["table_name"] for r in tables} >= {"tokened", "_outcomes", "_lineage", "_runs", "_loads"}
    out = []
    for r in tables:
        name = f'"{r["table_schema"]}"."{r["table_name"]}"'
        out.append(await db.fetchval(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {name} t") or "")
    return "\n".join(out)


async def _prefect_text(flow_run_ids: list[str]) -> str:
    ids = [UUID(i) for i in flow_run_ids]
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    assert artifacts, "the run published no artifacts"
    return "\n".join([*(f"{a.key} {a.description} {a.data}" for a in artifacts), *(lg.message for lg in logs)])


@pytest.mark.usefixtures("restore_logging")
async def test_env_token_never_lands_where_trawl_writes(
    monkeypatch: pytest.MonkeyPatch,
    prefect_api: str,
    database_url: str,
    db: asyncpg.Connection,
    api: Api,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging = tmp_path / "staging"
    monkeypatch.setenv("TRAWL_DATABASE_URL", database_url)
    monkeypatch.setenv("TRAWL_STAGING", f"file://{staging}")
    monkeypatch.setenv("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
    monkeypatch.setenv("TRAWL_BACKOFF_BASE", "0.01")
    monkeypatch.setenv("TRAWL_BACKOFF_MAX", "0.02")
    monkeypatch.setenv("TRAWL_SOURCE_LOCK", "off")
    monkeypatch.setenv("TRAWL_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("TRAWL_TEST_API", api.base)  # an address from the environment: not a secret
    port = METRICS.serve(0)
    sources = {
        "version": 1,
        "sources": [
            {
                "name": "tokened",
                "kind": "api",
                "url": "${TRAWL_TEST_API}/api/p1",
                "params": {"api_key": "${TRAWL_TEST_TOKEN}"},
                "headers": {"Authorization": "Bearer ${TRAWL_TEST_TOKEN}", "X-Token": "${TRAWL_TEST_TOKEN}"},
                "items_path": "items",
                "pagination": {"type": "next_url", "next_path": "next"},
                "robots": False,
                "fields": {"id": {"type": "int"}, "name": {"type": "text"}},
            },
            {
                "name": "crashing",
                "kind": "spider",
                "spider": f"{HERE}:CrashingSpider",
                "args": {"base": "${TRAWL_TEST_API}", "token": "${TRAWL_TEST_TOKEN}"},
                "robots": False,
            },
            {
                "name": "broken",
                "kind": "spider",
                "spider": f"{HERE}:BrokenSpider",
                "args": {"token": "${TRAWL_TEST_TOKEN}"},
                "robots": False,
            },
        ],
    }
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(sources))
    configure_logging("json", "INFO")  # as `trawl run` does: the log stream under test

    result = await pipeline(str(path))

    crawled = {s["source"]: s for s in result["crawl"]}
    assert crawled["tokened"]["status"] == "complete" and crawled["tokened"]["records"] == 2
    assert crawled["broken"]["status"] == "failed" and "login refused for token ***" in crawled["broken"]["error"]
    # The token did its job: the API got it in the header and the query, on both pages.
    assert api.auth == [f"Bearer {TOKEN}"] * 2 and api.keys == [TOKEN] * 2
    assert await db.fetchval("SELECT count(*) FROM trawl.tokened") == 2
    keys = sorted(await db.fetchval("SELECT array_agg(_key) FROM trawl.tokened"))
    assert keys == [f"{api.base}/api/p1?api_key=***", f"{api.base}/api/p2?api_key=***"]  # URL keys, masked

    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    logs = capsys.readouterr()
    assert "cannot parse the page given ***" in logs.out  # Scrapy's traceback of the crash, masked
    assert "Traceback" in logs.out
    leaks = [
        *_leaks("staging", await asyncio.to_thread(_staged_text, staging)),
        *_leaks("postgres", await _database_text(db)),
        *_leaks("metrics", metrics),
        *_leaks("prefect", await _prefect_text([result["flow_run_id"], result["crawl_flow_run_id"]])),
        *_leaks("stdout", logs.out),
        *_leaks("stderr", logs.err),
        *_leaks("result", repr(result)),
    ]
    assert leaks == []
