"""`api` sources as real APIs need them: OAuth2 and other auth, POST bodies, detail requests, response shapes.

Sources are written as YAML (the README's examples are taken from these files) and
run through the real request path against a SaaS-like API on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from tests.helpers.saas import CLIENT_SECRET, PRODUCT_KEY, SaasApi, serve
from trawl.config import ApiSource, load_sources
from trawl.connectors import SourceContext, connector_for
from trawl.errors import ConfigError, FetchError, PermanentFetchError
from trawl.fetch import Fetcher
from trawl.incremental import CursorWindow
from trawl.masking import mask
from trawl.records import Outcome, OutcomeKind
from trawl.settings import Settings

if TYPE_CHECKING:
    from conftest import Harness  # tests/unit/trawl/connectors/conftest.py

EXAMPLES = Path(__file__).resolve().parents[4] / "examples" / "api"


@pytest.fixture
async def saas() -> AsyncIterator[SaasApi]:
    async for api in serve(SaasApi()):
        yield api


async def api_sources(path: Path, **env: str) -> list[ApiSource]:
    spec = await asyncio.to_thread(load_sources, path, env)
    return [s for s in spec.sources if isinstance(s, ApiSource)]


async def written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, text)
    return path


OAUTH_SOURCES = """\
sources:
  - name: tickets
    kind: api
    url: ${API_URL}/v1/tickets
    auth:
      type: oauth2_client_credentials
      access_token_url: ${API_URL}/oauth/token
      client_id: trawl-client
      client_secret: ${CLIENT_SECRET}
      scopes: [tickets.read]
    items_path: data
    pagination: {type: page, param: page, size_param: per_page, size: 5}
    politeness: {delay: 0.35}
    key: id
    fields:
      id: {type: int, required: true}
      updated_at: {type: timestamp}
