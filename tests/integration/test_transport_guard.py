"""Nothing reaches the forbidden network on the html (aiohttp), api (httpx) and spider (Scrapy) paths, a bad
redirect fails only its URL, and decompression bombs fail within bounded memory.

The hostile fleet (tests/helpers/hostile.py) allows ``127.0.0.0/24``; its forbidden listener on ``127.0.1.1``
counts every connection. Each kind meets a page that redirects there, a DNS answer that changes between the
guard's check and the connection, and a link (html, spider) or next page (api) pointing there.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers.hostile import Hostile
from tests.helpers.transport import HostileSite, run_source, source_for
from trawl.settings import Settings

pytestmark = [pytest.mark.integration]

KINDS = ["html", "api", "spider"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def site() -> Any:
    async with HostileSite() as s:
        yield s


def hostile_settings(hostile: Hostile, **kw: Any) -> Settings:
    return Settings(
        allowed_networks=hostile.allowed,
        max_retries=0,
        backoff_base=0.01,
        backoff_max=0.05,
        connect_timeout=2,
        read_timeout=5,
        total_timeout=10,
        **kw,
    )


# --- the network guard on every transport ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_redirect_to_the_forbidden_network_is_blocked(kind: str, hostile: Hostile, site: HostileSite) -> None:
    start = site.to(hostile.forbidden.url())
    run = await run_source(source_for(kind, start), hostile_settings(hostile))
    outcome = run.outcome(start)
    assert outcome.outcome.value == "blocked_network", outcome
    assert "127.0.1.1" in (outcome.error or "")
    assert run.records == []
    assert site.hits.get("/to") == 1
    assert hostile.forbidden.hits == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_dns_answer_that_changes_after_the_check_is_blocked(kind: str, hostile: Hostile) -> None:
    # The guard's check sees 127.0.0.2 (allowed); every later lookup, the connection's, gets 127.0.1.1.
    hostile.dns.rebind("rebind.test", "127.0.0.2")
    url = f"http://rebind.test:{hostile.forbidden.port}/latest/meta-data/"
    run = await run_source(source_for(kind, url), hostile_settings(hostile))
    outcome = run.outcome(url)
    assert outcome.outcome.value == "blocked_network", outcome
    assert "rebind.test resolves to 127.0.1.1" in (outcome.error or "")
    assert hostile.dns.calls["rebind.test"] >= 2  # checked, then looked up again where the connection is made
    assert hostile.forbidden.hits == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_link_or_next_page_into_the_forbidden_network_is_blocked(
    kind: str, hostile: Hostile, site: HostileSite
) -> None:
    target = hostile.forbidden.url()
    start = site.api(target) if kind == "api" else site.links(target)
    run = await run_source(source_for(kind, start, follow=True), hostile_settings(hostile))
    assert run.outcome(start).outcome.value == "fetched"
    assert run.outcome(target).outcome.value == "blocked_network", run.outcomes
    assert len(run.records) == 1  # the first page's; nothing from the forbidden one
    assert hostile.forbidden.hits == 0


async def test_httpx_connects_to_the_address_it_checked(hostile: Hostile, site: HostileSite) -> None:
    # Both lookups allowed: the httpx path resolves through the guard (the system resolver knows no rebind.test).
    hostile.dns.set("api.test", ["127.0.0.1"])
    port = site.url.rsplit(":", 1)[1]
    url = f"http://api.test:{port}/api?next="
    run = await run_source(source_for("api", url), hostile_settings(hostile))
    assert run.error is None
    assert run.outcome(url).outcome.value == "fetched"
    assert [r.data["id"] for r in run.records] == [1]
    assert hostile.dns.calls["api.test"] >= 2


# --- a malformed redirect fails its URL, not its source ----------------------------------------------------------


BAD_LOCATIONS = ["http://[::1/", "http://127.0.0.1:99999/", "http://exa mple.com:x/"]


@pytest.mark.parametrize("location", BAD_LOCATIONS)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_malformed_redirect_fails_only_its_url(
    kind: str, location: str, hostile: Hostile, site: HostileSite
) -> None:
    bad = site.to(location)
    good = site.api("") if kind == "api" else site.links(site.url + "/nowhere")
    settings = hostile_settings(hostile)
    run = await run_source(source_for(kind, bad), settings)
    outcome = run.outcome(bad)
    assert outcome.outcome.value == "failed", outcome
    assert f"redirect to a bad Location {location!r}" in (outcome.error or "")
    if kind == "api":  # a failed page ends an api source by design (pagination cannot go on): a FetchError
        assert type(run.error).__name__ == "FetchError"
    else:
        assert run.error is None, run.error
    # The source still works: the same kind of source goes on after the bad hop.
    again = await run_source(source_for(kind, f"{bad},{good}" if kind == "spider" else good), settings)
    assert again.error is None
    assert again.outcome(good).outcome.value == "fetched"
    assert hostile.forbidden.hits == 0


# --- decompression bombs -------------------------------------------------------------------------------------------

LIMIT = 2**20


async def _child(kind: str, url: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.transport",
        kind,
        url,
        str(LIMIT),
        cwd=str(REPO),
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_decompression_bomb_fails_in_bounded_memory(kind: str, coding: str, site: HostileSite) -> None:
    url = f"{site.url}/bomb/{coding}"
    result = await _child(kind, url)
    assert result["outcomes"] == [[url, "failed", f"body larger than {LIMIT} bytes"]], result
    grown_mb = (result["peak_kb"] - result["baseline_kb"]) / 1024
    assert grown_mb < 100, f"peak RSS grew {grown_mb:.0f} MB fetching a {coding} bomb on the {kind} path"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_environment_proxy_is_not_used(
    kind: str, hostile: Hostile, site: HostileSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy connects to the target itself, past the guard: trawl's transports ignore HTTP(S)_PROXY/ALL_PROXY.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, hostile.forbidden.base)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = site.api("") if kind == "api" else site.links(site.url + "/nowhere")
    run = await run_source(source_for(kind, start), hostile_settings(hostile))
    assert run.outcome(start).outcome.value == "fetched"
    assert hostile.forbidden.hits == 0
