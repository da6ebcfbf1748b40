"""Incremental state in PostgreSQL: the largest cursor value of each source's last loaded run.

``{schema}._state`` holds one row per source. The crawl reads it when a source
starts (:func:`start_state`), recording in ``{schema}._state_starts`` what run
``R`` started from, so a resumed ``R`` asks for the same window even if the state
moved meanwhile. The load moves it (:func:`advance_state`) after a run's parts
have committed, and only forward; a failed run or a back-fill leaves it. ``trawl
state`` shows and resets it (:func:`states`, :func:`reset_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
import structlog

from trawl.incremental import CursorValue, later
from trawl.staging import Manifest

__all__ = ["advance_state", "reset_state", "start_state", "states"]

log = structlog.get_logger("sinks.state")

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}._state (
    source text PRIMARY KEY,
    cursor_path text NOT NULL,
    value jsonb NOT NULL,
    run_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}._state_starts (
    source text NOT NULL,
    run_id text NOT NULL,
    value jsonb,
    started_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, run_id)
);
"""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _ensure(conn: asyncpg.Connection, schema: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-state:{schema}")
    await conn.execute(_DDL.format(s=_q(schema)))


def _value(raw: str | None) -> CursorValue | None:
    return None if raw is None else orjson.loads(raw)


async def start_state(pool: asyncpg.Pool, schema: str, source: str, run_id: str) -> CursorValue | None:
    """The state run ``run_id`` of ``source`` starts from: the stored value, or (a resumed run) the one it first had."""
    s = _q(schema)
    async with pool.acquire() as conn, conn.transaction():
        await _ensure(conn, schema)
        await conn.execute(
            f"INSERT INTO {s}._state_starts (source, run_id, value)"
            f" SELECT $1, $2, (SELECT value FROM {s}._state WHERE source = $1)"
            " ON CONFLICT (source, run_id) DO NOTHING",
            source,
            run_id,
        )
        raw = await conn.fetchval(
            f"SELECT value FROM {s}._state_starts WHERE source = $1 AND run_id = $2", source, run_id
        )
    return _value(raw)


async def advance_state(pool: asyncpg.Pool, schema: str, manifest: Manifest) -> CursorValue | None:
    """After a run's records have loaded: move its source's state to the largest value the run saw.

    Only a complete records manifest whose window may move the state (no ``end_value``)
    moves it, and only forward. Returns the state now stored (None: nothing to do).
    """
    window: Mapping[str, Any] | None = manifest.stats.get("incremental") if manifest.kind == "raw" else None
    if not window or manifest.status != "complete" or not window.get("moves_state", True):
        return None
    seen = window.get("last_value")
    if seen is None:
        return None
    s = _q(schema)
    async with pool.acquire() as conn, conn.transaction():
        await _ensure(conn, schema)
        raw = await conn.fetchval(f"SELECT value FROM {s}._state WHERE source = $1 FOR UPDATE", manifest.source)
        current = _value(raw)
        value = later(current, seen)
        if raw is not None and value == current:
            return current
        await conn.execute(
            f"INSERT INTO {s}._state (source, cursor_path, value, run_id) VALUES ($1, $2, $3::jsonb, $4)"
            " ON CONFLICT (source) DO UPDATE SET cursor_path = EXCLUDED.cursor_path, value = EXCLUDED.value,"
            " run_id = EXCLUDED.run_id, updated_at = now()",
            manifest.source,
            str(window.get("cursor_path") or ""),
            orjson.dumps(value).decode(),
            manifest.run_id,
        )
    log.info("incremental state moved", source=manifest.source, value=value, previous=current, run_id=manifest.run_id)
    return value


async def states(pool: asyncpg.Pool, schema: str, source: str | None = None) -> list[dict[str, Any]]:
    """Every source's state (or one source's): source, cursor_path, value, run_id, updated_at."""
    s = _q(schema)
    async with pool.acquire() as conn, conn.transaction():
        await _ensure(conn, schema)
        rows = await conn.fetch(
            f"SELECT source, cursor_path, value, run_id, updated_at FROM {s}._state"
            " WHERE $1::text IS NULL OR source = $1 ORDER BY source",
            source,
        )
    return [{**dict(r), "value": _value(r["value"])} for r in rows]


async def reset_state(pool: asyncpg.Pool, schema: str, source: str, value: CursorValue | None = None) -> bool:
    """Forget a source's state (its next run starts from ``initial_value``), or set it to ``value``.

    Returns whether there was a state before."""
    s = _q(schema)
    async with pool.acquire() as conn, conn.transaction():
        await _ensure(conn, schema)
        before = await conn.fetchrow(f"SELECT cursor_path FROM {s}._state WHERE source = $1 FOR UPDATE", source)
        if value is None:
            await conn.execute(f"DELETE FROM {s}._state WHERE source = $1", source)
        else:
            await conn.execute(
                f"INSERT INTO {s}._state (source, cursor_path, value, run_id) VALUES ($1, $2, $3::jsonb, 'reset')"
                " ON CONFLICT (source) DO UPDATE SET value = EXCLUDED.value, run_id = 'reset', updated_at = now()",
                source,
                before["cursor_path"] if before else "",
                orjson.dumps(value).decode(),
            )
    log.info("incremental state reset", source=source, value=value)
    return before is not None
