"""Sources files: YAML validated by pydantic models.

Every problem is reported at once, each naming the file, the entry and the
field, so a user fixes a file in one pass instead of one error per run.
String values may reference environment variables as ``${NAME}`` or
``${NAME:-default}``; a missing variable is a config error, not an empty string.
A value taken from the environment is a secret (:mod:`trawl.masking` masks it
wherever trawl writes), except an address: a value that is a plain http(s) URL
(no ``user:password@``, query or fragment), or one that lands only in the
scheme, host, port or path of a URL field (``url``, ``urls``, ``start_urls``).
A default written in the file is not a secret.

A sources file is at most :data:`MAX_SOURCES_BYTES` and has no YAML aliases
(``*name``): a few hundred bytes of nested aliases expand to gigabytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trawl.checks import NAME_PATTERN as _CHECK_NAME
from trawl.errors import ConfigError, ConfigIssue
from trawl.masking import register_secret
from trawl.proxies import check_proxy_url
from trawl.urls import origin_of

__all__ = [
    "MAX_SOURCES_BYTES",
    "AnySource",
    "ApiField",
    "ApiKeyAuth",
    "ApiSource",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "BrowserSource",
    "Details",
    "FieldRules",
    "FieldType",
    "FollowRules",
    "HtmlField",
    "HtmlSource",
    "Incremental",
    "ManifestSchema",
    "OAuth2ClientCredentials",
    "Pagination",
    "Politeness",
    "SecretResolver",
    "Source",
    "SourcesFile",
    "SpiderSource",
    "WaitFor",
    "load_sources",
    "manifest_schema",
    "select_sources",
]

MAX_SOURCES_BYTES = 1024 * 1024
"""The largest sources file read (a file of thousands of sources is a few hundred KiB)."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a reference to an anchor is refused where it stands."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a sources file", event.start_mark
            )
        return super().compose_node(parent, index)


SecretResolver = Callable[[str], str]
"""Resolves ``${secret:BLOCK}``: the Secret block's value, or ConfigError saying why not."""

FieldType = Literal["text", "int", "float", "bool", "date", "timestamp", "json"]
_NAME = r"[a-z][a-z0-9_]{0,62}"  # the whole name (re.fullmatch: `$` would let a trailing newline through)
_ENV_REF = re.compile(r"\$\{(?:secret:([^}]*)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")
_BLOCK_NAME = r"[a-z0-9][a-z0-9-]*"  # Prefect's block name spelling
# Error type of the checks spanning fields or entries: `load_sources` runs them on the raw data
# instead, because pydantic skips them once any field of the model fails, and cannot name a field.
_CROSS = "cross_check"
_NO_URLS = "needs `urls` (a fixed list), `start_urls` (a crawl) or `sitemaps`"


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


def _check_field_names(value: dict[str, Any]) -> dict[str, Any]:
    # Field names become column names: keep them plain identifiers that cannot clash with `_key`, `_extra`, ...
    bad = [name for name in value if not re.fullmatch(_NAME, name)]
    if bad:
        raise ValueError(f"field name(s) {', '.join(map(repr, bad))} must match {_NAME} (they become column names)")
    return value


def _undeclared_keys(key: Any, fields: Any) -> list[str]:
    keys = [key] if isinstance(key, str) else key if isinstance(key, list) else []
    declared = fields if isinstance(fields, Mapping) else {}
    return [k for k in keys if isinstance(k, str) and k != "url" and k not in declared]


def _check_http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


# Checked per item, so an error names the index (`urls.3`), not just the list.
_HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


def _check_origin(value: str) -> str:
    """``scheme://host[:port]``, nothing else: the unit credentials are scoped to (spelled as :func:`origin_of`)."""
    parts = re.match(r"^(https?)://([^/?#@\s]+)/?$", value, re.IGNORECASE)
    origin = origin_of(value) if parts else ""
    if not origin:
        raise ValueError(f"not an origin (scheme://host[:port], no path, query or user:password@): {value!r}")
    return origin


_Origin = Annotated[str, AfterValidator(_check_origin)]
_CREDENTIALS_ORIGINS = (
    "Origins (scheme://host[:port]) besides those of the source's own URLs that its headers may be sent to. "
    "Headers go to no other origin: they are dropped on any redirect hop, pagination page or link that leaves them."
)
_MAX_FAILED_RATIO = (
    "Share of this source's URLs (0-1) that may end failed, skipped_breaker or blocked_network before its crawl "
    "fails (default: the `max_failed_ratio` setting; 1: off). A source that fetched nothing fails anyway."
)
# One branch by the value's shape, so a bad URL in the list gets one error (not one per branch of the union).
_Sitemaps = Annotated[
    Annotated[list[_HttpUrl], Tag("list")] | Annotated[Literal["robots"], Tag("robots")],
    Discriminator(lambda v: "robots" if isinstance(v, str) else "list"),
]
_PROXIES = (
    "Forward proxies for this source's requests (`http://[user:${VAR}@]host:port` or `https://...`); unset: the "
    "`proxies` setting, `[]`: none. A proxy's address must be public or in `allowed_networks`."
)
_ProxyUrl = Annotated[str, AfterValidator(check_proxy_url)]
_ROTATION = "`per_request`: the proxies take turns; `sticky`: each host keeps one proxy (unset: the setting)."
_HEADERS = (
    "HTTP headers sent with the source's requests (e.g. `Authorization`, `Cookie`), only to the origins of its "
    "URLs and `credentials_origins`; `${VAR}` values are masked wherever trawl writes."
)


