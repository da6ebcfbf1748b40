"""The part transaction and the ledger: one staged part into PostgreSQL, all or nothing, exactly once.

Per records part, in one transaction: an advisory lock on the part and a ledger
check (a part already in ``_loads`` is skipped), the reject-rate gate, then,
under the source table's lock, the part's keys, content hashes and fetch times
(COPY text the decoding process wrote) into a temp table and compared with the
table in one statement that also writes every record's narrow ``_lineage`` row:
keys not there are COPYed straight into the table, changed rows (at least as
new as the table's) are COPYed to a temp table and updated from it, unchanged
ones touch nothing; the rejects and the ledger row commit with them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from sinks.postgres._ddl import literal, q, row_columns
from sinks.postgres._prepare import COPY_CSV, Prepared, copy_rows, decode_envelope
from trawl.errors import TooManyRejects
from trawl.staging import Manifest, StagedPart

__all__ = [
    "PartLoad",
    "claim",
    "insert_rejects",
    "ledger",
    "new_load",
    "record_run",
    "write_outcomes",
    "write_records",
]

_REJECT_COLS = ("run_id", "source", "key", "url", "reasons", "record", "staged_object", "line")
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
    "lastmod",
    "proxy",
)
# What comparing a staged record with the table's row for its key found.
_NEW, _CHANGED, _FIRST, _OLDER, _SAME = 0, 1, 2, 3, 4
# The prepared records' keys as the decoding process writes them (COPY text format), in key order.
_COMPARE_COLS = ["i", "k", "h", "f", "line"]
_COMPARE_DDL = "i int4, k text, h text, f timestamptz, line int4"


@dataclass(frozen=True, slots=True)
class PartLoad:
    """What loading one part did (``skipped``: it was already in the ledger).

    ``phases`` is where the loader's time went, in seconds (``read``,
    ``decode`` off the event loop, ``compare``, ``copy``, ``update``,
    ``lineage``, ``commit`` in the part's transaction).
    """

    staged_object: str
    source: str
    kind: str
    rows: int
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    skipped: bool = False
    phases: Mapping[str, float] = field(default_factory=dict, compare=False)


async def claim(conn: asyncpg.Connection, s: str, part: StagedPart) -> bool:
    """Lock the part for this transaction; False if another load already committed it."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", part.uri)
    done = await conn.fetchval(f"SELECT 1 FROM {s}._loads WHERE staged_object = $1", part.uri)
    return done is None


async def new_load(conn: asyncpg.Connection, s: str) -> tuple[int, datetime]:
    """The ledger id this part's rows will point at (its ``_loads`` row is written last) and the load time."""
    row = await conn.fetchrow(f"SELECT nextval(pg_get_serial_sequence({literal(s + '._loads')}, 'load_id')), now()")
    return row[0], row[1]


async def ledger(
    conn: asyncpg.Connection,
    s: str,
    m: Manifest,
    part: StagedPart,
    res: PartLoad,
    load_id: int,
    seen_at: datetime | None,
) -> None:
    await conn.execute(
        f"INSERT INTO {s}._loads (load_id, staged_object, sha256, run_id, source, kind, rows, inserted, updated,"
        " unchanged, rejected, seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        load_id,
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
        seen_at,
    )


async def insert_rejects(conn: asyncpg.Connection, s: str, rejects: list[tuple[Any, ...]]) -> None:
    # Via a temp table so a part whose rejects were kept when it failed its threshold can load later.
    await conn.execute(
        f"CREATE TEMP TABLE _stage_rejects ON COMMIT DROP AS SELECT {', '.join(_REJECT_COLS)}"
        f" FROM {s}._rejects WITH NO DATA"
    )
    await conn.copy_records_to_table("_stage_rejects", records=rejects, columns=list(_REJECT_COLS))
    await conn.execute(
        f"INSERT INTO {s}._rejects ({', '.join(_REJECT_COLS)}) SELECT * FROM _stage_rejects"
        " ON CONFLICT (staged_object, line) DO NOTHING"
    )
    await conn.execute("DROP TABLE _stage_rejects")


