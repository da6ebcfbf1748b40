"""DDL and schema evolution: the bookkeeping tables, each source's table and views, the in-place layout upgrade.

A source's table holds the current state only (``_key``, the declared columns,
``_extra``, ``_url``, ``_content_hash``, ``_fetched_at``, ``_first_seen_at``,
``_changed_at``, ``_load_id``); "seen" lives in the narrow ``_lineage`` log. A
declared field added later becomes a column back-filled from ``_extra``; a type
change is applied only when every stored value survives it; each change is a
version row in ``_schemas``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog

from sinks.validate import RecordValidator, jsonb
from trawl.errors import LoadError
from trawl.staging import Manifest

__all__ = [
    "LAYOUT",
    "PG_TYPES",
    "TRAWL_TYPES",
    "ensure_meta",
    "ensure_table",
    "literal",
    "q",
    "row_columns",
    "views_schema",
]

log = structlog.get_logger("sinks.postgres")

PG_TYPES: Mapping[str, str] = {
    "text": "text",
    "int": "bigint",
    "float": "double precision",
    "bool": "boolean",
    "date": "date",
    "timestamp": "timestamp with time zone",
    "json": "jsonb",
}
TRAWL_TYPES = {v: k for k, v in PG_TYPES.items()}

LAYOUT = 2
"""The table layout this loader writes (1: ``_last_seen_at``/``_staged_object`` on each row, wide lineage)."""

# Bookkeeping columns of every source table after the declared fields, in COPY order.
_ROW_TAIL = ("_key", "_extra", "_url", "_content_hash", "_fetched_at", "_first_seen_at", "_changed_at", "_load_id")


def q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A quoted SQL string literal (for view definitions, which cannot take parameters)."""
    return "'" + text.replace("'", "''") + "'"


def views_schema(schema: str) -> str:
    """The schema holding one view per source with only its declared columns (``trawl_views``)."""
    return schema[:57] + "_views"


def row_columns(types: Mapping[str, str]) -> list[str]:
    """A source table's columns in the order the loader COPYs them: declared fields, then bookkeeping."""
    return [*types, *_ROW_TAIL]


_META_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}._runs (
    run_id text PRIMARY KEY,
    flow_run_id text,
    started_at timestamptz,
    finished_at timestamptz,
    status text NOT NULL,
    sources jsonb NOT NULL DEFAULT '{{}}',
    loaded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}._loads (
    load_id bigserial UNIQUE,
    staged_object text PRIMARY KEY,
    sha256 text NOT NULL,
    run_id text NOT NULL,
    source text NOT NULL,
    kind text NOT NULL,
    rows bigint NOT NULL,
    inserted bigint NOT NULL,
    updated bigint NOT NULL,
    unchanged bigint NOT NULL,
    rejected bigint NOT NULL,
    seen_at timestamptz,
    loaded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}._rejects (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    source text NOT NULL,
    key text,
    url text,
    reasons text[] NOT NULL,
    record jsonb NOT NULL,
    staged_object text NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS _rejects_run_source ON {s}._rejects (run_id, source);
ALTER TABLE {s}._rejects ADD COLUMN IF NOT EXISTS line integer;
-- A record is rejected once per staged line, however often its part is retried.
CREATE UNIQUE INDEX IF NOT EXISTS _rejects_line ON {s}._rejects (staged_object, line);
CREATE INDEX IF NOT EXISTS _rejects_source_key ON {s}._rejects (source, key);
CREATE TABLE IF NOT EXISTS {s}._schemas (
    source text NOT NULL,
    version integer NOT NULL,
    declared jsonb NOT NULL,
    changes text[] NOT NULL,
    run_id text NOT NULL,
    manifest text NOT NULL,
    run_started_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, version)
);
-- One narrow row per staged record loaded: run, staged object and URL are one join away (_loads, the part).
CREATE TABLE IF NOT EXISTS {s}._lineage (
    load_id bigint NOT NULL,
    key text NOT NULL,
    line integer,
    change text NOT NULL
);
{lineage_indexes}CREATE SCHEMA IF NOT EXISTS {v};
CREATE TABLE IF NOT EXISTS {s}._outcomes (
    run_id text NOT NULL,
    source text NOT NULL,
    url text NOT NULL,
    outcome text NOT NULL,
    http_status integer,
    attempts integer NOT NULL,
    bytes bigint NOT NULL,
    elapsed_ms double precision NOT NULL,
    error text,
    at timestamptz NOT NULL,
    staged_object text NOT NULL,
    PRIMARY KEY (run_id, source, url)
);
ALTER TABLE {s}._outcomes ADD COLUMN IF NOT EXISTS etag text;
ALTER TABLE {s}._outcomes ADD COLUMN IF NOT EXISTS last_modified text;
-- The sitemap's lastmod of the URL (a later run skips it while that stays) and the proxy that served it.
ALTER TABLE {s}._outcomes ADD COLUMN IF NOT EXISTS lastmod text;
ALTER TABLE {s}._outcomes ADD COLUMN IF NOT EXISTS proxy text;
CREATE INDEX IF NOT EXISTS _outcomes_lastmod ON {s}._outcomes (source, url, at DESC) WHERE lastmod IS NOT NULL;
CREATE INDEX IF NOT EXISTS _outcomes_validators ON {s}._outcomes (source, url, at DESC)
    WHERE etag IS NOT NULL OR last_modified IS NOT NULL;
