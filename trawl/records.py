"""The values that flow between stages: records and URL outcomes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from trawl.masking import mask_text, mask_url

__all__ = [
    "Outcome",
    "OutcomeKind",
    "Record",
    "canonical_json",
    "content_hash",
    "utcnow",
]


def utcnow() -> datetime:
    """Timezone-aware now, the only clock records use."""
    return datetime.now(UTC)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTC datetimes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS)


def content_hash(data: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a record's data: equal data, equal hash."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


@dataclass(frozen=True, slots=True)
class Record:
    """One scraped record in its staging envelope."""

    source: str
    key: str | None
    url: str
    fetched_at: datetime
    run_id: str
    data: dict[str, Any]
    content_hash: str = field(default="")
    archived: Mapping[str, Any] | None = None
    """Where the page archive holds the response the record came from (``warc``, ``offset``, ``length``)."""

    def __post_init__(self) -> None:
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.data))

    def envelope(self) -> dict[str, Any]:
        """The JSON object staged for this record (DESIGN.md: staging layout).

        Secrets are masked in the URL and the key (:mod:`trawl.masking`): a key derived from the URL is
        the masked URL, so what lands in tables, lineage and rejects never holds a token.
        """
        url = mask_url(self.url)
        out: dict[str, Any] = {
            "source": self.source,
            "key": url if self.key == self.url else (mask_text(self.key) if self.key is not None else None),
            "url": url,
            "fetched_at": self.fetched_at,
            "run_id": self.run_id,
            "content_hash": self.content_hash,
            "data": self.data,
        }
        if self.archived is not None:
            out["archive"] = self.archived
        return out


class OutcomeKind(StrEnum):
    """How a URL ended: exactly one per URL a run touches."""

    FETCHED = "fetched"
    NOT_MODIFIED = "not_modified"
    FAILED = "failed"
    SKIPPED_ROBOTS = "skipped_robots"
    SKIPPED_BREAKER = "skipped_breaker"
    BLOCKED_NETWORK = "blocked_network"
    FILTERED = "filtered"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The recorded end of one URL."""

    run_id: str
    source: str
    url: str
    outcome: OutcomeKind
    http_status: int | None = None
    attempts: int = 0
    bytes: int = 0
    elapsed_ms: int = 0
    error: str | None = None
    at: datetime = field(default_factory=utcnow)
    etag: str | None = None
    last_modified: str | None = None
    lastmod: str | None = None
    """The URL's ``lastmod`` in the sitemap that listed it (a later run skips it while that stays the same)."""
    proxy: str | None = None
    """The proxy (``scheme://host:port``, no credentials) that served the URL, when the source uses proxies."""

    def envelope(self) -> dict[str, Any]:
        """The JSON object staged for this outcome (URL and error with secrets masked)."""
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "source": self.source,
            "url": mask_url(self.url),
            "outcome": self.outcome.value,
            "http_status": self.http_status,
            "attempts": self.attempts,
            "bytes": self.bytes,
            "elapsed_ms": self.elapsed_ms,
            "error": mask_text(self.error) if self.error else self.error,
            "at": self.at,
            "etag": self.etag,
            "last_modified": self.last_modified,
        }
        # Only when set: most outcomes have neither, and older staged outcomes have no such keys at all.
        if self.lastmod is not None:
            out["lastmod"] = self.lastmod
        if self.proxy is not None:
            out["proxy"] = self.proxy
        return out
