"""The PostgreSQL loader: committed staged parts into typed, deduplicated tables, each part exactly once.

Per part, one transaction: take an advisory lock on the part, skip it if the
ledger (``_loads``) has it, coerce every record to its declared types (records
that do not fit go to ``_rejects`` with the reasons), keep the latest
``fetched_at`` per key, COPY into a temp table, then one set-based upsert:
unchanged content hash → only ``_last_seen_at`` moves; changed → the row is
rewritten; new key → inserted. The ledger row commits with the data.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import orjson
import structlog

from sinks.stage import Manifest, StagedPart, Stager
from trawl.errors import LoadError, StagingError

__all__ = ["PG_TYPES", "Loader", "PartLoad", "coerce", "jsonb", "load_validators"]

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

# Lineage columns every source table has, in COPY order after the declared fields.
_LINEAGE = ("_key", "_extra", "_url", "_content_hash", "_run_id", "_fetched_at", "_staged_object")
_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_BIGINT = 2**63


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def jsonb(value: Any) -> str:
    """JSON text PostgreSQL's jsonb accepts: it cannot store U+0000, so NULs become U+FFFD (the staged copy keeps them)."""
    text = orjson.dumps(value).decode()
    return orjson.dumps(_no_nul(value)).decode() if "\\u0000" in text else text


def coerce(value: Any, kind: str) -> Any:
    """Convert a staged JSON value to the Python value asyncpg writes for ``kind``; ValueError if it cannot."""
    if value is None:
        return None
    match kind:
        case "text":
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected text, got {type(value).__name__}")
            if isinstance(value, str) and "\x00" in value:
                raise ValueError("contains a NUL character, which PostgreSQL text cannot store")
            return value if isinstance(value, str) else orjson.dumps(value).decode()
        case "int":
            if isinstance(value, bool):
                raise ValueError("expected int, got bool")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str) and _INT.match(value.strip()):
                value = int(value.strip())
            if not isinstance(value, int):
                raise ValueError(f"expected int, got {value!r}")
            if not -_BIGINT <= value < _BIGINT:
                raise ValueError(f"int {value} does not fit in bigint")
            return value
        case "float":
            if isinstance(value, bool):
                raise ValueError("expected float, got bool")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value.strip())
                except ValueError:
                    pass
            raise ValueError(f"expected float, got {value!r}")
        case "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError(f"expected bool, got {value!r}")
        case "date":
            if isinstance(value, str):
                try:
                    return date.fromisoformat(value.strip())
                except ValueError:
                    pass
                try:  # the date part of a full timestamp, never of any string that starts like a date
                    return datetime.fromisoformat(value.strip()).date()
                except ValueError:
                    pass
            raise ValueError(f"expected date (YYYY-MM-DD), got {value!r}")
        case "timestamp":
            if isinstance(value, str):
                try:
                    ts = datetime.fromisoformat(value.strip())
                except ValueError:
                    pass
                else:
                    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
            raise ValueError(f"expected ISO 8601 timestamp, got {value!r}")
        case "json":
            return jsonb(value)
    raise ValueError(f"unknown type {kind!r}")


@dataclass(frozen=True, slots=True)
class PartLoad:
    """What loading one part did (``skipped``: it was already in the ledger)."""

    staged_object: str
    source: str
    kind: str
    rows: int
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    skipped: bool = False


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
CREATE INDEX IF NOT EXISTS _outcomes_validators ON {s}._outcomes (source, url, at DESC)
    WHERE etag IS NOT NULL OR last_modified IS NOT NULL;