"""


_LINEAGE_INDEXES = """
-- Each part's rows are written in key order: a block range index over key finds a key's rows in each part's
-- run (a few pages per part) and costs nothing to keep up; a btree over key cost PostgreSQL 1-1.6 CPU s per
-- million records loaded. An older schema's btree is replaced.
DROP INDEX IF EXISTS {s}._lineage_key;
CREATE INDEX IF NOT EXISTS _lineage_key_brin ON {s}._lineage USING brin (key)
    WITH (pages_per_range = 4, autosummarize = on);
-- Append-only in load_id order: a block range index finds a run's rows for almost nothing.
CREATE INDEX IF NOT EXISTS _lineage_load ON {s}._lineage USING brin (load_id);
"""


async def ensure_meta(conn: asyncpg.Connection, schema: str) -> None:
    """The schema and its bookkeeping tables, an old layout upgraded first (caller holds the setup lock)."""
    s = q(schema)
    old = await conn.fetchval(
        "SELECT NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1"
        " AND table_name = '_loads' AND column_name = 'load_id')"
        " AND EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = '_loads')",
        schema,
    )
    if old:
        await _upgrade(conn, schema)
    # Already current: no DDL at all. Even an IF NOT EXISTS index or column takes a table lock first, which
    # would deadlock with a loader already writing its parts.
    current = await conn.fetchval(
        "SELECT count(*) = 5 FROM information_schema.columns WHERE table_schema = $1 AND (table_name, column_name)"
        " IN (('_loads', 'seen_at'), ('_lineage', 'load_id'), ('_outcomes', 'last_modified'), ('_rejects', 'line'),"
        " ('_outcomes', 'proxy'))",
        schema,
    )
    if not current:
        await conn.execute(
            _META_DDL.format(s=s, v=q(views_schema(schema)), lineage_indexes=_LINEAGE_INDEXES.format(s=s))
        )
    elif not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{s}._lineage_key_brin"):
        # Layout 2 as the first loaders (or an upgrade) left it: the lineage's key btree becomes a block range
        # index, once.
        await conn.execute(_LINEAGE_INDEXES.format(s=s))


async def _upgrade(conn: asyncpg.Connection, schema: str) -> None:
    """Layout 1 → 2 in place, in the caller's transaction: nothing the old layout knew is dropped unconverted.

    ``_loads`` gains ``load_id`` and ``seen_at`` (the latest fetch seen by the
    part); the wide ``_lineage`` becomes the narrow one (its run, URL and staged
    object are the ledger's and the part's); each source table gets ``_load_id``
    (from ``_staged_object``) and ``_changed_at`` (that load's time), the
    not-modified answers that moved ``_last_seen_at`` become lineage rows, then
    ``_staged_object``, ``_run_id`` and ``_last_seen_at`` go. One ``_schemas``
    version per source says so.
    """
    s = q(schema)
    await conn.execute(f"""
        ALTER TABLE {s}._loads ADD COLUMN load_id bigserial UNIQUE, ADD COLUMN seen_at timestamptz;
        UPDATE {s}._loads d SET seen_at = x.at
        FROM (SELECT staged_object, max(fetched_at) AS at FROM {s}._lineage GROUP BY 1) x
        WHERE x.staged_object = d.staged_object;
        UPDATE {s}._loads d SET seen_at = x.at
        FROM (SELECT staged_object, max(at) AS at FROM {s}._outcomes GROUP BY 1) x
        WHERE x.staged_object = d.staged_object AND d.kind = 'outcomes';
        ALTER TABLE {s}._lineage RENAME TO _lineage_v1;
        DROP INDEX IF EXISTS {s}._lineage_source_key;
        CREATE TABLE {s}._lineage (load_id bigint NOT NULL, key text NOT NULL, line integer, change text NOT NULL);
        INSERT INTO {s}._lineage (load_id, key, line, change)
        SELECT d.load_id, l.key, NULL, l.change FROM {s}._lineage_v1 l
        JOIN {s}._loads d ON d.staged_object = l.staged_object ORDER BY d.load_id, l.key;
        """)
    sources = [
        r["source"]
        for r in await conn.fetch(
            f"SELECT DISTINCT source FROM {s}._schemas s WHERE EXISTS (SELECT 1 FROM information_schema.columns c"
            " WHERE c.table_schema = $1 AND c.table_name = s.source AND c.column_name = '_staged_object')",
            schema,
        )
    ]
    for source in sources:
        t = f"{s}.{q(source)}"
        await conn.execute(f"""
            ALTER TABLE {t} ADD COLUMN _changed_at timestamptz, ADD COLUMN _load_id bigint;
            UPDATE {t} t SET _load_id = d.load_id, _changed_at = d.loaded_at
            FROM {s}._loads d WHERE d.staged_object = t._staged_object;""")
        await conn.execute(
            f"""
            INSERT INTO {s}._lineage (load_id, key, line, change)
            SELECT DISTINCT d.load_id, t._key, NULL::integer, 'unchanged' FROM {t} t
            JOIN {s}._outcomes o ON o.source = $1 AND o.url = t._url AND o.outcome = 'not_modified'
            JOIN {s}._loads d ON d.staged_object = o.staged_object ORDER BY 1, 2""",
            source,
        )
        await conn.execute(f"""
            ALTER TABLE {t} ALTER COLUMN _load_id SET NOT NULL, ALTER COLUMN _changed_at SET NOT NULL;
            DROP VIEW IF EXISTS {q(views_schema(schema))}.{q(source)};
            ALTER TABLE {t} DROP COLUMN _staged_object, DROP COLUMN _run_id, DROP COLUMN _last_seen_at;
            ALTER TABLE {t} SET (fillfactor = 100);""")
        latest = await conn.fetchrow(
            f"SELECT version, declared, run_id, manifest, run_started_at FROM {s}._schemas"
            " WHERE source = $1 ORDER BY version DESC LIMIT 1",
            source,
        )
        await conn.execute(
            f"INSERT INTO {s}._schemas (source, version, declared, changes, run_id, manifest, run_started_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            source,
            latest["version"] + 1,
            latest["declared"],
            [
                f"layout {LAYOUT}: rows written only when new or changed; _load_id and _changed_at added; "
                "_staged_object, _run_id, _last_seen_at moved to _loads and _lineage"
            ],
            latest["run_id"],
            latest["manifest"],
            latest["run_started_at"],
        )
        declared = list(orjson.loads(latest["declared"]).get("fields") or {})
        await view(conn, schema, source, declared)
    await conn.execute(f"DROP TABLE {s}._lineage_v1")
    log.info("layout upgraded", schema=schema, layout=LAYOUT, sources=sources)


async def ensure_table(conn: asyncpg.Connection, schema: str, manifest: Manifest) -> dict[str, str]:
    """Create or evolve the source's table to the manifest's declaration; returns field → type to load with.

    Runs in the caller's transaction, all or nothing: new fields become columns
    back-filled from ``_extra``; a changed type is applied only when every stored
    value survives the cast (else LoadError, table untouched); every change is a
    new version in ``_schemas``; the source's views are rebuilt. A manifest older
    than the latest declaration never moves a type back: its values load with the
    table's types.
    """
    s = q(schema)
    declared: dict[str, dict[str, Any]] = dict(manifest.schema.get("fields") or {})
    table = f"{s}.{q(manifest.source)}"
    started = datetime.fromisoformat(manifest.started_at)
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-table:{table}")
    cols = "".join(f",\n    {q(n)} {PG_TYPES[spec['type']]}" for n, spec in declared.items())
    await conn.execute(f"""
        CREATE TABLE IF NOT EXISTS {table} (
            _key text PRIMARY KEY{cols},
            _extra jsonb,
            _url text NOT NULL,
            _content_hash text NOT NULL,
            _fetched_at timestamptz NOT NULL,
            _first_seen_at timestamptz NOT NULL,
            _changed_at timestamptz NOT NULL,
            _load_id bigint NOT NULL
        )""")
    # not_modified outcomes find their rows by URL.
    await conn.execute(f"CREATE INDEX IF NOT EXISTS {q(manifest.source[:50] + '__url')} ON {table} (_url)")
    existing = {
        r["column_name"]: r["data_type"]
        for r in await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            schema,
            manifest.source,
        )
    }
    latest = await conn.fetchrow(
        f"SELECT version, declared, run_started_at FROM {s}._schemas WHERE source = $1 ORDER BY version DESC LIMIT 1",
        manifest.source,
    )
    older = latest is not None and started < latest["run_started_at"]
    types: dict[str, str] = {}
    changes: list[str] = []
    retype: list[tuple[str, str, str]] = []
    for name, spec in declared.items():
        kind, have = spec["type"], existing.get(name)
        types[name] = kind
        if have is None:
            await conn.execute(f"ALTER TABLE {table} ADD COLUMN {q(name)} {PG_TYPES[kind]}")
            moved, kept = await _backfill(conn, table, name, spec)
            change = f"added column {name} {kind}"
            if moved or kept:
                change += f" (back-filled {moved} row(s) from _extra"
                change += f"; {kept} value(s) that do not fit stay in _extra)" if kept else ")"
            changes.append(change)
        elif have != PG_TYPES[kind]:
            if older or have not in TRAWL_TYPES:
                types[name] = TRAWL_TYPES.get(have, kind)  # load old runs as the table is now
            else:
                retype.append((name, have, kind))
    if retype:
        await conn.execute(f"DROP VIEW IF EXISTS {q(views_schema(schema))}.{q(manifest.source)}")
        await conn.execute(f"DROP VIEW IF EXISTS {q(views_schema(schema))}.{q(manifest.source + '_missing')}")
        for name, have, kind in retype:
            await _retype(conn, table, manifest, name, have, kind)
            changes.append(f"{name}: {TRAWL_TYPES[have]} -> {kind}")
    previous = orjson.loads(latest["declared"]) if latest is not None else None
    if changes or (not older and previous != dict(manifest.schema)):
        if previous is not None and not older:
            gone = [f for f in previous.get("fields") or {} if f not in declared]
            changes += [f"{f}: no longer declared (column kept, new values go to _extra)" for f in gone]
            ruled = [
                f for f, spec in declared.items() if f in previous.get("fields", {}) and previous["fields"][f] != spec
            ]
            changes += [f"{f}: rules changed" for f in ruled if not any(c.startswith(f"{f}:") for c in changes)]
            if previous.get("key") != manifest.schema.get("key"):
                changes.append(f"key: {previous.get('key')} -> {manifest.schema.get('key')}")
        version = (latest["version"] if latest is not None else 0) + 1
        await conn.execute(
            f"INSERT INTO {s}._schemas (source, version, declared, changes, run_id, manifest, run_started_at)"
            " VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)",
            manifest.source,
            version,
            jsonb(dict(manifest.schema)),
            changes or ["created"],
            manifest.run_id,
            manifest.uri,
            started if not older else latest["run_started_at"],
        )
        log.info("schema version", source=manifest.source, version=version, changes=changes or ["created"])
    if not older:
        await view(conn, schema, manifest.source, list(declared))
    return types


async def _backfill(conn: asyncpg.Connection, table: str, name: str, spec: Mapping[str, Any]) -> tuple[int, int]:
    """Move a newly declared field's values from ``_extra`` into its column where they pass validation."""
    rows = await conn.fetch(f"SELECT _key, _extra FROM {table} WHERE _extra ? $1", name)
    if not rows:
        return 0, 0
    validator = RecordValidator({name: spec})
    good: list[tuple[str, Any]] = []
    for r in rows:
        extra = orjson.loads(r["_extra"])
        [value], reasons = validator(extra)
        if not reasons:
            good.append((r["_key"], value))
    if good:
        tmp = f"_backfill_{spec['type']}"  # one name per type: asyncpg caches COPY codecs by statement text
        await conn.execute(
            f"CREATE TEMP TABLE {tmp} ON COMMIT DROP AS SELECT _key, {q(name)} AS v FROM {table} WITH NO DATA"
        )
        await conn.copy_records_to_table(tmp, records=good, columns=["_key", "v"])
        await conn.execute(
            f"""
            UPDATE {table} t SET {q(name)} = b.v, _extra = NULLIF(t._extra - $1, '{{}}'::jsonb)
            FROM {tmp} b WHERE t._key = b._key""",
            name,
        )
        await conn.execute(f"DROP TABLE {tmp}")
    return len(good), len(rows) - len(good)


async def _retype(conn: asyncpg.Connection, table: str, m: Manifest, name: str, have: str, kind: str) -> None:
    """Change a column's type if every value survives the cast and back; else LoadError (rolls back)."""
    col, new = q(name), PG_TYPES[kind]
    refuse = f"{table}.{name} is {TRAWL_TYPES[have]} ({have}) but source {m.source!r} now declares it {kind}"
    try:
        lost = await conn.fetchrow(
            f"SELECT count(*) OVER () AS n, _key, {col}::text AS value FROM {table}"
            f" WHERE {col} IS NOT NULL AND ({col}::{new})::{have} IS DISTINCT FROM {col} LIMIT 1"
        )
    except asyncpg.PostgresError as exc:
        raise LoadError(
            f"{refuse}, and PostgreSQL cannot cast the stored values: {exc}; "
            "declare it back or migrate the column by hand (nothing was changed)",
            staged_object=m.uri,
        ) from None
    if lost is not None:
        raise LoadError(
            f"{refuse}, and {lost['n']} stored value(s) would not survive the cast (e.g. _key {lost['_key']!r}: "
            f"{lost['value']}); declare it back or migrate the column by hand (nothing was changed)",
            staged_object=m.uri,
        )
    await conn.execute(f"ALTER TABLE {table} ALTER COLUMN {col} TYPE {new} USING {col}::{new}")


async def view(conn: asyncpg.Connection, schema: str, source: str, declared: list[str]) -> None:
    """The source's two views in the views schema.

    ``<source>``: ``_key``, the declared columns in declaration order, and
    ``_last_seen_at`` (the row's fetch, or a later load whose part saw it
    unchanged). ``<source>_missing``: the rows the latest complete run of the
    source did not see (delisted items).
    """
    s, v = q(schema), q(views_schema(schema))
    src = literal(source)
    cols = ", ".join(["t._key", *(f"t.{q(n)}" for n in declared)])
    # A join with the sightings grouped by key (not a lookup per row): reading the whole view is one pass over
    # the source's lineage, and a filter on _key reaches the lineage's key index through the join.
    seen = f"""SELECT l.key, max(d.seen_at) AS at FROM {s}._lineage l JOIN {s}._loads d ON d.load_id = l.load_id
        WHERE d.source = {src} AND l.change IN ('unchanged', 'older') GROUP BY l.key"""
    sqls = {
        q(source): f"CREATE OR REPLACE VIEW {v}.{q(source)} AS SELECT {cols}, GREATEST(t._fetched_at, x.at)"
        f" AS _last_seen_at FROM {s}.{q(source)} t LEFT JOIN ({seen}) x ON x.key = t._key",
        q(source + "_missing"): f"""CREATE OR REPLACE VIEW {v}.{q(source + "_missing")} AS
            WITH latest AS (
                SELECT r.run_id FROM {s}._runs r WHERE r.sources -> {src} ->> 'status' = 'complete'
                ORDER BY r.started_at DESC, r.run_id DESC LIMIT 1
            ), seen AS (
                SELECT l.key FROM {s}._lineage l JOIN {s}._loads d ON d.load_id = l.load_id
                WHERE d.source = {src} AND d.run_id = (SELECT run_id FROM latest)
            )
            SELECT {cols}, t._url, t._fetched_at, (SELECT run_id FROM latest) AS _latest_run_id
            FROM {s}.{q(source)} t
            WHERE EXISTS (SELECT 1 FROM latest) AND NOT EXISTS (SELECT 1 FROM seen WHERE seen.key = t._key)""",
    }
    for name, sql in sqls.items():
        try:
            async with conn.transaction():
                await conn.execute(sql)
        except asyncpg.InvalidTableDefinitionError:  # a column left or moved: OR REPLACE only appends
            await conn.execute(f"DROP VIEW {v}.{name}")
            await conn.execute(sql)
