"""A SaaS-like API on loopback, behaving as the ones data engineers pull from every night.

- ``POST /oauth/token``: OAuth2 client credentials (HTTP basic client auth), tokens that
  expire after ``token_lifetime`` seconds; ``revoke()`` makes every token, old and new, refused.
- ``GET /v1/tickets?updated_since=&page=&per_page=``: bearer token required (401 otherwise);
  tickets with ``updated_at >= updated_since`` in ``updated_at`` order, ``{"data": [...]}``.
- ``POST /graphql``: ``{"query", "variables": {"after"}}`` → a Relay-style connection of products.
- ``GET /v1/products/{sku}``: one product's detail (``X-API-Key`` required), counted per sku.
- ``GET /v1/export.ndjson`` (JSON Lines) and ``GET /v1/groups`` (items nested in groups).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

__all__ = ["CLIENT_ID", "CLIENT_SECRET", "PRODUCT_KEY", "SaasApi", "iso", "serve"]

CLIENT_ID = "trawl-client"
CLIENT_SECRET = "s3cr3t-Client-Value"
PRODUCT_KEY = "pk-Live-0123456789"
BASE = datetime(2024, 1, 1, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SaasApi:
    """The API's data and what it saw."""

    token_lifetime: float = 3600
    tickets: dict[int, dict[str, Any]] = field(default_factory=dict)
    products: int = 23
    revoked: bool = False
    fail_page: int | None = None
    page_delay: float = 0.0
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    token_requests: int = 0
    unauthorized: int = 0
    since: list[str | None] = field(default_factory=list)  # updated_since of each first page asked for
    requests: Counter[str] = field(default_factory=Counter)
    bodies: list[Any] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        if not self.tickets:
            for i in range(1, 51):
                self.tickets[i] = {"id": i, "title": f"ticket {i}", "updated_at": iso(BASE + timedelta(hours=i))}

    def change(self, ids: range | list[int], at: datetime) -> None:
        for n, i in enumerate(ids):
            self.tickets[i] = {
                **self.tickets[i],
                "title": f"ticket {i} (edited)",
                "updated_at": iso(at + timedelta(minutes=n)),
            }

    def add(self, ids: range, at: datetime) -> None:
        for n, i in enumerate(ids):
            self.tickets[i] = {"id": i, "title": f"ticket {i}", "updated_at": iso(at + timedelta(minutes=n))}

    def revoke(self) -> None:
        self.revoked = True

    # -- handlers ---------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        form = await request.post()
        if request.headers.get("Authorization") != expected or form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(16)
        self.tokens[token] = time.monotonic() + self.token_lifetime
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "scope": form.get("scope"),
            }
        )

    def _authorized(self, request: web.Request) -> bool:
        m = re.fullmatch(r"Bearer (\S+)", request.headers.get("Authorization", ""))
        expiry = self.tokens.get(m.group(1)) if m else None
        return not self.revoked and expiry is not None and time.monotonic() < expiry

    async def list_tickets(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self.unauthorized += 1
            return web.json_response({"error": "invalid_token"}, status=401)
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", "20"))
        since = request.query.get("updated_since")
        if page == 1:
            self.since.append(since)
        if self.fail_page is not None and page >= self.fail_page:
            return web.json_response({"error": "down"}, status=500)
        if self.page_delay:
            import asyncio

            await asyncio.sleep(self.page_delay)
        rows = sorted(self.tickets.values(), key=lambda t: (t["updated_at"], t["id"]))
        if since:
            rows = [t for t in rows if t["updated_at"] >= since]
        return web.json_response({"data": rows[(page - 1) * per_page : page * per_page]})

    async def graphql(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        after = (body.get("variables") or {}).get("after")
        first = 7
        start = int(after) if after else 0
        skus = [f"SKU-{i:03d}" for i in range(start + 1, min(start + first, self.products) + 1)]
        end = start + len(skus)
        return web.json_response(
            {
                "data": {
                    "products": {
                        "nodes": [{"sku": s, "name": f"product {s}"} for s in skus],
                        "pageInfo": {
                            "endCursor": str(end) if end < self.products else None,
                            "hasNextPage": end < self.products,
                        },
                    }
                }
            }
        )

    async def product(self, request: web.Request) -> web.Response:
        if request.headers.get("X-API-Key") != PRODUCT_KEY:
            return web.json_response({"error": "no key"}, status=401)
        sku = request.match_info["sku"]
        self.requests[sku] += 1
        n = int(sku.split("-")[1])
        return web.json_response(
            {"product": {"sku": sku, "description": f"the {n}th product", "price": n * 1.5, "internal": "x"}}
        )

    async def ndjson(self, request: web.Request) -> web.Response:
        lines = b"\n".join(orjson.dumps({"id": i, "v": i * i}) for i in range(1, 6)) + b"\n"
        return web.Response(body=lines, content_type="application/x-ndjson")

    async def groups(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"data": [{"group": g, "items": [{"id": f"{g}{k}"} for k in range(3)]} for g in "abc"] + [{"group": "d"}]}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self.token)
        app.router.add_get("/v1/tickets", self.list_tickets)
        app.router.add_post("/graphql", self.graphql)
        app.router.add_get("/v1/products/{sku}", self.product)
        app.router.add_get("/v1/export.ndjson", self.ndjson)
        app.router.add_get("/v1/groups", self.groups)
        return app


async def serve(api: SaasApi, host: str = "127.0.0.1") -> AsyncIterator[SaasApi]:
    """Run ``api`` on a free port of ``host`` until the generator is closed (a fixture body)."""
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    api.url = f"http://{host}:{runner.addresses[0][1]}"
    try:
        yield api
    finally:
        await runner.cleanup()