def _origins(urls: list[str], extra: list[str]) -> frozenset[str]:
    return frozenset(o for o in (*map(origin_of, urls), *extra) if o)


def _check_name(value: str) -> str:
    if not re.fullmatch(_NAME, value):
        raise ValueError(f"name {value!r} must match {_NAME} (it names a table and staging paths)")
    return value


_Name = Annotated[str, AfterValidator(_check_name)]


_ARCHIVE = (
    "Keep every fetched response as WARC request + response records in the staging area's archive "
    "(what `trawl reextract`, `trawl lineage` and `trawl page` read)."
)
_ARCHIVE_MAX = "The most bytes of one page's body the archive keeps (the record says `WARC-Truncated: length`)."
_ARCHIVE_MAX_DEFAULT = 10 * 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Politeness(_Model):
    """Per-source overrides of the per-host politeness settings."""

    concurrency: int | None = Field(default=None, ge=1)
    delay: float | None = Field(default=None, ge=0)
    adaptive: bool = Field(
        default=True,
        description="Also ease a host whose response times rise (lower its concurrency before it starts refusing); "
        "throttle signals (429, 503 with Retry-After) slow a host down either way.",
    )


class FieldRules(_Model):
    """What the loader checks a declared field against (`sinks/validate.py` enforces it).

    ``parse`` widens what converts to the type: ``number`` reads ``"1,299.00"`` or
    ``"$1 299,5"`` style strings as numbers (an int field still needs a whole number).
    Without it a number field takes JSON numbers and plain numeric strings only.
    """

    type: FieldType = "text"
    required: bool = False
    parse: Literal["number"] | None = Field(
        default=None, description="`number`: strip currency signs, spaces and thousands separators before converting."
    )
    pattern: str | None = Field(default=None, description="Regex a text value must match (anywhere: anchor it).")
    min: float | None = Field(default=None, description="Smallest allowed number (int/float fields).")
    max: float | None = Field(default=None, description="Largest allowed number (int/float fields).")
    choices: list[str | int | float | bool] | None = Field(
        default=None, min_length=1, description="The only values allowed."
    )
    max_length: int | None = Field(default=None, ge=1, description="Longest allowed text, in characters.")
    checks: list[str] = Field(
        default_factory=list,
        description="Custom checks by registered name (`trawl.checks.register` or the `trawl.checks` entry point "
        "group); the loader refuses names nothing registered.",
    )

    _pattern = field_validator("pattern")(_check_regex)

    @field_validator("checks")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if ":" in name:
                raise ValueError(
                    f"check {name!r}: `module:function` paths are not accepted; register the function "
                    "(trawl.checks.register or the `trawl.checks` entry point group) and give its name"
                )
            if not re.fullmatch(_CHECK_NAME, name):
                raise ValueError(f"check name {name!r} must match {_CHECK_NAME}")
        return value

    @model_validator(mode="after")
    def _rules_fit_the_type(self) -> FieldRules:
        numeric = self.type in ("int", "float")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"`min`/`max` apply to int and float fields, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"`min` ({self.min}) is greater than `max` ({self.max})")
        if self.parse == "number" and not numeric:
            raise ValueError(f"`parse: number` applies to int and float fields, not {self.type}")
        if (self.pattern is not None or self.max_length is not None) and self.type != "text":
            raise ValueError(f"`pattern`/`max_length` apply to text fields, not {self.type}")
        return self

    def loader_spec(self) -> dict[str, Any]:
        """The declaration written into manifests: the type and every rule that is set."""
        spec = self.model_dump(include=set(FieldRules.model_fields), exclude_defaults=True)
        return {"type": self.type, "required": self.required, **spec}


class HtmlField(FieldRules):
    """A field pulled from a page with a CSS selector."""

    selector: str = Field(min_length=1)
    attr: str | None = None
    all: bool = False
    regex: str | None = None

    _regex = field_validator("regex")(_check_regex)


class ApiField(FieldRules):
    """A field of a JSON item; ``path`` is a dotted path into the item (default: its name)."""

    path: str | None = None


