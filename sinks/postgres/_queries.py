"""Read queries over what the loader wrote: a row's lineage, and the validators for conditional requests."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog

from sinks.postgres._ddl import q
from sinks.stage import LocalStager
from trawl.errors import StagingError
from trawl.staging import StagedPart, Stager

__all__ = ["LineageEntry", "lineage", "load_lastmods", "load_validators"]

log = structlog.get_logger("sinks.postgres")

LineageEntry = dict[str, Any]
"""``run_id``, ``url``, ``fetched_at``, ``staged_object``, ``loaded_at``, ``change``, ``reasons``, ``archive``
(where the page archive holds the response: ``warc``, ``offset``, ``length``; None without one)."""


async def lineage(
    pool: asyncpg.Pool, schema: str, source: str, key: str, *, stager: Stager | None = None
) -> list[LineageEntry]:
    """Every load that touched one row, oldest first: run, URL, fetched time, staged object, load time, change.

    ``change`` is ``inserted``, ``updated`` (content changed), ``unchanged``
    (seen again, nothing written; also a not-modified answer), ``older`` (a newer
    version was already loaded) or ``rejected`` (with the reasons; the row was not
    touched). The lineage log keeps load id, key and line only: the URL and fetch
    time of a record that is not the row's current content are read from its
    staged part (``stager`` for S3; local parts are read where they are). A part
    that cannot be read any more shows no URL and its part's latest fetch.
    """
    s = q(schema)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{s}._lineage"):
            return []
        table = f"{s}.{q(source)}"
        has_table = await conn.fetchval("SELECT to_regclass($1)", table)
        current = (
            f"LEFT JOIN {table} t ON t._key = l.key AND t._load_id = l.load_id AND l.change IN ('inserted', 'updated')"
            if has_table
            else "LEFT JOIN (SELECT NULL::text AS _url, NULL::timestamptz AS _fetched_at) t ON false"
        )
        loaded = await conn.fetch(
            f"""
            SELECT d.run_id, d.staged_object, d.sha256, d.rows, d.kind, d.loaded_at, d.seen_at, l.line, l.change,
                   t._url, t._fetched_at
            FROM {s}._lineage l JOIN {s}._loads d ON d.load_id = l.load_id {current}
            WHERE d.source = $1 AND l.key = $2 ORDER BY l.load_id""",
            source,
            key,
        )
        rejected = await conn.fetch(
            f"""
            SELECT r.run_id, r.url, (r.record->>'fetched_at')::timestamptz AS fetched_at, r.staged_object,
                   r.rejected_at AS loaded_at, 'rejected' AS change, r.reasons
            FROM {s}._rejects r WHERE r.source = $1 AND r.key = $2""",
            source,
            key,
        )
    entries: list[LineageEntry] = []
    for r in loaded:
        url, fetched = r["_url"], r["_fetched_at"]
        # The staged record also says where the page archive holds its response (read for every version).
        part = StagedPart(r["staged_object"], r["rows"], 0, r["sha256"])
        staged_url, staged_at, archive = await _staged(stager, part, r["kind"], key, r["line"])
        if url is None:
            url, fetched = staged_url, staged_at or r["seen_at"]
        entries.append(
            {
                "run_id": r["run_id"],
                "url": url,
                "fetched_at": fetched,
                "staged_object": r["staged_object"],
                "loaded_at": r["loaded_at"],
                "change": r["change"],
                "reasons": None,
                "archive": archive,
            }
        )
    entries += [{**dict(r), "archive": None} for r in rejected]
    entries.sort(key=lambda e: (e["fetched_at"] is None, e["fetched_at"] or e["loaded_at"], e["loaded_at"]))
    return entries


async def _staged(
    stager: Stager | None, part: StagedPart, kind: str, key: str, line: int | None
) -> tuple[str | None, datetime | None, dict[str, Any] | None]:
    """The URL, fetch time and archived response (``warc``, ``offset``, ``length``) of a record in its staged part
    (by line, or by key for rows from layout 1)."""
    reader: Stager | None = stager
    if part.uri.startswith("file://"):
        path = Path(part.uri.removeprefix("file://"))
        reader = await asyncio.to_thread(LocalStager, path.parent)  # it resolves its root: file system calls
    if reader is None:
        return None, None, None
    best: tuple[str | None, datetime | None, dict[str, Any] | None] = (None, None, None)
    try:
        n = 0
        async for raw in reader.read_part(part):
            n += 1
            if line is not None and n != line:
                continue
            env = orjson.loads(raw)
            if kind == "outcomes":
                return env.get("url"), datetime.fromisoformat(env["at"]), None
            if line is not None or str(env.get("key")) == key:
                at = datetime.fromisoformat(env["fetched_at"])
                if best[1] is None or at >= best[1]:
                    best = (env.get("url"), at, env.get("archive"))
                if line is not None:
                    break
    except (StagingError, OSError, ValueError, KeyError) as exc:
        log.warning("staged part unreadable for lineage", staged_object=part.uri, error=str(exc))
        return None, None, None
    return best


async def load_validators(pool: asyncpg.Pool, schema: str, source: str) -> dict[str, tuple[str | None, str | None]]:
    """The latest ETag / Last-Modified per URL of a source, for conditional requests in the next crawl."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{schema}._outcomes"):
            return {}
        rows = await conn.fetch(
            f"""SELECT DISTINCT ON (url) url, etag, last_modified FROM {q(schema)}._outcomes
                WHERE source = $1 AND (etag IS NOT NULL OR last_modified IS NOT NULL)
                  AND outcome IN ('fetched', 'not_modified')
                ORDER BY url, at DESC""",
            source,
        )
    return {r["url"]: (r["etag"], r["last_modified"]) for r in rows}


async def load_lastmods(pool: asyncpg.Pool, schema: str, source: str) -> dict[str, str]:
    """The sitemap ``lastmod`` of each URL of a source as of its latest fetch (or skip), for the next crawl."""
    async with pool.acquire() as conn:
        has = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1"
            " AND table_name = '_outcomes' AND column_name = 'lastmod')",
            schema,
        )
        if not has:
            return {}
        rows = await conn.fetch(
            f"""SELECT DISTINCT ON (url) url, lastmod FROM {q(schema)}._outcomes
                WHERE source = $1 AND lastmod IS NOT NULL AND outcome IN ('fetched', 'not_modified')
                ORDER BY url, at DESC""",
            source,
        )
    return {r["url"]: r["lastmod"] for r in rows}