"""


async def test_oauth2_token_is_renewed_before_it_expires(harness: Harness, saas: SaasApi, tmp_path: Path) -> None:
    saas.token_lifetime = 2
    [source] = await api_sources(await written(tmp_path, OAUTH_SOURCES), API_URL=saas.url, CLIENT_SECRET=CLIENT_SECRET)
    started = asyncio.get_running_loop().time()
    records = await harness.run(source)
    assert asyncio.get_running_loop().time() - started > 3  # the run outlives the first token
    assert sorted(int(r.key or 0) for r in records) == list(range(1, 51))
    assert saas.unauthorized == 0  # renewed before expiry: no request met a 401
    assert saas.token_requests >= 2
    assert harness.outcome_kinds() == {"fetched": 11}
    assert mask(CLIENT_SECRET) == "***"  # the client secret is masked wherever trawl writes
    assert all(mask(t) == "***" for t in saas.tokens)  # and so is every token it got


async def test_revoked_token_gets_one_refresh_then_fails_with_the_status(
    harness: Harness, saas: SaasApi, tmp_path: Path
) -> None:
    saas.revoke()  # every token is refused from now on; the token endpoint still hands them out
    [source] = await api_sources(await written(tmp_path, OAUTH_SOURCES), API_URL=saas.url, CLIENT_SECRET=CLIENT_SECRET)
    with pytest.raises(FetchError, match="pagination stopped"):
        await harness.run(source)
    assert (saas.token_requests, saas.unauthorized) == (2, 2)  # the first token, one refresh
    [outcome] = harness.outcomes
    assert (outcome.outcome, outcome.http_status, outcome.error) == (OutcomeKind.FAILED, 401, "HTTP 401")


async def test_bad_client_secret_fails_naming_the_token_endpoint(
    harness: Harness, saas: SaasApi, tmp_path: Path
) -> None:
    [source] = await api_sources(
        await written(tmp_path, OAUTH_SOURCES), API_URL=saas.url, CLIENT_SECRET="wrong-secret-value"
    )
    with pytest.raises(FetchError):
        await harness.run(source)
    [outcome] = harness.outcomes
    assert outcome.outcome is OutcomeKind.FAILED
    assert outcome.http_status == 401
    assert outcome.error == f"OAuth2 token request to {saas.url}/oauth/token failed: HTTP 401"
    assert saas.token_requests == 1  # no refresh loop on a refused client


GRAPHQL = EXAMPLES / "graphql.yaml"


async def test_graphql_cursor_in_the_body_and_one_detail_request_per_item(
    harness: Harness, saas: SaasApi, tmp_path: Path
) -> None:
    [source] = await api_sources(GRAPHQL, API_URL=saas.url, PRODUCT_KEY=PRODUCT_KEY)
    records = await harness.run(source)
    assert [b["variables"]["after"] for b in saas.bodies] == [None, "7", "14", "21"]
    assert all(b["query"].startswith("query($after: String)") for b in saas.bodies)  # braces are not templates
    assert len(records) == 23
    assert saas.requests == {f"SKU-{i:03d}": 1 for i in range(1, 24)}  # once per item
    r = next(r for r in records if r.key == "SKU-005")
    assert r.data == {"sku": "SKU-005", "name": "product SKU-005", "description": "the 5th product", "price": 7.5}
    kinds = harness.outcome_kinds()
    assert kinds == {"fetched": 4 + 23}
    assert harness.outcome_urls()[f"{saas.url}/v1/products/SKU-005"] == 1


async def test_failed_detail_request_fails_the_source_and_its_item_is_not_staged(
    harness: Harness, saas: SaasApi, tmp_path: Path
) -> None:
    [source] = await api_sources(GRAPHQL, API_URL=saas.url, PRODUCT_KEY="not-the-key")
    with pytest.raises(FetchError, match="23 detail request"):
        await harness.run(source)
    assert harness.records == []
    assert harness.outcome_kinds() == {"fetched": 4, "failed": 23}


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """``/items`` answers one item and remembers the request's Authorization, X-API-Key and query; with
    ``?then=URL`` its body names URL as the next page."""
    seen: list[dict[str, Any]] = []

    async def items(request: web.Request) -> web.Response:
        seen.append(
            {
                "auth": request.headers.get("Authorization"),
                "key": request.headers.get("X-API-Key"),
                "query": dict(request.query),
                "host": request.host,
            }
        )
        if "then" in request.query:
            return web.json_response({"items": [{"id": len(seen)}], "next": request.query["then"]})
        return web.json_response({"items": [{"id": len(seen)}]} if "localhost" in request.host else [{"id": len(seen)}])

    app = web.Application()
    app.router.add_get("/items", items)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    await runner.cleanup()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("with_bearer", {"auth": "Bearer tok-123456"}),
        ("with_basic", {"auth": "Basic cmVwb3J0aW5nOnB3LTEyMzQ1Ng=="}),  # reporting:pw-123456
        ("with_key_header", {"key": "key-123456"}),
        ("with_key_query", {"query": {"api_key": "key-123456"}}),
    ],
)
async def test_auth_kinds(
    harness: Harness, echo: tuple[str, list[dict[str, Any]]], name: str, expected: dict[str, Any]
) -> None:
    base, seen = echo
    env = {"API_URL": base, "API_TOKEN": "tok-123456", "API_PASSWORD": "pw-123456", "API_KEY": "key-123456"}
    [source] = [s for s in await api_sources(EXAMPLES / "auth.yaml", **env) if s.name == name]
    await harness.run(source)
    [request] = seen
    for k, v in expected.items():
        assert request[k] == v
    assert harness.outcome_kinds() == {"fetched": 1}


async def test_query_api_key_stays_with_its_origin(harness: Harness, echo: tuple[str, list[dict[str, Any]]]) -> None:
    base, seen = echo
    other = base.replace("127.0.0.1", "localhost")  # another origin (same server)
    source = ApiSource.model_validate(
        {
            "kind": "api",
            "name": "a",
            "url": base + "/items",
            "auth": {"type": "api_key", "name": "api_key", "api_key": "key-123456", "location": "query"},
            "pagination": {"type": "next_url", "next_path": "next"},
            "items_path": "items",
            "params": {"then": other + "/items"},  # the first page names a next page on the other origin
            "key": "id",
        }
    )
    records = await harness.run(source)
    assert len(records) == 2
    assert [(s["host"].split(":")[0], s["query"].get("api_key")) for s in seen] == [
        ("127.0.0.1", "key-123456"),
        ("localhost", None),  # not the origin the key was configured for
    ]


SHAPES = EXAMPLES / "shapes.yaml"


async def test_json_lines_and_wildcard_items_path(harness: Harness, saas: SaasApi, tmp_path: Path) -> None:
    export, grouped = await api_sources(SHAPES, API_URL=saas.url)
    records = await harness.run(export)
    assert [(r.key, r.data["v"]) for r in records] == [(str(i), i * i) for i in range(1, 6)]
    harness.records.clear()
    auto = export.model_copy(update={"format": "auto"})  # the Content-Type says application/x-ndjson
    assert len(await harness.run(auto)) == 5
    harness.records.clear()
    records = await harness.run(grouped)
    assert [r.key for r in records] == ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"]  # group d has none


async def test_incremental_window_in_param_path_and_body(settings: Settings, saas: SaasApi, tmp_path: Path) -> None:
    text = OAUTH_SOURCES.replace(
        "    key: id\n",
        "    incremental: {cursor_path: updated_at, start_param: updated_since}\n    key: id\n",
    )
    [source] = await api_sources(await written(tmp_path, text), API_URL=saas.url, CLIENT_SECRET=CLIENT_SECRET)
    source = source.model_copy(update={"politeness": source.politeness.model_copy(update={"delay": 0})})
    outcomes: list[Outcome] = []

    async def emit(o: Outcome) -> None:
        outcomes.append(o)

    window = CursorWindow("updated_at", "2024-01-02T20:00:00Z", stored="2024-01-02T20:05:00Z")
    async with Fetcher(settings) as fetcher:
        ctx = SourceContext("r", settings, fetcher, emit, incremental=window)
        records = [r async for r in connector_for(source, ctx).fetch()]
    assert saas.since == ["2024-01-02T20:00:00Z"]
    assert [r.key for r in records] == [str(i) for i in range(44, 51)]  # 44h after 2024-01-01 and later
    assert ctx.stats.incremental == {
        "cursor_path": "updated_at",
        "start_value": "2024-01-02T20:00:00Z",
        "end_value": None,
        "stored": "2024-01-02T20:05:00Z",
        "last_value": "2024-01-03T02:00:00Z",
        "moves_state": True,
    }


async def test_post_redirects(settings: Settings) -> None:
    """303 continues as a GET without the body; a 307 resends it, but never to another origin."""
    seen: list[tuple[str, str, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.path, body))
        if request.path == "/see-other":
            raise web.HTTPSeeOther("/done")
        if request.path == "/temporary":
            raise web.HTTPTemporaryRedirect("/done")
        if request.path == "/elsewhere":
            raise web.HTTPTemporaryRedirect(str(request.url.with_host("localhost").with_path("/done")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with Fetcher(settings) as fetcher:
            for path in ("/see-other", "/temporary"):
                resp = await fetcher.get(base + path, transport="httpx", method="POST", body=b'{"q":1}', robots=False)
                assert resp.status == 200
            with pytest.raises(PermanentFetchError, match="not resent to another origin"):
                await fetcher.get(base + "/elsewhere", transport="httpx", method="POST", body=b"{}", robots=False)
    finally:
        await runner.cleanup()
    assert seen[:4] == [
        ("POST", "/see-other", b'{"q":1}'),
        ("GET", "/done", b""),
        ("POST", "/temporary", b'{"q":1}'),
        ("POST", "/done", b'{"q":1}'),
    ]
    assert [s[1] for s in seen[4:]] == ["/elsewhere"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"body": {"q": 1}}, "`body` needs `method: POST`"),
        (
            {"method": "POST", "pagination": {"type": "cursor", "cursor_path": "c", "body_path": "v.after"}},
            "`pagination.body_path` needs a JSON object `body`",
        ),
        ({"params": {"since": "{since}"}}, "unknown template {since}"),
        ({"params": {"since": "{incremental.start_value}"}}, "`{incremental.*}` templates need `incremental`"),
        ({"details": {"url": "/items/all"}}, "names no item field"),
        ({"auth": {"type": "oauth2_client_credentials", "client_id": "c", "client_secret": "s"}}, "access_token_url"),
        ({"auth": {"type": "digest"}}, "does not match any of the expected tags"),
        ({"incremental": {"cursor_path": "a..b"}}, "is not a dotted path"),
        ({"pagination": {"type": "next_url", "next_path": "n", "body_path": "x"}}, "`body_path` applies to page"),
    ],
)
async def test_check_names_each_bad_option(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    import yaml

    entry = {"kind": "api", "name": "bad", "url": "https://api.example.com/items", **options}
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump({"sources": [entry]}))
    with pytest.raises(ConfigError) as info:
        await asyncio.to_thread(load_sources, path, {})
    lines = info.value.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: sources[0] (bad): ")
    assert message in lines[0]


async def test_secret_block_references(tmp_path: Path) -> None:
    text = """\
