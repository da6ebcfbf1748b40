"""How an `api` source's requests authenticate: bearer, HTTP basic, API key, OAuth2 client credentials.

Every value here is a credential: each is registered with :mod:`trawl.masking`
(OAuth2 tokens as they arrive), so none is written anywhere trawl writes. The
headers go where the source's headers go (its :attr:`header_origins`); a query
API key only onto URLs of those origins.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Collection, Mapping
from urllib.parse import urlencode

import structlog

from trawl.config import ApiKeyAuth, Auth, BasicAuth, BearerAuth, OAuth2ClientCredentials
from trawl.errors import FetchError, PermanentFetchError
from trawl.fetch import Fetcher
from trawl.masking import register_secret
from trawl.urls import origin_of

__all__ = ["Authenticator", "token_margin"]

log = structlog.get_logger("trawl.connectors.auth")


def token_margin(lifetime: float) -> float:
    """How long before its expiry a token is replaced: a quarter of its life, at most a minute."""
    return min(60.0, lifetime / 4)


def _basic(user: str, password: str) -> str:
    value = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    register_secret(value)
    return f"Basic {value}"


class Authenticator:
    """The credentials of one source's requests; OAuth2 tokens fetched through the source's Fetcher.

    ``headers()`` gives the headers for the next request (fetching or renewing a
    token first when it is missing or about to expire); ``refresh(used)`` replaces
    the token a request met a 401 with (once: concurrent requests that met the
    same token share one refresh).
    """

    def __init__(
        self,
        auth: Auth | None,
        fetcher: Fetcher,
        *,
        source: str,
        origins: Collection[str],
        concurrency: int | None = None,
        delay: float | None = None,
    ) -> None:
        self._auth = auth
        # The source's politeness applies to its token requests too (they often go to the same host).
        self._concurrency = concurrency
        self._delay = delay
        self._fetcher = fetcher
        self._source = source
        self._origins = frozenset(origins)
        self._static: dict[str, str] = {}
        self._query: dict[str, str] = {}
        self._token: str | None = None
        self._expires = 0.0
        self._renew_at = 0.0
        self._lock = asyncio.Lock()
        self.token_requests = 0
        match auth:
            case BearerAuth(token=token):
                register_secret(token)
                self._static = {"Authorization": f"Bearer {token}"}
            case BasicAuth(username=user, password=password):
                register_secret(password)
                self._static = {"Authorization": _basic(user, password)}
            case ApiKeyAuth(name=name, api_key=key, location=location):
                register_secret(key)
                if location == "header":
                    self._static = {name: key}
                else:
                    self._query = {name: key}
            case OAuth2ClientCredentials(client_secret=secret):
                register_secret(secret)

    @property
    def oauth(self) -> OAuth2ClientCredentials | None:
        return self._auth if isinstance(self._auth, OAuth2ClientCredentials) else None

    def query(self, url: str) -> dict[str, str]:
        """Query parameters a request to ``url`` carries (an API key in the query, for the source's origins only)."""
        return self._query if self._query and origin_of(url) in self._origins else {}

    async def headers(self) -> dict[str, str]:
        """The authentication headers for the next request."""
        if self.oauth is None:
            return self._static
        if self._token is None or time.monotonic() >= self._renew_at:
            async with self._lock:
                if self._token is None or time.monotonic() >= self._renew_at:
                    await self._fetch_token()
        return {"Authorization": f"Bearer {self._token}"}

    async def refresh(self, used: Mapping[str, str]) -> dict[str, str] | None:
        """New headers after ``used`` met a 401 (OAuth2: a new token), or None when nothing can be renewed."""
        if self.oauth is None:
            return None
        async with self._lock:
            if used.get("Authorization") == f"Bearer {self._token}":  # nobody renewed it meanwhile
                log.info("token refused, renewing it", token_url=self.oauth.access_token_url)
                await self._fetch_token()
        return {"Authorization": f"Bearer {self._token}"}

    async def _fetch_token(self) -> None:
        auth = self.oauth
        assert auth is not None
        form = {"grant_type": "client_credentials", **auth.access_token_request_data}
        if auth.scopes:
            form["scope"] = " ".join(auth.scopes)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if auth.client_auth == "basic":
            headers["Authorization"] = _basic(auth.client_id, auth.client_secret)
        else:
            form |= {"client_id": auth.client_id, "client_secret": auth.client_secret}
        url = auth.access_token_url
        self.token_requests += 1
        asked = time.monotonic()
        try:
            resp = await self._fetcher.get(
                url,
                transport="httpx",
                method="POST",
                body=urlencode(form).encode(),
                headers=headers,
                robots=False,  # a token endpoint is not crawled
                source=self._source,
                origins={origin_of(url)},
                concurrency=self._concurrency,
                delay=self._delay,
            )
            body = resp.json()
        except FetchError as exc:
            error = type(exc)(f"OAuth2 token request to {url} failed: {exc}", url=exc.url, status=exc.status)
            error.attempts, error.elapsed_ms = exc.attempts, exc.elapsed_ms
            raise error from None
        token = body.get("access_token") if isinstance(body, Mapping) else None
        if not isinstance(token, str) or not token:
            raise PermanentFetchError(f"OAuth2 token response from {url} has no access_token", url=url)
        register_secret(token)  # before anything could log or stage it
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = auth.default_token_expiration
        self._token = token
        self._expires = asked + float(lifetime)
        self._renew_at = self._expires - token_margin(float(lifetime))
        log.info("token obtained", token_url=url, expires_in=lifetime)
