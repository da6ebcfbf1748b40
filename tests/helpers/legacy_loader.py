"""The loader as it was before layout 2 (sinks/postgres.py at d7c9497), frozen: it writes layout 1 for the test
that upgrades an old schema in place. Not used by trawl itself; do not change it.

The PostgreSQL loader: committed staged parts into typed, deduplicated tables, each part exactly once.

Per source and manifest, first the table is created or evolved to the declared
fields (``ensure_table``: new columns back-filled from ``_extra``, lossless type
changes only, a version row in ``_schemas``, the declared-columns view). Then
parts are read through the ``Stager`` protocol (local or S3 alike) and decoded,
validated (``sinks.validate``) and deduplicated in a worker thread while the
previous part is being written. Per part, one transaction: an advisory lock on
the part, skip it if the ledger (``_loads``) has it, check the reject rate,
COPY into a temp table, then one statement upserts (unchanged content hash →
only ``_last_seen_at`` moves; changed → the row is rewritten; new key →
inserted; older than the row → nothing) and writes ``_lineage``; rejects and
the ledger row commit with the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import structlog

from sinks.validate import RecordValidator, coerce, jsonb, no_nul
from trawl.errors import LoadError, StagingError, TooManyRejects
from trawl.staging import Manifest, StagedPart, Stager

__all__ = ["PG_TYPES", "Loader", "PartLoad", "coerce", "jsonb", "lineage", "load_validators", "views_schema"]

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
_TRAWL_TYPES = {v: k for k, v in PG_TYPES.items()}

# Lineage columns every source table has, in COPY order after the declared fields.
_LINEAGE = ("_key", "_extra", "_url", "_content_hash", "_run_id", "_fetched_at", "_staged_object")
_REJECT_COLS = ("run_id", "source", "key", "url", "reasons", "record", "staged_object", "line")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def views_schema(schema: str) -> str:
    """The schema holding one view per source with only its declared columns (``trawl_views``)."""
    return schema[:57] + "_views"


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
CREATE TABLE IF NOT EXISTS {s}._lineage (
    source text NOT NULL,
    key text NOT NULL,
    run_id text NOT NULL,
    url text NOT NULL,
    fetched_at timestamptz NOT NULL,
    change text NOT NULL,
    staged_object text NOT NULL
);
CREATE INDEX IF NOT EXISTS _lineage_source_key ON {s}._lineage (source, key);
CREATE SCHEMA IF NOT EXISTS {v};
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


@dataclass(slots=True)
class _Prepared:
    """One part decoded, validated and deduplicated, ready to COPY (built off the event loop)."""

    part: StagedPart
    rows: int
    latest: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    rejects: list[tuple[Any, ...]] = field(default_factory=list)


class Loader:
    """Loads committed manifests from a stager into one PostgreSQL schema.

    ``max_reject_rate`` (0..1, None: no limit) fails a manifest's load when more
    than that share of its records were rejected — counted over the parts loaded
    so far, once ``reject_min_rows`` records were seen or at its last part — so a
    broken scrape stops instead of loading quietly. The failing part is rolled
    back (its rejects are kept in ``_rejects`` for the diagnosis) and stays
    pending: a rerun after the fix loads it.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        stager: Stager,
        schema: str = "trawl",
        *,
        max_reject_rate: float | None = None,
        reject_min_rows: int = 100,
    ) -> None:
        self.pool = pool
        self.stager = stager
        self.schema = schema
        self.max_reject_rate = max_reject_rate
        self.reject_min_rows = reject_min_rows
        self._s = _q(schema)
        self._validators: dict[str, RecordValidator] = {}
        self._ahead: dict[str, asyncio.Task[_Prepared]] = {}
        self.identity = schema
        """Which database and schema this loads into (no credentials): known after :meth:`setup`."""

    async def setup(self) -> None:
        """Create the schema and the bookkeeping tables (idempotent, safe to race)."""
        async with self.pool.acquire() as conn, conn.transaction():
            db, port = await conn.fetchrow("SELECT current_database(), inet_server_port()")
            self.identity = f"{db}:{port or 'socket'}:{self.schema}"
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-setup:{self.schema}")
            await conn.execute(_META_DDL.format(s=self._s, v=_q(views_schema(self.schema))))

    async def pending(self, manifests: Sequence[Manifest]) -> set[str]:
        """The part URIs of these manifests that the ledger does not have yet."""
        uris = [p.uri for m in manifests for p in m.parts]
        async with self.pool.acquire() as conn:
            done = await conn.fetch(f"SELECT staged_object FROM {self._s}._loads WHERE staged_object = ANY($1)", uris)
        return set(uris) - {r[0] for r in done}

    # -- schema evolution -------------------------------------------------------------------------------

    async def ensure_table(self, manifest: Manifest) -> dict[str, str]:
        """Create or evolve the source's table to the manifest's declaration; returns field → type to load with.

        All or nothing, in one transaction: new fields become columns back-filled
        from ``_extra``; a changed type is applied only when every stored value
        survives the cast (else LoadError, table untouched); every change is a new
        version in ``_schemas``; the source's view is rebuilt. A manifest older than
        the latest declaration never moves a type back: its values load with the
        table's types.
        """
        declared: dict[str, dict[str, Any]] = dict(manifest.schema.get("fields") or {})
        table = f"{self._s}.{_q(manifest.source)}"
        started = datetime.fromisoformat(manifest.started_at)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-table:{table}")
            cols = "".join(f",\n    {_q(n)} {PG_TYPES[spec['type']]}" for n, spec in declared.items())
            await (
                conn.execute(f"""
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
                ) WITH (fillfactor = 90)""")
            )  # room on each page: a row whose content is unchanged is updated in place (HOT)
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
            latest = await conn.fetchrow(
                f"SELECT version, declared, run_started_at FROM {self._s}._schemas"
                " WHERE source = $1 ORDER BY version DESC LIMIT 1",
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
                    await conn.execute(f"ALTER TABLE {table} ADD COLUMN {_q(name)} {PG_TYPES[kind]}")
                    moved, kept = await self._backfill(conn, table, name, spec)
                    change = f"added column {name} {kind}"
                    if moved or kept:
                        change += f" (back-filled {moved} row(s) from _extra"
                        change += f"; {kept} value(s) that do not fit stay in _extra)" if kept else ")"
                    changes.append(change)
                elif have != PG_TYPES[kind]:
                    if older or have not in _TRAWL_TYPES:
                        types[name] = _TRAWL_TYPES.get(have, kind)  # load old runs as the table is now
                    else:
                        retype.append((name, have, kind))
            if retype:
                await conn.execute(f"DROP VIEW IF EXISTS {_q(views_schema(self.schema))}.{_q(manifest.source)}")
                for name, have, kind in retype:
                    await self._retype(conn, table, manifest, name, have, kind)
                    changes.append(f"{name}: {_TRAWL_TYPES[have]} -> {kind}")
            previous = orjson.loads(latest["declared"]) if latest is not None else None
            if changes or (not older and previous != dict(manifest.schema)):
                if previous is not None and not older:
                    gone = [f for f in previous.get("fields") or {} if f not in declared]
                    changes += [f"{f}: no longer declared (column kept, new values go to _extra)" for f in gone]
                    ruled = [
                        f
                        for f, spec in declared.items()
                        if f in previous.get("fields", {}) and previous["fields"][f] != spec
                    ]
                    changes += [f"{f}: rules changed" for f in ruled if not any(c.startswith(f"{f}:") for c in changes)]
                    if previous.get("key") != manifest.schema.get("key"):
                        changes.append(f"key: {previous.get('key')} -> {manifest.schema.get('key')}")
                version = (latest["version"] if latest is not None else 0) + 1
                await conn.execute(
                    f"INSERT INTO {self._s}._schemas (source, version, declared, changes, run_id, manifest,"
                    " run_started_at) VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)",
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
                await self._view(conn, manifest.source, list(declared))
        return types

    async def _backfill(
        self, conn: asyncpg.Connection, table: str, name: str, spec: Mapping[str, Any]
    ) -> tuple[int, int]:
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
                f"CREATE TEMP TABLE {tmp} ON COMMIT DROP AS SELECT _key, {_q(name)} AS v FROM {table} WITH NO DATA"
            )
            await conn.copy_records_to_table(tmp, records=good, columns=["_key", "v"])
            await conn.execute(
                f"""
                UPDATE {table} t SET {_q(name)} = b.v, _extra = NULLIF(t._extra - $1, '{{}}'::jsonb)
                FROM {tmp} b WHERE t._key = b._key""",
                name,
            )
            await conn.execute(f"DROP TABLE {tmp}")
        return len(good), len(rows) - len(good)

    async def _retype(self, conn: asyncpg.Connection, table: str, m: Manifest, name: str, have: str, kind: str) -> None:
        """Change a column's type if every value survives the cast and back; else LoadError (rolls back)."""
        col, new = _q(name), PG_TYPES[kind]
        refuse = f"{table}.{name} is {_TRAWL_TYPES[have]} ({have}) but source {m.source!r} now declares it {kind}"
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

    async def _view(self, conn: asyncpg.Connection, source: str, declared: list[str]) -> None:
        """The source's view: ``_key`` and the declared columns only, in declaration order."""
        view = f"{_q(views_schema(self.schema))}.{_q(source)}"
        cols = ", ".join(["_key", *(_q(n) for n in declared)])
        sql = f"CREATE OR REPLACE VIEW {view} AS SELECT {cols} FROM {self._s}.{_q(source)}"
        try:
            async with conn.transaction():
                await conn.execute(sql)
        except asyncpg.InvalidTableDefinitionError:  # a column left or moved: OR REPLACE only appends
            await conn.execute(f"DROP VIEW {view}")
            await conn.execute(sql)

    # -- loading ----------------------------------------------------------------------------------------

    async def load_manifest(self, manifest: Manifest, todo: set[str] | None = None) -> list[PartLoad]:
        """Load every part of one committed manifest that is not in the ledger yet."""
        if todo is None:
            todo = await self.pending([manifest])
        fields = await self.prepare(manifest)
        pending = [p for p in manifest.parts if p.uri in todo]
        ahead: dict[str, StagedPart | None] = {
            p.uri: (pending[i + 1] if i + 1 < len(pending) else None) for i, p in enumerate(pending)
        }
        results = []
        try:
            for part in manifest.parts:
                if part.uri not in todo:
                    results.append(PartLoad(part.uri, manifest.source, manifest.kind, part.rows, skipped=True))
                    continue
                results.append(await self.load_part(manifest, part, fields, ahead=ahead[part.uri]))
        finally:
            self._forget(manifest)
        await self.finish(manifest)
        return results

    async def prepare(self, manifest: Manifest) -> dict[str, str]:
        """Before a manifest's parts load: its table evolved to the declaration; returns field → type to load with."""
        if manifest.kind != "raw":
            return {}
        types = await self.ensure_table(manifest)
        self._validator(manifest, types)  # an unknown check fails here, before any part
        return types

    async def load_part(
        self, manifest: Manifest, part: StagedPart, fields: Mapping[str, str], *, ahead: StagedPart | bool | None = True
    ) -> PartLoad:
        """Load one part in one transaction with its ledger row (a part already in the ledger is skipped).

        Pipelined: while this part is copied and upserted, the next one (``ahead``:
        a part, None for none, True for the next in the manifest) is read, decoded
        and validated in a worker thread, ready for the next call.
        """
        if manifest.kind != "raw":
            return await self._load_outcomes(manifest, part)
        validator = self._validator(manifest, fields)
        job = self._ahead.pop(part.uri, None)
        if job is not None and job.get_loop() is not asyncio.get_running_loop():
            _drop(job)  # read ahead in another event loop (a task runner's): not awaitable here, start over
            job = None
        if job is None:
            job = self._start(manifest, part, validator)
        if ahead is True:
            following = manifest.parts[manifest.parts.index(part) + 1 :] if part in manifest.parts else ()
            ahead = following[0] if following else None
        if isinstance(ahead, StagedPart) and ahead.uri not in self._ahead:
            self._ahead[ahead.uri] = self._start(manifest, ahead, validator)
        try:
            return await self._load_records(manifest, await job, validator.types)
        except BaseException:
            self._forget(manifest)
            raise

    async def finish(self, manifest: Manifest) -> None:
        """After a manifest's parts load: the run's row in ``_runs``."""
        self._forget(manifest)
        await self._record_run(manifest)

    def _validator(self, manifest: Manifest, types: Mapping[str, str]) -> RecordValidator:
        validator = self._validators.get(manifest.uri)
        if validator is None:
            try:
                validator = RecordValidator(dict(manifest.schema.get("fields") or {}), types)
            except LoadError as exc:
                raise LoadError(f"source {manifest.source!r}: {exc}", staged_object=manifest.uri) from None
            self._validators[manifest.uri] = validator
        return validator

    def _start(self, m: Manifest, part: StagedPart, validator: RecordValidator) -> asyncio.Task[_Prepared]:
        async def run() -> _Prepared:
            lines = await self._read(part)
            return await asyncio.to_thread(_prepare, lines, m, part, validator, list(m.schema.get("key") or ["url"]))

        return asyncio.create_task(run(), name=f"trawl-prepare:{part.uri}")

    def _forget(self, m: Manifest) -> None:
        """Drop a manifest's read-ahead (after it finished or failed)."""
        self._validators.pop(m.uri, None)
        for p in m.parts:
            job = self._ahead.pop(p.uri, None)
            if job is not None:
                _drop(job)

    async def _read(self, part: StagedPart) -> list[bytes]:
        lines = [line async for line in self.stager.read_part(part)]
        if len(lines) != part.rows:
            raise StagingError(f"{part.uri}: has {len(lines)} lines but the manifest says {part.rows}")
        return lines

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

    async def _insert_rejects(self, conn: asyncpg.Connection, rejects: list[tuple[Any, ...]]) -> None:
        # Via a temp table so a part whose rejects were kept when it failed its threshold can load later.
        await conn.execute(
            f"CREATE TEMP TABLE _stage_rejects ON COMMIT DROP AS SELECT {', '.join(_REJECT_COLS)}"
            f" FROM {self._s}._rejects WITH NO DATA"
        )
        await conn.copy_records_to_table("_stage_rejects", records=rejects, columns=list(_REJECT_COLS))
        await conn.execute(
            f"INSERT INTO {self._s}._rejects ({', '.join(_REJECT_COLS)}) SELECT * FROM _stage_rejects"
            " ON CONFLICT (staged_object, line) DO NOTHING"
        )
        await conn.execute("DROP TABLE _stage_rejects")

    async def _check_reject_rate(self, conn: asyncpg.Connection, m: Manifest, prepared: _Prepared) -> None:
        """LoadError when the manifest's reject rate, counting this part, is over the limit."""
        if self.max_reject_rate is None:
            return
        done = await conn.fetchrow(
            f"SELECT count(*) AS parts, coalesce(sum(rows), 0) AS rows, coalesce(sum(rejected), 0) AS rejected"
            f" FROM {self._s}._loads WHERE staged_object = ANY($1)",
            [p.uri for p in m.parts],
        )
        rows = done["rows"] + prepared.rows
        rejected = done["rejected"] + len(prepared.rejects)
        last = done["parts"] + 1 == len(m.parts)
        if rows and (rows >= self.reject_min_rows or last) and rejected / rows > self.max_reject_rate:
            reasons: dict[str, int] = {}
            for r in prepared.rejects:
                for reason in r[4]:
                    reasons[reason] = reasons.get(reason, 0) + 1
            top = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
            raise TooManyRejects(
                f"source {m.source!r} run {m.run_id}: {rejected} of {rows} records rejected so far "
                f"({rejected / rows:.1%}), over TRAWL_MAX_REJECT_RATE={self.max_reject_rate:g}; nothing from "
                f"{prepared.part.uri} was loaded (it stays pending; its rejects are in {self.schema}._rejects). "
                f"Most common: {top}",
                staged_object=prepared.part.uri,
            )

    def _upsert_sql(self, table: str, stage: str, cols: Sequence[str]) -> str:
        """One statement: upsert the staged rows and write their lineage; returns (change, count) rows.

        On a key already there: same content hash → only ``_last_seen_at`` (and
        ``_first_seen_at``, for a run loaded late) move; a changed hash from a
        record at least as new → the row is rewritten; older → nothing. Which
        happened is read back from ``xmax`` (0: inserted) and ``_staged_object``
        (this part's: rewritten).
        """
        col_list = ", ".join(_q(c) for c in cols)
        keep = "t._content_hash = EXCLUDED._content_hash"
        sets = ", ".join(
            f"{_q(c)} = CASE WHEN {keep} THEN t.{_q(c)} ELSE EXCLUDED.{_q(c)} END" for c in cols if c != "_key"
        )
        return f"""
            WITH up AS (
                INSERT INTO {table} AS t ({col_list}, _first_seen_at, _last_seen_at)
                SELECT {col_list}, s._fetched_at, s._fetched_at FROM {stage} s
                ON CONFLICT (_key) DO UPDATE SET {sets},
                    _first_seen_at = LEAST(t._first_seen_at, EXCLUDED._first_seen_at),
                    _last_seen_at = GREATEST(t._last_seen_at, EXCLUDED._last_seen_at)
                WHERE {keep} OR EXCLUDED._fetched_at >= t._fetched_at
                RETURNING t._key, CASE WHEN t.xmax = 0 THEN 'inserted'
                    WHEN t._staged_object = $2 THEN 'updated' ELSE 'unchanged' END AS change
            ), lin AS (
                INSERT INTO {self._s}._lineage (source, key, run_id, url, fetched_at, change, staged_object)
                SELECT $1, s._key, s._run_id, s._url, s._fetched_at, coalesce(up.change, 'older'), s._staged_object
                FROM {stage} s LEFT JOIN up ON up._key = s._key
                RETURNING change
            )
            SELECT change, count(*) FROM lin GROUP BY change"""

    async def _load_records(self, m: Manifest, prepared: _Prepared, types: Mapping[str, str]) -> PartLoad:
        part = prepared.part
        table = f"{self._s}.{_q(m.source)}"
        cols = [*types, *_LINEAGE]
        col_list = ", ".join(_q(c) for c in cols)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if not await self._claim(conn, part):
                    return PartLoad(part.uri, m.source, m.kind, prepared.rows, skipped=True)
                await self._check_reject_rate(conn, m, prepared)
                # asyncpg caches a COPY's column types by statement text: a temp table name per column-type
                # signature keeps a cached binary codec from writing into a column whose type changed since.
                stage = "_stage_" + hashlib.sha1(repr(sorted(types.items())).encode()).hexdigest()[:16]
                await conn.execute(
                    f"CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {col_list} FROM {table} WITH NO DATA"
                )
                await conn.copy_records_to_table(stage, records=list(prepared.latest.values()), columns=cols)
                # Parts of one source loaded by concurrent loaders upsert one at a time: no deadlocks on shared keys.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-upsert:{table}")
                # The lineage join of the staged rows with the upsert's RETURNING has no statistics to go by:
                # a nested loop over it is quadratic, a hash join linear.
                # Its row estimates are wild too, which would switch on JIT (slower here) and small sorts.
                await conn.execute("SET LOCAL enable_nestloop = off; SET LOCAL jit = off; SET LOCAL work_mem = '64MB'")
                counts = dict(await conn.fetch(self._upsert_sql(table, stage, cols), m.source, part.uri))
                if prepared.rejects:
                    await self._insert_rejects(conn, prepared.rejects)
                res = PartLoad(
                    part.uri,
                    m.source,
                    m.kind,
                    prepared.rows,
                    counts.get("inserted", 0),
                    counts.get("updated", 0),
                    counts.get("unchanged", 0) + counts.get("older", 0),
                    len(prepared.rejects),
                )
                await self._ledger(conn, m, part, res)
        except TooManyRejects:
            async with self.pool.acquire() as conn, conn.transaction():
                await self._insert_rejects(conn, prepared.rejects)
            raise
        log.info(
            "part loaded",
            source=m.source,
            staged_object=part.uri,
            rows=res.rows,
            inserted=res.inserted,
            updated=res.updated,
            unchanged=res.unchanged,
            rejected=res.rejected,
        )
        return res

    async def _load_outcomes(self, m: Manifest, part: StagedPart) -> PartLoad:
        latest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        rows = 0
        for n, line in enumerate(await self._read(part), 1):
            env = _decode(line, part, n)
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


def _drop(job: asyncio.Task[_Prepared]) -> None:
    """Cancel a read-ahead nobody will await, from whichever loop (or thread) we are in."""
    # Its failure, if it failed, is reported when its part is loaded; never as "exception never retrieved".
    job.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if job.get_loop() is running:
        job.cancel()
    else:
        with contextlib.suppress(RuntimeError):  # its loop is closed: nothing left to cancel
            job.get_loop().call_soon_threadsafe(job.cancel)


def _decode(line: bytes, part: StagedPart, n: int) -> dict[str, Any]:
    try:
        env = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise StagingError(f"{part.uri}: line {n} is not JSON: {exc}") from None
    if not isinstance(env, dict):
        raise StagingError(f"{part.uri}: line {n} is not a JSON object")
    return env


def _prepare(
    lines: list[bytes], m: Manifest, part: StagedPart, validator: RecordValidator, key_names: list[str]
) -> _Prepared:
    """Decode, validate and deduplicate one part (CPU only: runs in a worker thread)."""
    prepared = _Prepared(part, len(lines))
    latest = prepared.latest
    declared = validator.types
    missing_key = "key: missing (" + ", ".join(key_names) + ")"
    for n, line in enumerate(lines, 1):
        env = _decode(line, part, n)
        data = env.get("data")
        if not isinstance(data, dict):
            data = {}
        values, reasons = validator(data)
        key = env.get("key")
        if key is None or key == "":
            reasons.append(missing_key)
        elif "\x00" in str(key):
            reasons.append("key: contains a NUL character")
        try:
            fetched = datetime.fromisoformat(env["fetched_at"])
            url, content_hash = env["url"], env["content_hash"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StagingError(f"{part.uri}: line {n} is not a record envelope: {exc!r}") from None
        if reasons:
            prepared.rejects.append(
                (m.run_id, m.source, no_nul(key), no_nul(url), no_nul(reasons), jsonb(env), part.uri, n)
            )
            continue
        key = str(key)
        extra = None if declared.keys() >= data.keys() else {k: v for k, v in data.items() if k not in declared}
        prev = latest.get(key)
        if prev is None or fetched >= prev[-2]:  # the latest fetched_at wins within the part
            latest[key] = (
                *values,
                key,
                jsonb(extra) if extra else None,
                url,
                content_hash,
                env.get("run_id") or m.run_id,
                fetched,
                part.uri,
            )
    return prepared


async def lineage(pool: asyncpg.Pool, schema: str, source: str, key: str) -> list[asyncpg.Record]:
    """Every load that touched one row, oldest first: run, URL, fetched time, staged object, load time, change.

    ``change`` is ``inserted``, ``updated`` (content changed), ``unchanged`` (only
    ``_last_seen_at`` moved), ``older`` (a newer version was already loaded) or
    ``rejected`` (with the reasons; the row was not touched).
    """
    s = _q(schema)
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{schema}._lineage"):
            return []
        return list(
            await conn.fetch(
                f"""
                SELECT l.run_id, l.url, l.fetched_at, l.staged_object, d.loaded_at, l.change, NULL::text[] AS reasons
                FROM {s}._lineage l LEFT JOIN {s}._loads d ON d.staged_object = l.staged_object
                WHERE l.source = $1 AND l.key = $2
                UNION ALL
                SELECT r.run_id, r.url, (r.record->>'fetched_at')::timestamptz, r.staged_object, r.rejected_at,
                       'rejected', r.reasons
                FROM {s}._rejects r WHERE r.source = $1 AND r.key = $2
                ORDER BY fetched_at, loaded_at""",
                source,
                key,
            )
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