async def check_reject_rate(
    conn: asyncpg.Connection,
    s: str,
    schema: str,
    m: Manifest,
    prepared: Prepared,
    max_rate: float | None,
    min_rows: int,
) -> None:
    """TooManyRejects when the manifest's reject rate, counting this part, is over the limit."""
    if max_rate is None:
        return
    done = await conn.fetchrow(
        f"SELECT count(*) AS parts, coalesce(sum(rows), 0) AS rows, coalesce(sum(rejected), 0) AS rejected"
        f" FROM {s}._loads WHERE staged_object = ANY($1)",
        [p.uri for p in m.parts],
    )
    rows = done["rows"] + prepared.rows
    rejected = done["rejected"] + len(prepared.rejects)
    last = done["parts"] + 1 == len(m.parts)
    if rows and (rows >= min_rows or last) and rejected / rows > max_rate:
        reasons: dict[str, int] = {}
        for r in prepared.rejects:
            for reason in r[4]:
                reasons[reason] = reasons.get(reason, 0) + 1
        top = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:3])
        raise TooManyRejects(
            f"source {m.source!r} run {m.run_id}: {rejected} of {rows} records rejected so far "
            f"({rejected / rows:.1%}), over TRAWL_MAX_REJECT_RATE={max_rate:g}; nothing from "
            f"{prepared.part.uri} was loaded (it stays pending; its rejects are in {schema}._rejects). "
            f"Most common: {top}",
            staged_object=prepared.part.uri,
        )


async def write_records(
    conn: asyncpg.Connection,
    schema: str,
    m: Manifest,
    prepared: Prepared,
    types: Mapping[str, str],
    load_id: int,
    now: datetime,
) -> tuple[PartLoad, dict[str, float]]:
    """The part's rows into the source table and ``_lineage`` (inside the caller's transaction, after the claim).

    The prepared records' keys, hashes and fetch times are COPYed (bytes the
    decoding process wrote) into a temp table; one statement compares them with
    the table through its primary key, writes every record's lineage row and
    returns which records are new, changed, or seen earlier than known. Those
    rows are streamed from the rows file the decoding process wrote, as they
    are (CSV), into the table or the changed rows' temp table.
    """
    s = q(schema)
    table = f"{s}.{q(m.source)}"
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    # Parts of one source are compared and written one at a time: what the comparison saw stays true until
    # commit, and concurrent loaders never deadlock on shared keys.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"trawl-upsert:{table}")
    # A part is a small share of the table: probe its keys (sorted) through the primary key, never scan the
    # table (the planner, with no statistics on the temp table, picks a hash join over it). Naive fetch
    # times mean UTC, as everywhere in trawl.
    await conn.execute(
        "SET LOCAL jit = off; SET LOCAL work_mem = '64MB'; SET LOCAL enable_hashjoin = off;"
        " SET LOCAL enable_mergejoin = off; SET LOCAL TimeZone = 'UTC';"
        f" CREATE TEMP TABLE _compare ({_COMPARE_DDL}) ON COMMIT DROP"
    )
    if prepared.loaded:
        await conn.copy_to_table("_compare", source=prepared.compare_path, columns=_COMPARE_COLS)
    t1 = time.perf_counter()
    phases["copy_compare"] = t1 - t0
    # One row of three int arrays back, not a row per record; the lineage rows never leave PostgreSQL.
    new, changed, first = await conn.fetchrow(
        f"""
        WITH c AS MATERIALIZED (
            SELECT s.i, s.k, s.line,
                   CASE WHEN t._key IS NULL THEN {_NEW}
                        WHEN t._content_hash = s.h THEN CASE WHEN s.f < t._first_seen_at THEN {_FIRST} ELSE {_SAME} END
                        WHEN s.f >= t._fetched_at THEN {_CHANGED} ELSE {_OLDER} END AS c
            FROM _compare s LEFT JOIN {table} t ON t._key = s.k
        ), lineage AS (
            INSERT INTO {s}._lineage (load_id, key, line, change)
            SELECT $1::bigint, k, line, (ARRAY['inserted', 'updated', 'unchanged', 'older', 'unchanged'])[c + 1]
            FROM c
        )
        SELECT coalesce(array_agg(i ORDER BY i) FILTER (WHERE c = {_NEW}), '{{}}'),
               coalesce(array_agg(i ORDER BY i) FILTER (WHERE c = {_CHANGED}), '{{}}'),
               coalesce(array_agg(i ORDER BY i) FILTER (WHERE c = {_FIRST}), '{{}}')
        FROM c""",
        load_id,
    )
    t2 = time.perf_counter()
    phases["compare"] = t2 - t1
    cols = row_columns(types)
    if new:
        # The rows as the decoding process wrote them, this transaction's time and load id added to each.
        tail = f'"{now.isoformat()}",{load_id}'.encode()
        which = None if len(new) == prepared.loaded else new
        await conn.copy_to_table(
            m.source, schema_name=schema, columns=cols, source=copy_rows(prepared, which, tail), **COPY_CSV
        )
    t3 = time.perf_counter()
    phases["copy"] = t3 - t2
    if changed:
        staged = cols[:-2]  # declared fields, _key, _extra, _url, _content_hash, _fetched_at, _first_seen_at
        # asyncpg caches a COPY's column types by statement text: a temp table name per column-type
        # signature keeps a cached binary codec from writing into a column whose type changed since.
        stage = "_changed_" + hashlib.sha1(repr(sorted(types.items())).encode()).hexdigest()[:16]
        await conn.execute(
            f"CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {', '.join(q(c) for c in staged)}"
            f" FROM {table} WITH NO DATA"
        )
        await conn.copy_to_table(stage, columns=staged, source=copy_rows(prepared, changed), **COPY_CSV)
        sets = [q(c) for c in staged[:-1] if c != "_key"]  # _first_seen_at stays
        await conn.execute(f"ANALYZE {stage}")
        await conn.execute(
            f"UPDATE {table} t SET ({', '.join(sets)}, _changed_at, _load_id) = ({', '.join(f's.{c}' for c in sets)},"
            f" now(), $1::bigint) FROM {stage} s WHERE t._key = s._key",
            load_id,
        )
    if first:  # an older run loaded late: the row was there earlier than we knew
        await conn.execute(
            f"UPDATE {table} t SET _first_seen_at = s.f FROM _compare s"
            " WHERE s.i = ANY($1::int4[]) AND t._key = s.k AND s.f < t._first_seen_at",
            first,
        )
    phases["update"] = time.perf_counter() - t3
    res = PartLoad(
        prepared.part.uri,
        m.source,
        m.kind,
        prepared.rows,
        len(new),
        len(changed),
        prepared.loaded - len(new) - len(changed),
        len(prepared.rejects),
    )
    return res, phases