sources:
  - name: a
    kind: api
    url: https://api.example.com/items
    auth: {type: bearer, token: "${secret:api-token}"}
  - name: b
    kind: api
    url: https://api.example.com/items
    auth: {type: bearer, token: "${secret:missing}"}
  - name: c
    kind: api
    url: https://api.example.com/items
    auth: {type: bearer, token: "${secret:Bad_Name}"}
"""
    path = tmp_path / "sources.yaml"
    await asyncio.to_thread(path.write_text, text)

    def blocks(name: str) -> str:
        if name == "api-token":
            return "block-token-value"
        raise ConfigError(f"no Prefect Secret block named {name!r}")

    with pytest.raises(ConfigError) as info:
        await asyncio.to_thread(load_sources, path, {}, blocks)
    assert info.value.lines() == [
        f"{path}: sources[1] (b): auth.token: no Prefect Secret block named 'missing'",
        f"{path}: sources[2] (c): auth.token: Secret block name 'Bad_Name' must match [a-z0-9][a-z0-9-]*",
    ]
    assert mask("block-token-value") == "***"
    # Without a resolver (`trawl check`) the references stay as written and the file still validates.
    await asyncio.to_thread(path.write_text, text.split("  - name: b")[0])
    spec = await asyncio.to_thread(load_sources, path, {})
    assert spec.sources[0].auth.token == "${secret:api-token}"  # type: ignore[union-attr]