class FollowRules(_Model):
    """Which links a crawl follows from its start URLs."""

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    same_host: bool = True
    max_depth: int = Field(default=3, ge=0)

    @field_validator("allow", "deny")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _check_regex(pattern)
        return value


class HtmlSource(_Model):
    """Static HTML: a fixed URL list, or a crawl from start URLs."""

    kind: Literal["html"]
    name: _Name
    urls: list[_HttpUrl] = Field(default_factory=list)
    start_urls: list[_HttpUrl] = Field(default_factory=list)
    sitemaps: _Sitemaps = Field(
        default_factory=list,
        description="Sitemaps (or sitemap indexes, gzip'd or not) whose URLs are fetched, filtered by `follow`; "
        "`robots`: the `Sitemap:` lines of the robots.txt of each host of `urls`/`start_urls`. A URL whose "
        "`lastmod` is the same as when it was last fetched is not fetched again (`not_modified`).",
    )
    follow: FollowRules = Field(default_factory=FollowRules)
    record_urls: str | None = Field(
        default=None, description="Regex: only pages whose URL matches produce records (default: every page)."
    )
    item_selector: str | None = Field(
        default=None, description="CSS selector: one record per match, fields selected inside it."
    )
    key: str | list[str] = "url"
    fields: dict[str, HtmlField] = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict, description=_HEADERS)
    credentials_origins: list[_Origin] = Field(default_factory=list, description=_CREDENTIALS_ORIGINS)
    politeness: Politeness = Field(default_factory=Politeness)
    proxies: list[_ProxyUrl] | None = Field(default=None, description=_PROXIES)
    proxy_rotation: Literal["per_request", "sticky"] | None = Field(default=None, description=_ROTATION)
    robots: bool = Field(default=True, description="Obey the hosts' robots.txt (set false only for sites you own).")
    archive: bool = Field(default=True, description=_ARCHIVE)
    archive_max_bytes: int = Field(default=_ARCHIVE_MAX_DEFAULT, ge=1024, description=_ARCHIVE_MAX)
    conditional: bool = Field(
        default=True,
        description="Send If-None-Match / If-Modified-Since for record pages fetched in earlier runs; a 304 is "
        "`not_modified`. Record pages are then treated as leaves: links only they carry are not followed again.",
    )
    frontier: Literal["memory", "postgres"] | None = Field(
        default=None,
        description="`postgres`: keep this crawl's URLs in PostgreSQL, so `trawl crawl --resume RUN_ID` continues "
        "it after a crash (default: the `frontier` setting).",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Crawl with up to this many shards: the crawl flow run itself and N-1 flow runs of the "
        "`shard_deployment`, each leasing hosts from the shared frontier (a host is never split across processes); "
        "implies the `postgres` frontier.",
    )
    content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml"],
        min_length=1,
        description="Media types parsed as pages; other responses get the outcome `filtered`.",
    )
    max_failed_ratio: float | None = Field(default=None, ge=0, le=1, description=_MAX_FAILED_RATIO)
    enabled: bool = True

    _record_urls = field_validator("record_urls")(_check_regex)
    _fields = field_validator("fields")(_check_field_names)

    @model_validator(mode="after")
    def _shape(self) -> HtmlSource:
        if not self.urls and not self.start_urls and not self.sitemaps:
            raise PydanticCustomError(_CROSS, _NO_URLS)
        if self.sitemaps == "robots" and not self.urls and not self.start_urls:
            raise ValueError("`sitemaps: robots` reads the robots.txt of the hosts of `urls`/`start_urls`: give one")
        if self.sitemaps and (self.frontier == "postgres" or self.shards > 1):
            raise ValueError("`sitemaps` are read by in-memory crawls only (not with `frontier: postgres` or `shards`)")
        for k in _undeclared_keys(self.key, self.fields):
            raise PydanticCustomError(_CROSS, "key field {key} is not a declared field", {"key": repr(k)})
        return self

    @property
    def key_fields(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def header_origins(self) -> frozenset[str]:
        """Where the source's headers may go: the origins of its URLs (sitemaps included) and ``credentials_origins``."""
        maps = self.sitemaps if isinstance(self.sitemaps, list) else []
        return _origins([*self.urls, *self.start_urls, *maps], self.credentials_origins)


_DOTTED = r"[^.\s]+(\.[^.\s]+)*"  # a dotted path into JSON: `data.after`, `variables.page`


def _check_dotted(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(_DOTTED, value):
        raise ValueError(f"{value!r} is not a dotted path (`a.b.c`, no empty steps or spaces)")
    return value


class Pagination(_Model):
    """How an API's pages are walked.

    The page number, offset or cursor goes in the query parameter ``param``, or
    with ``body_path`` into the JSON request body (``method: POST``) at that
    dotted path, as GraphQL and search APIs take it (dlt's ``*_body_path``).
    """

    type: Literal["none", "page", "offset", "cursor", "next_url", "link_header"] = "none"
    param: str | None = Field(default=None, description="Query parameter carrying the page, offset or cursor.")
    body_path: str | None = Field(
        default=None,
        description="Dotted path in the JSON request body carrying the page, offset or cursor (instead of `param`).",
    )
    start: int | None = Field(default=None, ge=0, description="First page number (1) or offset (0).")
    size_param: str | None = Field(default=None, description="Query parameter carrying the page size.")
    size_body_path: str | None = Field(
        default=None, description="Dotted path in the JSON request body carrying the page size."
    )
    size: int | None = Field(default=None, ge=1)
    cursor_path: str | None = Field(default=None, description="Dotted path of the next cursor in the body.")
    next_path: str | None = Field(default=None, description="Dotted path of the next page's URL in the body.")
    max_pages: int = Field(default=100_000, ge=1)

    _paths = field_validator("body_path", "size_body_path", "cursor_path", "next_path")(_check_dotted)

    @model_validator(mode="after")
    def _shape(self) -> Pagination:
        if self.type == "cursor" and not self.cursor_path:
            raise ValueError("cursor pagination needs `cursor_path`")
        if self.type == "next_url" and not self.next_path:
            raise ValueError("next_url pagination needs `next_path`")
        if self.type == "offset" and not self.size:
            raise ValueError("offset pagination needs `size`")
        if self.param and self.body_path:
            raise ValueError("give `param` (query) or `body_path` (JSON body), not both")
        if self.body_path and self.type not in ("page", "offset", "cursor"):
            raise ValueError(f"`body_path` applies to page, offset and cursor pagination, not {self.type}")
        return self


class BearerAuth(_Model):
    """``Authorization: Bearer TOKEN``."""

    type: Literal["bearer"]
    token: str = Field(min_length=1, description="The token; `${VAR}` or `${secret:BLOCK}`.")


class BasicAuth(_Model):
    """HTTP basic authentication (RFC 7617)."""

    type: Literal["http_basic"]
    username: str = Field(min_length=1)
    password: str = Field(description="`${VAR}` or `${secret:BLOCK}`.")


class ApiKeyAuth(_Model):
    """An API key in a header (``X-API-Key: KEY``) or a query parameter (``?api_key=KEY``)."""

    type: Literal["api_key"]
    name: str = Field(default="Authorization", min_length=1, description="The header or query parameter name.")
    api_key: str = Field(min_length=1, description="The key; `${VAR}` or `${secret:BLOCK}`.")
    location: Literal["header", "query"] = "header"


class OAuth2ClientCredentials(_Model):
    """OAuth2 client credentials (RFC 6749 4.4): a token from ``access_token_url``, cached and refreshed.

    The token is refreshed shortly before it expires (``expires_in``, else
    ``default_token_expiration``) and once when a request meets a 401.
    """

    type: Literal["oauth2_client_credentials"]
    access_token_url: _HttpUrl
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1, description="`${VAR}` or `${secret:BLOCK}`.")
    scopes: list[str] = Field(default_factory=list, description="Sent space-separated as `scope`.")
    client_auth: Literal["basic", "body"] = Field(
        default="basic",
        description="How the client authenticates at the token endpoint: HTTP basic (RFC 6749 2.3.1), or "
        "`client_id`/`client_secret` in the form body.",
    )
    access_token_request_data: dict[str, str] = Field(
        default_factory=dict, description="Extra form fields for the token request (e.g. `audience`)."
    )
    default_token_expiration: int = Field(
        default=3600, ge=1, description="Token lifetime in seconds when the response has no `expires_in`."
    )


Auth = Annotated[BearerAuth | BasicAuth | ApiKeyAuth | OAuth2ClientCredentials, Field(discriminator="type")]
_Scalar = str | int | float


class Incremental(_Model):
    """Incremental extraction: send the largest ``cursor_path`` value of the last loaded run, get only what changed.

    The value goes in the query parameter ``start_param``, and/or wherever the URL,
    ``params`` or ``body`` say ``{incremental.start_value}`` (``{incremental.end_value}``
    for ``end_value``). The state moves only when a run's load commits; a run with
    an ``end_value`` (a back-fill) never moves it.
    """

    cursor_path: str = Field(description="Dotted path of the value in each item (e.g. `updated_at`).")
    start_param: str | None = Field(default=None, description="Query parameter the start value is sent in.")
    end_param: str | None = Field(default=None, description="Query parameter the end value is sent in.")
    initial_value: _Scalar | None = Field(
        default=None, description="Sent when there is no state yet (none: the first run asks for everything)."
    )
    end_value: _Scalar | None = Field(default=None, description="Upper bound, for back-fills; the state stays put.")
    lag: float = Field(
        default=0,
        ge=0,
        description="Subtracted from the stored value before it is sent (seconds for timestamps), for late writes.",
    )

    _path = field_validator("cursor_path")(_check_dotted)


class Details(_Model):
    """One more request per listed item: its detail resource, merged into the item (or emitted instead of it)."""

    url: str = Field(
        min_length=1,
        description="URL template, relative to the source's `url`: `{name}` is the item's value at that dotted "
        "path, URL-encoded (e.g. `/items/{id}`).",
    )
    items_path: str | None = Field(default=None, description="Dotted path to the object in the detail body.")
    fields: list[str] | None = Field(
        default=None, min_length=1, description="Only these keys of the detail object (default: all of them)."
    )
    merge: bool = Field(default=True, description="Merge into the item (false: the detail object is the record).")

    _path = field_validator("items_path")(_check_dotted)

    @field_validator("url")
    @classmethod
    def _template(cls, value: str) -> str:
        names = _template_names(value)
        if not names:
            raise ValueError(f"{value!r} names no item field (`{{id}}`): every item would get the same URL")
        for name in names:
            _check_dotted(name)
        return value


_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def _strings(node: Any) -> list[str]:
    """Every string in a JSON value (the templates a body or params may hold)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, Mapping):
        node = list(node.values())
    return [s for v in node for s in _strings(v)] if isinstance(node, list) else []


def _template_names(value: str) -> list[str]:
    return [m.group(1) for m in _TEMPLATE.finditer(value)]


class ApiSource(_Model):
    """A JSON HTTP API, walked page by page."""

    kind: Literal["api"]
    name: _Name
    url: str
    method: Literal["GET", "POST"] = "GET"
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    body: dict[str, Any] | list[Any] | None = Field(
        default=None,
        description="JSON request body (with `method: POST`); strings may hold `{incremental.start_value}`.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description=_HEADERS)
    auth: Auth | None = Field(default=None, description="How requests authenticate (sent only where `headers` go).")
    credentials_origins: list[_Origin] = Field(default_factory=list, description=_CREDENTIALS_ORIGINS)
    items_path: str | None = Field(
        default=None,
        description="Dotted path to the list of items (default: the body); `*` steps over every element of a "
        "list (or value of an object), so `data.*.items` is every group's items, flattened.",
    )
    format: Literal["auto", "json", "jsonl"] = Field(
        default="auto",
        description="`jsonl`: one JSON document per line (NDJSON); `auto` decides by the Content-Type.",
    )
    pagination: Pagination = Field(default_factory=Pagination)
    incremental: Incremental | None = None
    details: Details | None = None
    key: str | list[str] = "url"
    fields: dict[str, ApiField] = Field(default_factory=dict)
    politeness: Politeness = Field(default_factory=Politeness)
    proxies: list[_ProxyUrl] | None = Field(default=None, description=_PROXIES)
    proxy_rotation: Literal["per_request", "sticky"] | None = Field(default=None, description=_ROTATION)
    robots: bool = Field(default=True, description="Obey the host's robots.txt (set false only for APIs you own).")
    max_failed_ratio: float | None = Field(default=None, ge=0, le=1, description=_MAX_FAILED_RATIO)
    archive: bool = Field(default=False, description=_ARCHIVE + " Off by default for APIs.")
    archive_max_bytes: int = Field(default=_ARCHIVE_MAX_DEFAULT, ge=1024, description=_ARCHIVE_MAX)
    enabled: bool = True

    _url = field_validator("url")(_check_http_url)
    _fields = field_validator("fields")(_check_field_names)
    _items_path = field_validator("items_path")(_check_dotted)

    @model_validator(mode="after")
    def _requests(self) -> ApiSource:
        if self.body is not None and self.method == "GET":
            raise ValueError("`body` needs `method: POST`")
        if (self.pagination.body_path or self.pagination.size_body_path) and not isinstance(self.body, dict):
            raise ValueError("`pagination.body_path` needs a JSON object `body` (and `method: POST`)")
        # Only {incremental.*} in a body: GraphQL queries are full of braces of their own.
        in_body = [n for v in _strings(self.body) for n in _template_names(v) if n.startswith("incremental.")]
        templates = [*_template_names(self.url), *(n for v in _strings(self.params) for n in _template_names(v))]
        templates += in_body
        for name in templates:
            if name not in ("incremental.start_value", "incremental.end_value"):
                raise ValueError(
                    f"unknown template {{{name}}}: the URL, params and body take {{incremental.start_value}} and "
                    "{incremental.end_value}"
                )
        if templates and self.incremental is None:
            raise ValueError("`{incremental.*}` templates need `incremental`")
        return self

    @property
    def key_fields(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def header_origins(self) -> frozenset[str]:
        """Where the source's headers may go: the origin of ``url`` and ``credentials_origins``."""
        return _origins([self.url], self.credentials_origins)


class WaitFor(_Model):
    """When a rendered page is ready to extract: a selector shows, the network idles, and/or a fixed delay."""

    selector: str | None = Field(default=None, min_length=1, description="CSS selector that must appear.")
    network_idle: bool = Field(default=False, description="Wait until no request was in flight for 500 ms.")
    delay: float = Field(default=0.0, ge=0, le=60, description="Seconds to wait after the rest.")


class BrowserSource(HtmlSource):
    """Pages that need JavaScript: the same crawl and extraction as ``html``, rendered by Chromium when needed.

    ``render: auto`` (the default) fetches over plain HTTP first and renders only
    pages whose required fields are missing (then every page of that URL pattern
    on that host goes to the browser directly); ``always`` renders every page;
    ``never`` is an ``html`` source with the same options.
    """

    kind: Literal["browser"]  # type: ignore[assignment]
    render: Literal["auto", "always", "never"] = "auto"
    wait_for: WaitFor = Field(default_factory=WaitFor)
    scroll_to_bottom: bool = Field(default=False, description="Scroll to the end (infinite lists) before extracting.")
    javascript: bool = Field(default=True, description="Run the pages' scripts (false: render the HTML as served).")
    block_resources: list[str] | None = Field(
        default=None,
        description="Resource types not loaded (Playwright's names: image, media, font, stylesheet, ...); "
        "unset: TRAWL_BROWSER_BLOCK_RESOURCES.",
    )

    @model_validator(mode="after")
    def _no_headers_in_chromium(self) -> BrowserSource:
        # Chromium carries headers set on a navigation over its redirect hops to any origin: none are given to it.
        if self.headers and self.render != "never":
            raise ValueError(
                "`headers` are sent only over plain HTTP (`render: never`): Chromium would carry them across "
                "redirects to other origins"
            )
        return self


class SpiderSource(_Model):
    """A Scrapy spider from ``spiders/`` (``module:Class``), run in the crawl's event loop.

    Its items are records: every item field is kept, the declared ones are typed
    (``path`` picks a nested value). The record URL is the item's ``url`` field,
    else the response's.
    """

    kind: Literal["spider"]
    name: _Name
    spider: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        description="The spider class as `package.module:Class` (e.g. `spiders.books:BooksSpider`).",
    )
    args: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Keyword arguments for the spider (as `scrapy crawl -a NAME=VALUE`)."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Scrapy settings for this spider; trawl's fetch settings (politeness, robots, retries, "
        "timeouts, the network guard) win over them.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description=_HEADERS)
    credentials_origins: list[_Origin] = Field(
        default_factory=list,
        description="The origins (scheme://host[:port]) the source's `headers` are sent to (a spider's URLs are "
        "its own, so `headers` need them); requests and redirect hops to any other origin go without.",
    )
    key: str | list[str] = "url"
    fields: dict[str, ApiField] = Field(default_factory=dict)
    politeness: Politeness = Field(default_factory=Politeness)
    proxies: list[_ProxyUrl] | None = Field(default=None, description=_PROXIES)
    proxy_rotation: Literal["per_request", "sticky"] | None = Field(default=None, description=_ROTATION)
    robots: bool = Field(default=True, description="Obey the hosts' robots.txt (set false only for sites you own).")
    archive: bool = Field(default=True, description=_ARCHIVE)
    archive_max_bytes: int = Field(default=_ARCHIVE_MAX_DEFAULT, ge=1024, description=_ARCHIVE_MAX)
    frontier: Literal["memory", "postgres"] | None = Field(
        default=None,
        description="`postgres`: keep the spider's pending requests in PostgreSQL (Scrapy's scheduler on the durable "
        "frontier, deduplicated there), so memory stays flat however large the crawl; a run that dies starts over "
        "(default: the `frontier` setting).",
    )
    max_failed_ratio: float | None = Field(default=None, ge=0, le=1, description=_MAX_FAILED_RATIO)
    enabled: bool = True

    _fields = field_validator("fields")(_check_field_names)

    @model_validator(mode="after")
    def _shape(self) -> SpiderSource:
        for k in _undeclared_keys(self.key, self.fields):
            raise PydanticCustomError(_CROSS, "key field {key} is not a declared field", {"key": repr(k)})
        if self.headers and not self.credentials_origins:
            raise ValueError("`headers` need `credentials_origins`: the origins they may be sent to")
        return self

    @property
    def key_fields(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @property
    def header_origins(self) -> frozenset[str]:
        """Where the source's headers may go: exactly ``credentials_origins``."""
        return _origins([], self.credentials_origins)


AnySource = HtmlSource | ApiSource | SpiderSource
"""Any configured source (`browser` sources are `HtmlSource`s)."""

Source = Annotated[HtmlSource | ApiSource | BrowserSource | SpiderSource, Field(discriminator="kind")]


class SourcesFile(_Model):
    """A whole sources file."""

    version: Literal[1] = 1
    sources: list[Source] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> SourcesFile:
        seen: set[str] = set()
        for s in self.sources:
            if s.name in seen:
                raise PydanticCustomError(_CROSS, "source name {name} is used twice", {"name": repr(s.name)})
            seen.add(s.name)
        return self


# Fields holding URLs: a value from the environment there is an address (a base URL, a host) unless it reaches
# into the URL's user:password@, query or fragment.
_URL_FIELDS = frozenset({"url", "urls", "start_urls", "credentials_origins", "sitemaps", "proxies"})


class ManifestSchema(_Model):
    """The declaration a manifest carries (``trawl.crawler.source_schema``): a source's key and field rules.

    The loader re-validates every manifest's declaration with it, the same
    :class:`FieldRules` a sources file is checked with: staging is data, and a
    manifest written there by hand gets no more trust than a sources file.
    """

    key: list[_Name] = Field(default_factory=lambda: ["url"])
    fields: dict[str, FieldRules] = Field(default_factory=dict)

    _fields = field_validator("fields")(_check_field_names)


def manifest_schema(source: Any, schema: Any, where: str) -> ManifestSchema:
    """A manifest's source name and declaration, validated; ConfigError naming ``where`` (the manifest) if not."""
    issues = []
    if not isinstance(source, str) or not re.fullmatch(_NAME, source):
        issues.append(ConfigIssue(where, "source", "", f"source name {source!r} must match {_NAME}"))
    try:
        parsed = ManifestSchema.model_validate(schema if isinstance(schema, Mapping) else {"key": schema})
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            issues.append(ConfigIssue(where, "schema", ".".join(str(p) for p in err["loc"]), msg))
        parsed = None
    if issues or parsed is None:
        raise ConfigError(f"{where}: {len(issues)} problem(s) in the manifest's declaration", issues)
    return parsed


# A whole value that is a plain address (a base URL: no user:password@, query or fragment) is no secret anywhere.
_PLAIN_URL = re.compile(r"^https?://[^/?#@\s]+(/[^?#@\s]*)?$", re.IGNORECASE)


def _address_only(url: str, start: int, end: int) -> bool:
    """Whether ``url[start:end]`` lies in the scheme, host, port or path of ``url`` (not userinfo, query, fragment)."""
    scheme_end = url.find("://")
    authority_start = scheme_end + 3 if scheme_end != -1 else 0
    rest = url[authority_start:]
    authority_len = min([len(rest), *(i for i in (rest.find(c) for c in "/?#") if i != -1)])
    at = rest.rfind("@", 0, authority_len)
    if at != -1 and start < authority_start + at + 1:
        return False  # touches user:password@
    cut = min([len(url), *(i for i in (url.find(c, authority_start) for c in "?#") if i != -1)])
    return end <= cut


def _interpolate(
    node: Any,
    env: Mapping[str, str],
    path: tuple[Any, ...],
    missing: list[tuple[tuple[Any, ...], str]],
    secrets: list[str],
    blocks: SecretResolver | None = None,
) -> Any:
    """``${VAR}`` replaced from ``env``, ``${secret:BLOCK}`` by ``blocks``; the values that came from them go into
    ``secrets`` (addresses from the environment do not; a Secret block's value always does)."""
    if isinstance(node, str):
        spans: list[tuple[int, int, str]] = []
        out: list[str] = []
        size = 0
        last = 0
        for m in _ENV_REF.finditer(node):
            out.append(node[last : m.start()])
            size += m.start() - last
            last = m.end()
            block, name, default = m.group(1), m.group(2), m.group(3)
            if block is not None:
                value = m.group(0)  # unresolved (`trawl check`): kept as written
                if not re.fullmatch(_BLOCK_NAME, block):
                    missing.append((path, f"!Secret block name {block!r} must match {_BLOCK_NAME}"))
                elif blocks is not None:
                    try:
                        value = blocks(block)
                    except ConfigError as exc:
                        missing.append((path, f"!{exc}"))
                    else:
                        secrets.append(value)  # masked wherever it lands, even in a URL's host
            elif name in env:
                value = env[name]
                spans.append((size, size + len(value), value))
            elif default is not None:
                value = default  # written in the file: not a secret
            else:
                missing.append((path, name))
                value = m.group(0)
            out.append(value)
            size += len(value)
        out.append(node[last:])
        text = "".join(out)
        in_url = any(p in _URL_FIELDS for p in path[2:3] if isinstance(p, str))
        for start, end, value in spans:
            if not (_PLAIN_URL.match(value) or (in_url and _address_only(text, start, end))):
                secrets.append(value)
        return text
    if isinstance(node, list):
        return [_interpolate(v, env, (*path, i), missing, secrets, blocks) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _interpolate(v, env, (*path, k), missing, secrets, blocks) for k, v in node.items()}
    return node


def _cross_checks(data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """The `_CROSS` checks on raw data, each located at the field to fix."""
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list):
        return []
    found: list[tuple[tuple[Any, ...], str]] = []
    first: dict[str, int] = {}
    for i, item in enumerate(sources):
        if not isinstance(item, dict):
            continue
        name = item.get("name")
        if isinstance(name, str):
            if name in first:
                message = f"source name {name!r} is used twice (first: sources[{first[name]}])"
                found.append((("sources", i, "name"), message))
            first.setdefault(name, i)
        if item.get("kind") == "html" and not any(item.get(k) for k in ("urls", "start_urls", "sitemaps")):
            found.append((("sources", i, "urls"), _NO_URLS))
        if item.get("kind") in ("html", "spider"):
            for k in _undeclared_keys(item.get("key", "url"), item.get("fields")):
                found.append((("sources", i, "key"), f"key field {k!r} is not a declared field"))
    return found


def _locate(raw: Any, loc: tuple[Any, ...]) -> tuple[str, str]:
    """Split a pydantic error location into ('sources[2] (name)', 'fields.price.type')."""
    if len(loc) >= 2 and loc[0] == "sources" and isinstance(loc[1], int):
        index = loc[1]
        rest = list(loc[2:])
        entry = f"sources[{index}]"
        listed = raw.get("sources") if isinstance(raw, dict) else None
        item = listed[index] if isinstance(listed, list) and index < len(listed) else None
        if isinstance(item, dict):
            if item.get("name"):
                entry += f" ({item['name']})"
            if rest and rest[0] == item.get("kind"):
                rest = rest[1:]  # the discriminator tag pydantic inserts
        return entry, ".".join(str(p) for p in rest)
    return "(file)", ".".join(str(p) for p in loc)


def load_sources(
    path: str | Path, env: Mapping[str, str] | None = None, secret_blocks: SecretResolver | None = None
) -> SourcesFile:
    """Read and validate a sources file; raises ConfigError listing every problem.

    ``secret_blocks`` resolves ``${secret:BLOCK}`` (the flows pass one that reads Prefect
    Secret blocks); without it the references stay as written (``trawl check``).
    """
    file = str(path)
    env = os.environ if env is None else env
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_SOURCES_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read sources file: {exc.strerror or exc}") from None
    if len(data) > MAX_SOURCES_BYTES:
        issue = ConfigIssue(file, "(file)", "", f"larger than {MAX_SOURCES_BYTES} bytes: not read")
        raise ConfigError(str(issue), [issue])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(file, "(file)", "", f"not UTF-8: {exc.reason} at byte {exc.start}")
        raise ConfigError(str(issue), [issue]) from None
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        issue = ConfigIssue(file, where, "", f"invalid YAML: {problem}")
        raise ConfigError(str(issue), [issue]) from None
    if not isinstance(raw, dict):
        issue = ConfigIssue(file, "(file)", "", "expected a mapping with a `sources:` list")
        raise ConfigError(str(issue), [issue])
    missing: list[tuple[tuple[Any, ...], str]] = []
    secrets: list[str] = []
    data = _interpolate(raw, env, (), missing, secrets, secret_blocks)
    for value in secrets:  # masked from here on, wherever trawl writes (trawl.masking)
        register_secret(value)
    issues = []
    for loc, name in missing:
        entry, fld = _locate(raw, loc)
        message = name[1:] if name.startswith("!") else f"environment variable {name} is not set"
        issues.append(ConfigIssue(file, entry, fld, message))
    unset = {_locate(raw, loc) for loc, _ in missing}
    for loc, message in _cross_checks(data):
        issues.append(ConfigIssue(file, *_locate(raw, loc), message))
    try:
        parsed = SourcesFile.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == _CROSS:
                continue  # already reported by _cross_checks, with its field
            entry, fld = _locate(raw, tuple(err["loc"]))
            if (entry, fld) in unset or (entry, fld.rpartition(".")[0]) in unset:
                continue  # already reported as the unset variable it follows from
            msg = err["msg"].removeprefix("Value error, ")
            issues.append(ConfigIssue(file, entry, fld, msg))
        parsed = None
    if issues or parsed is None:
        raise ConfigError(f"{file}: {len(issues)} problem(s)", issues)
    return parsed


def select_sources(spec: SourcesFile, names: list[str] | None) -> list[AnySource]:
    """The enabled sources, or exactly the named ones (unknown names are an error)."""
    if not names:
        return [s for s in spec.sources if s.enabled]
    by_name = {s.name: s for s in spec.sources}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown source(s): {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in names]