async def write_outcomes(
    conn: asyncpg.Connection, schema: str, m: Manifest, part: StagedPart, lines: list[bytes], load_id: int
) -> tuple[PartLoad, datetime | None]:
    """An outcomes part: one ``_outcomes`` row per URL (latest answer wins); a not-modified answer is a sighting."""
    s = q(schema)
    latest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for n, line in enumerate(lines, 1):
        env = decode_envelope(line, part, n)
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
                env.get("lastmod"),
                env.get("proxy"),
                n,
            )
    cols = ", ".join(_OUTCOME_COLS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _OUTCOME_COLS[3:])
    await conn.execute(
        f"CREATE TEMP TABLE _stage ON COMMIT DROP AS SELECT {cols}, 0 AS line FROM {s}._outcomes WITH NO DATA"
    )
    await conn.copy_records_to_table("_stage", records=list(latest.values()), columns=[*_OUTCOME_COLS, "line"])
    flags = await conn.fetch(f"""
        INSERT INTO {s}._outcomes AS t ({cols}) SELECT {cols} FROM _stage
        ON CONFLICT (run_id, source, url) DO UPDATE SET {updates} WHERE EXCLUDED.at >= t.at
        RETURNING (xmax = 0) AS inserted""")
    inserted = sum(1 for f in flags if f["inserted"])
    if await conn.fetchval("SELECT to_regclass($1)", f"{s}.{q(m.source)}"):
        # Not modified since an earlier run: the row is still current, so it was seen now.
        await conn.execute(
            f"""
            INSERT INTO {s}._lineage (load_id, key, line, change)
            SELECT $1::bigint, t._key, s.line, 'unchanged' FROM _stage s JOIN {s}.{q(m.source)} t ON t._url = s.url
            WHERE s.outcome = 'not_modified'""",
            load_id,
        )
    res = PartLoad(part.uri, m.source, m.kind, len(lines), inserted, len(flags) - inserted, len(latest) - len(flags))
    return res, max((v[9] for v in latest.values()), default=None)


async def record_run(conn: asyncpg.Connection, s: str, m: Manifest) -> None:
    """Merge this source's manifest into its run's row in ``_runs``."""
    entry = orjson.dumps({m.source: {"status": m.status, "error": m.error, **m.stats}}).decode()
    await conn.execute(
        f"""
        INSERT INTO {s}._runs AS r (run_id, flow_run_id, started_at, finished_at, status, sources)
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