"""

_OUTCOME_COLS = (
    "run_id",
    "source",
    "url",
    "outcome",
    "http_status",
    "attempts",
    "bytes",
    "elapsed_ms",
    "error",
    "at",
    "staged_object",
    "etag",
    "last_modified",
)


class Loader:
    """Loads committed manifests from a stager into one PostgreSQL schema."""

    def __init__(self, pool: asyncpg.Pool, stager: Stager, schema: str = "trawl") -> None:
        self.pool = pool
        self.stager = stager
        self.schema = schema
        self._s = _q(schema)
        self.identity = schema
        """Which database and schema this loads into (no credentials): known after :meth:`setup`."""

    async def setup(self) -> None:
        """Create the schema and the bookkeeping tables (idempotent, safe to race)."""
        async with self.pool.acquire() as conn, conn.transaction():
            db, port = await conn.fetchrow("SELECT current_database(), inet_server_port()")
            self.identity = f"{db}:{port or 'socket'}:{self.schema}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-setup:{self.schema}")
            await conn.execute(_META_DDL.format(s=self._s))

    async def pending(self, manifests: Sequence[Manifest]) -> set[str]:
        """The part URIs of these manifests that the ledger does not have yet."""
        uris = [p.uri for m in manifests for p in m.parts]
        async with self.pool.acquire() as conn:
            done = await conn.fetch(f"SELECT staged_object FROM {self._s}._loads WHERE staged_object = ANY($1)", uris)
        return set(uris) - {r[0] for r in done}

    async def ensure_table(self, manifest: Manifest) -> dict[str, str]:
        """Create or evolve the source's table to the manifest's declared fields; returns name → type."""
        fields: dict[str, str] = {n: spec["type"] for n, spec in (manifest.schema.get("fields") or {}).items()}
        table = f"{self._s}.{_q(manifest.source)}"
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-table:{table}")
            cols = "".join(f",\n    {_q(n)} {PG_TYPES[t]}" for n, t in fields.items())
            await conn.execute(f"""
                CREATE TABLE IF NOT EXISTS {table} (
                    _key text PRIMARY KEY{cols},
                    _extra jsonb,
                    _url text NOT NULL,
                    _content_hash text NOT NULL,
                    _run_id text NOT NULL,
                    _fetched_at timestamptz NOT NULL,
                    _first_seen_at timestamptz NOT NULL,
                    _last_seen_at timestamptz NOT NULL,
                    _staged_object text NOT NULL
                )""")
            # not_modified outcomes find their rows by URL.
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {_q(manifest.source[:50] + '__url')} ON {table} (_url)")
            existing = {
                r["column_name"]: r["data_type"]
                for r in await conn.fetch(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = $1 AND table_name = $2",
                    self.schema,
                    manifest.source,
                )
            }
            for name, kind in fields.items():
                have = existing.get(name)
                if have is None:
                    log.info("column added", table=table, column=name, type=kind)
                    await conn.execute(f"ALTER TABLE {table} ADD COLUMN {_q(name)} {PG_TYPES[kind]}")
                elif have != PG_TYPES[kind]:
                    raise LoadError(
                        f"{table}.{name} is {have} but source {manifest.source!r} now declares it {kind}; "
                        "change it back or migrate the column by hand",
                        staged_object=manifest.uri,
                    )
        return fields

    async def load_manifest(self, manifest: Manifest, todo: set[str] | None = None) -> list[PartLoad]:
        """Load every part of one committed manifest that is not in the ledger yet."""
        if todo is None:
            todo = await self.pending([manifest])
        fields = await self.prepare(manifest)
        results = []
        for part in manifest.parts:
            if part.uri not in todo:
                results.append(PartLoad(part.uri, manifest.source, manifest.kind, part.rows, skipped=True))
                continue
            results.append(await self.load_part(manifest, part, fields))
        await self.finish(manifest)
        return results

    async def prepare(self, manifest: Manifest) -> dict[str, str]:
        """Before a manifest's parts load: its table exists with every declared column (field → type)."""
        return await self.ensure_table(manifest) if manifest.kind == "raw" else {}

    async def load_part(self, manifest: Manifest, part: StagedPart, fields: Mapping[str, str]) -> PartLoad:
        """Load one part in one transaction with its ledger row (a part already in the ledger is skipped)."""
        if manifest.kind == "raw":
            return await self._load_records(manifest, part, fields)
        return await self._load_outcomes(manifest, part)

    async def finish(self, manifest: Manifest) -> None:
        """After a manifest's parts load: the run's row in ``_runs``."""
        await self._record_run(manifest)

    async def _lines(self, part: StagedPart) -> AsyncIterator[dict[str, Any]]:
        n = 0
        async for line in self.stager.read_part(part):
            n += 1
            try:
                env = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise StagingError(f"{part.uri}: line {n} is not JSON: {exc}") from None
            yield env
        if n != part.rows:
            raise StagingError(f"{part.uri}: has {n} lines but the manifest says {part.rows}")

    async def _claim(self, conn: asyncpg.Connection, part: StagedPart) -> bool:
        """Lock the part for this transaction; False if another load already committed it."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", part.uri)
        done = await conn.fetchval(f"SELECT 1 FROM {self._s}._loads WHERE staged_object = $1", part.uri)
        return done is None

    async def _ledger(self, conn: asyncpg.Connection, m: Manifest, part: StagedPart, res: PartLoad) -> None:
        await conn.execute(
            f"INSERT INTO {self._s}._loads (staged_object, sha256, run_id, source, kind, rows, inserted, updated,"
            " unchanged, rejected) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            part.uri,
            part.sha256,
            m.run_id,
            m.source,
            m.kind,
            res.rows,
            res.inserted,
            res.updated,
            res.unchanged,
            res.rejected,
        )

    async def _load_records(self, m: Manifest, part: StagedPart, fields: Mapping[str, str]) -> PartLoad:
        table = f"{self._s}.{_q(m.source)}"
        required = {n for n, spec in (m.schema.get("fields") or {}).items() if spec.get("required")}
        latest: dict[str, tuple[Any, ...]] = {}
        rejects: list[tuple[Any, ...]] = []
        rows = 0
        async for env in self._lines(part):
            rows += 1
            data = env.get("data") or {}
            reasons = []
            values = []
            for name, kind in fields.items():
                raw = data.get(name)
                try:
                    v = coerce(raw, kind)
                except ValueError as exc:
                    reasons.append(f"{name}: {exc}")
                    v = None
                if v is None and name in required and not any(r.startswith(f"{name}:") for r in reasons):
                    reasons.append(f"{name}: required but missing")
                values.append(v)
            key = env.get("key")
            if key in (None, ""):
                reasons.append("key: missing (" + ", ".join(m.schema.get("key") or ["url"]) + ")")
            elif "\x00" in str(key):
                reasons.append("key: contains a NUL character")
            if reasons:
                rejects.append(
                    (m.run_id, m.source, _no_nul(key), _no_nul(env.get("url")), _no_nul(reasons), jsonb(env), part.uri)
                )
                continue
            key = str(key)
            extra = {k: v for k, v in data.items() if k not in fields}
            fetched = datetime.fromisoformat(env["fetched_at"])
            row = (
                *values,
                key,
                jsonb(extra) if extra else None,
                env["url"],
                env["content_hash"],
                env["run_id"],
                fetched,
                part.uri,
            )
            prev = latest.get(key)
            if prev is None or fetched >= prev[-2]:  # latest fetched_at wins within the part
                latest[key] = row
        cols = [*fields, *_LINEAGE]
        col_list = ", ".join(_q(c) for c in cols)
        updates = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in cols if c != "_key")
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._claim(conn, part):
                return PartLoad(part.uri, m.source, m.kind, rows, skipped=True)
            await conn.execute(
                f"CREATE TEMP TABLE _stage ON COMMIT DROP AS SELECT {col_list} FROM {table} WITH NO DATA"
            )
            await conn.copy_records_to_table("_stage", records=list(latest.values()), columns=cols)
            await conn.execute(f"""
                UPDATE {table} t SET _last_seen_at = GREATEST(t._last_seen_at, s._fetched_at)
                FROM _stage s WHERE t._key = s._key AND t._content_hash = s._content_hash""")
            flags = await conn.fetch(f"""
                INSERT INTO {table} AS t ({col_list}, _first_seen_at, _last_seen_at)
                SELECT {col_list}, s._fetched_at, s._fetched_at FROM _stage s
                WHERE NOT EXISTS (
                    SELECT 1 FROM {table} x WHERE x._key = s._key AND x._content_hash = s._content_hash)
                ON CONFLICT (_key) DO UPDATE SET {updates},
                    _first_seen_at = LEAST(t._first_seen_at, EXCLUDED._first_seen_at),
                    _last_seen_at = GREATEST(t._last_seen_at, EXCLUDED._last_seen_at)
                WHERE EXCLUDED._fetched_at >= t._fetched_at
                RETURNING (xmax = 0) AS inserted""")
            inserted = sum(1 for f in flags if f["inserted"])
            updated = len(flags) - inserted
            if rejects:
                await conn.copy_records_to_table(
                    "_rejects",
                    schema_name=self.schema,
                    records=rejects,
                    columns=["run_id", "source", "key", "url", "reasons", "record", "staged_object"],
                )
            # `unchanged` from the UPDATE, plus keys older than what the table holds (a run loaded late).
            res = PartLoad(part.uri, m.source, m.kind, rows, inserted, updated, len(latest) - len(flags), len(rejects))
            await self._ledger(conn, m, part, res)
        log.info(
            "part loaded",
            source=m.source,
            staged_object=part.uri,
            rows=rows,
            inserted=res.inserted,
            updated=res.updated,
            unchanged=res.unchanged,
            rejected=res.rejected,
        )
        return res

    async def _load_outcomes(self, m: Manifest, part: StagedPart) -> PartLoad:
        latest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        rows = 0
        async for env in self._lines(part):
            rows += 1
            at = datetime.fromisoformat(env["at"])
            k = (env["run_id"], env["source"], env["url"])
            prev = latest.get(k)
            if prev is None or at >= prev[9]:
                latest[k] = (
                    env["run_id"],
                    env["source"],
                    env["url"],
                    env["outcome"],
                    env.get("http_status"),
                    env.get("attempts", 0),
                    env.get("bytes", 0),
                    float(env.get("elapsed_ms", 0.0)),
                    env.get("error"),
                    at,
                    part.uri,
                    env.get("etag"),
                    env.get("last_modified"),
                )
        cols = ", ".join(_OUTCOME_COLS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _OUTCOME_COLS[3:])
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._claim(conn, part):
                return PartLoad(part.uri, m.source, m.kind, rows, skipped=True)
            await conn.execute(
                f"CREATE TEMP TABLE _stage ON COMMIT DROP AS SELECT {cols} FROM {self._s}._outcomes WITH NO DATA"
            )
            await conn.copy_records_to_table("_stage", records=list(latest.values()), columns=list(_OUTCOME_COLS))
            flags = await conn.fetch(f"""
                INSERT INTO {self._s}._outcomes AS t ({cols}) SELECT {cols} FROM _stage
                ON CONFLICT (run_id, source, url) DO UPDATE SET {updates} WHERE EXCLUDED.at >= t.at
                RETURNING (xmax = 0) AS inserted""")
            inserted = sum(1 for f in flags if f["inserted"])
            table = f"{self._s}.{_q(m.source)}"
            if await conn.fetchval("SELECT to_regclass($1)", f"{self.schema}.{m.source}"):
                # Not modified since an earlier run: the row is still current, so it was seen now.
                await conn.execute(f"""
                    UPDATE {table} t SET _last_seen_at = GREATEST(t._last_seen_at, s.at)
                    FROM _stage s WHERE s.outcome = 'not_modified' AND t._url = s.url""")
            res = PartLoad(part.uri, m.source, m.kind, rows, inserted, len(flags) - inserted, len(latest) - len(flags))
            await self._ledger(conn, m, part, res)
        return res

    async def _record_run(self, m: Manifest) -> None:
        """Merge this source's manifest into its run's row in ``_runs``."""
        entry = orjson.dumps({m.source: {"status": m.status, "error": m.error, **m.stats}}).decode()
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"""
                INSERT INTO {self._s}._runs AS r (run_id, flow_run_id, started_at, finished_at, status, sources)
                VALUES ($1, $2, $3, $4, $5, $6::jsonb)
                ON CONFLICT (run_id) DO UPDATE SET
                    flow_run_id = COALESCE(r.flow_run_id, EXCLUDED.flow_run_id),
                    started_at = LEAST(r.started_at, EXCLUDED.started_at),
                    finished_at = GREATEST(r.finished_at, EXCLUDED.finished_at),
                    status = CASE WHEN r.status = 'failed' OR EXCLUDED.status = 'failed'
                                  THEN 'failed' ELSE 'complete' END,
                    sources = r.sources || EXCLUDED.sources,
                    loaded_at = now()
                WHERE NOT r.sources @> EXCLUDED.sources  -- reloading the same run changes nothing
                """,
                m.run_id,
                m.flow_run_id,
                datetime.fromisoformat(m.started_at),
                datetime.fromisoformat(m.finished_at),
                m.status,
                entry,
            )


async def load_validators(pool: asyncpg.Pool, schema: str, source: str) -> dict[str, tuple[str | None, str | None]]:
    """The latest ETag / Last-Modified per URL of a source, for conditional requests in the next crawl."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{schema}._outcomes"):
            return {}
        rows = await conn.fetch(
            f"""SELECT DISTINCT ON (url) url, etag, last_modified FROM {_q(schema)}._outcomes
                WHERE source = $1 AND (etag IS NOT NULL OR last_modified IS NOT NULL)
                  AND outcome IN ('fetched', 'not_modified')
                ORDER BY url, at DESC""",
            source,
        )
    return {r["url"]: (r["etag"], r["last_modified"]) for r in rows}
