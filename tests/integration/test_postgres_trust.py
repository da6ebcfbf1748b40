"""Loading you can trust, against a real PostgreSQL: field rules, reject threshold, dedup across parts,
schema evolution with back-fill and versions, views, lineage, kill -9 and concurrent loader processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sinks.postgres import Loader
from sinks.stage import LocalStager
from sinks.validate import register_check
from tests.helpers.databases import fresh_database
from tests.helpers.loading import part_totals, table_rows
from trawl.cli import main as trawl_main
from trawl.database import connect_pool
from trawl.errors import LoadError, StagingError
from trawl.records import Outcome, OutcomeKind, Record
from trawl.staging import Manifest

pytestmark = pytest.mark.integration

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
CHILD = Path(__file__).with_name("loader_child.py")


def schema(**fields: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, dict[str, Any]] = {"id": {"type": "int", "required": True}, "name": {"type": "text"}}
    return {"key": ["id"], "fields": {**base, **fields}}


def rec(key: str | None, data: dict[str, Any], *, run_id: str, at: datetime, source: str = "items") -> Record:
    return Record(source=source, key=key, url=f"https://shop.test/{key}", fetched_at=at, run_id=run_id, data=data)


async def stage(
    stager: LocalStager,
    run_id: str,
    records: Sequence[Record],
    decl: dict[str, Any],
    *,
    started: datetime = T0,
    source: str = "items",
    outcomes: Sequence[Outcome] = (),
) -> Manifest:
    s = stager.open_source(source, run_id, started)
    for r in records:
        await s.records.write(r.envelope())
    for o in outcomes:
        await s.outcomes.write(o.envelope())
    _, raw = await s.commit(status="complete", schema=decl, stats={"records": len(records)})
    return raw


@pytest.fixture
def stager(tmp_path: Path) -> LocalStager:
    return LocalStager(tmp_path / "staging", part_max_records=4)


# -- validation -------------------------------------------------------------------------------------------


@register_check("even")
def _even(value: Any, data: Any) -> bool:
    return bool(value % 2 == 0)


@register_check("sku_starts_with_id")
def sku_check(value: Any, data: Any) -> str | None:
    """A check that reads another field of the record."""
    if not value.startswith(str(data.get("id"))):
        return f"sku {value!r} does not start with the id"
    return None


async def test_every_rule_is_enforced_and_every_reason_kept(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    decl = schema(
        price={"type": "float", "parse": "number", "min": 0, "max": 10000},
        qty={"type": "int", "parse": "number", "checks": ["even"]},
        plain={"type": "float"},
        sku={
            "type": "text",
            "pattern": r"^\d+-[A-Z]+$",
            "max_length": 8,
            "checks": ["sku_starts_with_id", "not_blank"],
        },
        colour={"type": "text", "choices": ["red", "blue"]},
        size={"type": "int", "choices": [1, 2, 3]},
    )
    good = {"id": 1, "price": "1,299.00", "qty": "1 000", "plain": "2.5", "sku": "1-AB", "colour": "red", "size": 2}
    records = [
        rec("1", good, run_id="r1", at=T0),
        rec("2", {**good, "id": 2, "price": "$ 12,5", "sku": "2-X", "qty": 4, "size": None}, run_id="r1", at=T0),
        rec(
            "3",
            {"id": 3, "price": "-5", "qty": "3", "plain": "1,5", "sku": "9-toolong", "colour": "green", "size": 7},
            run_id="r1",
            at=T0,
        ),
        rec("4", {**good, "id": 4, "price": "12 000,5", "qty": "2.5", "sku": "4-ABCDEFGH"}, run_id="r1", at=T0),
    ]
    raw = await stage(stager, "r1", records, decl)

    assert part_totals(await loader.load_manifest(raw)) == (2, 0, 0, 2)

    got = await table_rows(db)
    assert (got["1"]["price"], got["1"]["qty"], got["1"]["plain"], got["1"]["sku"]) == (1299.0, 1000, 2.5, "1-AB")
    assert (got["2"]["price"], got["2"]["qty"], got["2"]["size"]) == (12.5, 4, None)
    rejects = {r["key"]: r for r in await db.fetch("SELECT * FROM trawl._rejects")}
    assert list(rejects["3"]["reasons"]) == [
        "price: -5 is less than min 0",
        "qty: fails check even",
        "plain: expected float, got '1,5'",  # no `parse: number`: a comma is not a decimal mark
        "sku: '9-toolong' does not match '^\\\\d+-[A-Z]+$'",
        "sku: 9 characters, more than max_length 8",
        "sku: sku '9-toolong' does not start with the id (check sku_starts_with_id)",
        "colour: 'green' is not one of ['red', 'blue']",
        "size: 7 is not one of [1, 2, 3]",
    ]
    assert list(rejects["4"]["reasons"]) == [
        "price: 12000.5 is more than max 10000",
        "qty: expected a whole number, got '2.5'",
        "sku: 10 characters, more than max_length 8",
    ]
    # The raw envelope, the staged object and the line it came from, for a reload after a fix.
    r3 = rejects["3"]
    assert orjson.loads(r3["record"]) == orjson.loads(orjson.dumps(records[2].envelope()))
    assert (r3["staged_object"], r3["line"], r3["url"], r3["run_id"]) == (raw.parts[0].uri, 3, records[2].url, "r1")


RAN: list[Any] = []
"""What ran that must not have: a check a manifest named by import path, or code it had exec'd."""


def side_effect(value: Any, data: Any) -> None:
    """Looks like a check, is importable, and is registered under no name: a manifest must not reach it."""
    RAN.append(value)


@pytest.mark.parametrize("check", ["builtins:exec", f"{__name__}:side_effect", "nope", "not_blank\n"])
async def test_a_manifest_naming_an_unregistered_check_fails_naming_the_manifest_and_runs_nothing(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection, check: str
) -> None:
    RAN.clear()
    # What `builtins:exec` would run on each value, were the name imported and called.
    code = f"__import__({__name__!r}, fromlist=['RAN']).RAN.append('exec')"
    records = [rec("1", {"id": 1, "name": code}, run_id="r1", at=T0)]
    raw = await stage(stager, "r1", records, schema(name={"type": "text", "checks": [check]}))
    with pytest.raises(LoadError) as info:
        await loader.load_manifest(raw)
    assert info.value.staged_object == raw.uri
    assert f"manifest {raw.uri}" in str(info.value)
    assert "field 'name'" in str(info.value) or "schema" in str(info.value)
    assert RAN == []
    # Refused before anything: no table created, nothing in the ledger.
    assert await db.fetchval("SELECT to_regclass('trawl.items')") is None
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 0


async def test_a_manifest_whose_declaration_the_sources_models_refuse_is_not_loaded(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    for run_id, bad, problem in [
        ("r1", {"key": ["id"], "fields": {"id": {"type": "money"}}}, "schema: fields.id.type: Input should be"),
        ("r2", {"key": ["id"], "fields": {"id": {"type": "int"}, "bad\n": {}}}, "field name(s) 'bad\\n' must match"),
        ("r3", {"key": ["id"], "fields": {"id": {"type": "int", "eval": "1"}}}, "Extra inputs are not permitted"),
    ]:
        raw = await stage(stager, run_id, [rec("1", {"id": 1}, run_id=run_id, at=T0)], bad)
        with pytest.raises(LoadError) as info:
            await loader.load_manifest(raw)
        assert str(info.value).startswith(f"manifest {raw.uri}: ")
        assert problem in str(info.value)
    assert await db.fetchval("SELECT to_regclass('trawl.items')") is None


# -- reject threshold -------------------------------------------------------------------------------------


async def test_a_broken_scrape_over_the_reject_rate_fails_instead_of_loading(
    pool: asyncpg.Pool, stager: LocalStager, db: asyncpg.Connection
) -> None:
    # 4 records a part; part 1 is clean, then the selector "broke": names go missing.
    decl = schema(name={"type": "text", "required": True})
    records = [rec(str(i), {"id": i, "name": f"n{i}"}, run_id="r1", at=T0) for i in range(4)]
    records += [rec(str(i), {"id": i, "name": None if i % 4 else "ok"}, run_id="r1", at=T0) for i in range(4, 12)]
    raw = await stage(stager, "r1", records, decl)
    strict = Loader(pool, stager, max_reject_rate=0.2, reject_min_rows=6)
    await strict.setup()

    with pytest.raises(LoadError) as info:
        await strict.load_manifest(raw)

    # Part 1 (4 rows, 0 rejects) is under min rows; part 2 makes 3 of 8 = 37.5%: refused, rolled back.
    assert str(info.value).startswith(
        "source 'items' run r1: 3 of 8 records rejected so far (37.5%), over TRAWL_MAX_REJECT_RATE=0.2; "
        f"nothing from {raw.parts[1].uri} was loaded (it stays pending; its rejects are in trawl._rejects). "
        "Most common: 3x name: required but missing"
    )
    assert info.value.staged_object == raw.parts[1].uri
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 4
    assert [r[0] for r in await db.fetch("SELECT staged_object FROM trawl._loads")] == [raw.parts[0].uri]
    # The rejects of the refused part are kept for the diagnosis...
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects WHERE staged_object = $1", raw.parts[1].uri) == 3

    # ...and loading it anyway later (limit lifted) neither loses nor duplicates anything.
    lenient = Loader(pool, stager)
    results = await lenient.load_manifest(raw)
    assert [r.skipped for r in results] == [True, False, False]
    assert part_totals(results) == (2, 0, 0, 6)
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 6
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 6


async def test_a_small_run_is_checked_at_its_last_part(
    pool: asyncpg.Pool, stager: LocalStager, db: asyncpg.Connection
) -> None:
    raw = await stage(stager, "r1", [rec(None, {"id": 1}, run_id="r1", at=T0)], schema())
    strict = Loader(pool, stager, max_reject_rate=0.5, reject_min_rows=100)
    await strict.setup()
    with pytest.raises(LoadError, match=r"1 of 1 records rejected so far \(100.0%\)"):
        await strict.load_manifest(raw)
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 0


# -- dedup across parts, lineage --------------------------------------------------------------------------


async def test_latest_fetched_at_wins_across_parts_of_a_run(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    late, early = T0 + timedelta(minutes=5), T0
    records = [
        rec("1", {"id": 1, "name": "late"}, run_id="r1", at=late),
        *(rec(str(i), {"id": i}, run_id="r1", at=T0) for i in (2, 3, 4)),
        rec("1", {"id": 1, "name": "early"}, run_id="r1", at=early),  # part 2, staged later, fetched earlier
    ]
    raw = await stage(stager, "r1", records, schema())
    assert [p.rows for p in raw.parts] == [4, 1]

    results = await loader.load_manifest(raw)

    assert [(r.inserted, r.updated, r.unchanged) for r in results] == [(4, 0, 0), (0, 0, 1)]
    row = (await table_rows(db))["1"]
    assert (row["name"], row["_fetched_at"], row["_staged_object"]) == ("late", late, raw.parts[0].uri)
    changes = await db.fetch(
        "SELECT l.change, d.staged_object FROM trawl._lineage l JOIN trawl._loads d ON d.load_id = l.load_id"
        " WHERE l.key = '1' ORDER BY d.seen_at"
    )
    assert [tuple(c) for c in changes] == [("older", raw.parts[1].uri), ("inserted", raw.parts[0].uri)]


async def test_lineage_cli_prints_every_run_that_touched_a_row(
    loader: Loader, stager: LocalStager, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        ("r1", T0, {"id": 7, "name": "a"}),
        ("r2", T0 + timedelta(days=1), {"id": 7, "name": "a"}),
        ("r3", T0 + timedelta(days=2), {"id": 7, "name": "b"}),
        ("r4", T0 + timedelta(days=3), {"id": "seven", "name": "c"}),
    ]
    manifests = []
    for run_id, at, data in runs:
        manifests.append(await stage(stager, run_id, [rec("7", data, run_id=run_id, at=at)], schema(), started=at))
        await loader.load_manifest(manifests[-1])

    capsys.readouterr()  # the loads' log lines
    code = await asyncio.to_thread(trawl_main, ["lineage", "items", "7", "--database-url", database_url])

    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "version",
        "run_id",
        "url",
        "fetched_at",
        "staged_object",
        "loaded_at",
        "change",
        "warc",
        "offset",
    ]
    # The version first (rows that wrote the content count), the archived response (none here) last.
    body = [line.split(maxsplit=6) for line in lines[1:]]
    assert [b[0] for b in body] == ["1", "-", "2", "-"]
    assert [(b[1], b[2], b[3], b[4]) for b in body] == [
        (run_id, "https://shop.test/7", at.isoformat(), m.parts[0].uri)
        for (run_id, at, _), m in zip(runs, manifests, strict=True)
    ]
    assert [b[6].rsplit(maxsplit=2) for b in body] == [
        ["inserted", "-", "-"],
        ["unchanged", "-", "-"],
        ["updated", "-", "-"],
        ["rejected: id: expected int, got 'seven'", "-", "-"],
    ]
    assert all(b[5] != "-" for b in body)  # load time known for each

    code = await asyncio.to_thread(trawl_main, ["lineage", "items", "nope", "--database-url", database_url])
    assert code == 1
    assert "no loads touched trawl.items key 'nope'" in capsys.readouterr().err


# -- schema evolution -------------------------------------------------------------------------------------


async def test_a_field_added_mid_history_is_back_filled_from_extra(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    old = [
        rec("1", {"id": 1, "rating": "4.5"}, run_id="r1", at=T0),
        rec("2", {"id": 2, "rating": 3, "note": "x"}, run_id="r1", at=T0),
        rec("3", {"id": 3, "rating": "n/a"}, run_id="r1", at=T0),  # cannot be a float: stays in _extra
        rec("4", {"id": 4}, run_id="r1", at=T0),
    ]
    await loader.load_manifest(await stage(stager, "r1", old, schema()))
    t2 = T0 + timedelta(days=1)
    wider = schema(rating={"type": "float"})
    run2 = await stage(stager, "r2", [rec("5", {"id": 5, "rating": 1}, run_id="r2", at=t2)], wider, started=t2)

    assert part_totals(await loader.load_manifest(run2)) == (1, 0, 0, 0)

    got = await table_rows(db)
    assert {k: r["rating"] for k, r in got.items()} == {"1": 4.5, "2": 3.0, "3": None, "4": None, "5": 1.0}
    assert got["1"]["_extra"] is None
    assert orjson.loads(got["2"]["_extra"]) == {"note": "x"}
    assert orjson.loads(got["3"]["_extra"]) == {"rating": "n/a"}  # never silently dropped
    versions = await db.fetch("SELECT version, declared, changes, run_id FROM trawl._schemas ORDER BY version")
    assert [(v["version"], list(v["changes"]), v["run_id"]) for v in versions] == [
        (1, ["created"], "r1"),
        (
            2,
            ["added column rating float (back-filled 2 row(s) from _extra; 1 value(s) that do not fit stay in _extra)"],
            "r2",
        ),
    ]
    assert orjson.loads(versions[1]["declared"]) == wider
    # Loading the same manifests again adds no version.
    await loader.load_manifest(run2)
    assert await db.fetchval("SELECT count(*) FROM trawl._schemas") == 2


async def test_a_lossless_type_change_is_applied_and_recorded(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    await loader.load_manifest(
        await stage(stager, "r1", [rec("1", {"id": 1, "qty": 3}, run_id="r1", at=T0)], schema(qty={"type": "int"}))
    )
    t2 = T0 + timedelta(days=1)
    decl = schema(qty={"type": "float"})
    run2 = await stage(stager, "r2", [rec("2", {"id": 2, "qty": 2.5}, run_id="r2", at=t2)], decl, started=t2)

    await loader.load_manifest(run2)

    assert (
        await db.fetchval(
            "SELECT data_type FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'qty'"
        )
        == "double precision"
    )
    assert {k: r["qty"] for k, r in (await table_rows(db)).items()} == {"1": 3.0, "2": 2.5}
    assert list(await db.fetchval("SELECT changes FROM trawl._schemas WHERE version = 2")) == ["qty: int -> float"]
    # An older run loaded late does not move the type back: its ints load into the float column.
    late = await stage(
        stager,
        "r0",
        [rec("3", {"id": 3, "qty": 4}, run_id="r0", at=T0)],
        schema(qty={"type": "int"}),
        started=T0 - timedelta(days=1),
    )
    await loader.load_manifest(late)
    assert (await table_rows(db))["3"]["qty"] == 4.0
    assert await db.fetchval("SELECT count(*) FROM trawl._schemas") == 2


async def test_an_impossible_type_change_is_refused_with_the_table_untouched(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    first = [rec(str(i), {"id": i, "code": c}, run_id="r1", at=T0) for i, c in enumerate(["007", "12", "x"])]
    await loader.load_manifest(await stage(stager, "r1", first, schema(code={"type": "text"})))

    async def state() -> list[Any]:
        return [
            [tuple(r) for r in await db.fetch("SELECT * FROM trawl.items ORDER BY _key")],
            [tuple(r) for r in await db.fetch("SELECT * FROM trawl._schemas")],
            [
                tuple(r)
                for r in await db.fetch(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'items' ORDER BY 1"
                )
            ],
            await db.fetchval("SELECT count(*) FROM trawl._loads"),
        ]

    before = await state()
    t2 = T0 + timedelta(days=1)
    # text -> int: 'x' cannot be cast at all.
    run2 = await stage(
        stager,
        "r2",
        [rec("9", {"id": 9, "code": 9, "more": 1}, run_id="r2", at=t2)],
        schema(code={"type": "int"}, more={"type": "int"}),
        started=t2,
    )
    with pytest.raises(
        LoadError,
        match=r'"trawl"."items".code is text \(text\) but source \'items\' now declares it int, and PostgreSQL cannot cast the stored values: invalid input syntax for type bigint: "x"',
    ):
        await loader.load_manifest(run2)
    assert await state() == before

    # After fixing 'x', '007' would still come back as '7': refused as lossy, naming a row.
    await db.execute("DELETE FROM trawl.items WHERE code = 'x'")
    before = await state()
    with pytest.raises(LoadError, match=r"1 stored value\(s\) would not survive the cast \(e.g. _key '0': 007\)"):
        await loader.load_manifest(run2)
    assert await state() == before


async def test_the_view_shows_only_declared_columns(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    decl1 = schema(colour={"type": "text"}, size={"type": "int"})
    await loader.load_manifest(
        await stage(stager, "r1", [rec("1", {"id": 1, "colour": "red", "size": 2, "x": 1}, run_id="r1", at=T0)], decl1)
    )

    async def view_columns() -> list[str]:
        return [
            r[0]
            for r in await db.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'trawl_views'"
                " AND table_name = 'items' ORDER BY ordinal_position"
            )
        ]

    assert await view_columns() == ["_key", "id", "name", "colour", "size", "_last_seen_at"]
    assert tuple(await db.fetchrow("SELECT * FROM trawl_views.items")) == ("1", 1, None, "red", 2, T0)
    t2 = T0 + timedelta(days=1)
    decl2 = schema(size={"type": "int"}, weight={"type": "float"})  # colour no longer declared
    await loader.load_manifest(
        await stage(
            stager, "r2", [rec("2", {"id": 2, "colour": "blue", "weight": 1.5}, run_id="r2", at=t2)], decl2, started=t2
        )
    )

    assert await view_columns() == ["_key", "id", "name", "size", "weight", "_last_seen_at"]
    got = await table_rows(db)
    assert got["1"]["colour"] == "red"  # the column stays in the table
    assert orjson.loads(got["2"]["_extra"]) == {"colour": "blue"}  # undeclared now: kept in _extra
    changes = await db.fetchval("SELECT changes FROM trawl._schemas WHERE version = 2")
    assert list(changes) == [
        "added column weight float",
        "colour: no longer declared (column kept, new values go to _extra)",
    ]


# -- exactly once across processes ------------------------------------------------------------------------


@pytest.fixture
async def reference_url(pg_server_dsn: str) -> AsyncIterator[str]:
    """A second fresh database: the uninterrupted load to compare with."""
    async with fresh_database(pg_server_dsn, "trawl_ref") as url:
        yield url


async def _history(stager: LocalStager) -> None:
    """Three runs with inserts, changes, duplicates, rejects and outcomes: 4 records a part."""
    for n in range(3):
        at = T0 + timedelta(days=n)
        records = [
            rec(str(i), {"id": i, "name": f"v{(i + n) // 3}", "extra": n}, run_id=f"r{n}", at=at + timedelta(seconds=i))
            for i in range(n * 5, n * 5 + 14)
        ]
        records += [
            rec(str(n * 5), {"id": n * 5, "name": "dup"}, run_id=f"r{n}", at=at),
            rec(None, {"id": 1}, run_id=f"r{n}", at=at),
        ]
        outcomes = [Outcome(f"r{n}", "items", r.url, OutcomeKind.FETCHED, 200, 1, 10, 1, at=at) for r in records[:6]]
        await stage(stager, f"r{n}", records, schema(), started=at, outcomes=outcomes)


async def _snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table the loader writes, minus the wall-clock columns."""
    conn = await asyncpg.connect(dsn)
    try:
        queries = {
            # The rows, with the load that wrote them named by its staged object (load ids are a sequence's:
            # a killed transaction leaves a gap) and without the wall-clock _changed_at.
            "items": "SELECT (to_jsonb(t) - '_changed_at' - '_load_id')::text, d.staged_object FROM trawl.items t"
            " JOIN trawl._loads d ON d.load_id = t._load_id",
            "loads": "SELECT staged_object, sha256, run_id, source, kind, rows, inserted, updated, unchanged,"
            " rejected FROM trawl._loads",
            "rejects": "SELECT run_id, source, key, url, reasons, record, staged_object, line FROM trawl._rejects",
            "lineage": "SELECT d.staged_object, l.key, l.line, l.change FROM trawl._lineage l"
            " JOIN trawl._loads d ON d.load_id = l.load_id",
            "outcomes": "SELECT * FROM trawl._outcomes",
            "runs": "SELECT run_id, status, sources FROM trawl._runs",
            "schemas": "SELECT source, version, declared, changes, run_id FROM trawl._schemas",
        }
        return {name: sorted(tuple(r) for r in await conn.fetch(q)) for name, q in queries.items()}
    finally:
        await conn.close()


def _parts(out: bytes, *, skipped: bool = False) -> list[str]:
    """The parts a child reports (its log lines share stdout)."""
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith(b'{"part"')]
    return [line["part"] for line in lines if line["skipped"] is skipped]


def _child(dsn: str, staging: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), dsn, str(staging)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def _wait_for(conn: asyncpg.Connection, sql: str, *args: Any) -> Any:
    for _ in range(3000):
        value = await conn.fetchval(sql, *args)
        if value:
            return value
        await asyncio.sleep(0.01)
    activity = [
        dict(r)
        for r in await conn.fetch(
            "SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity WHERE datname = current_database()"
        )
    ]
    locks = [
        dict(r)
        for r in await conn.fetch(
            "SELECT pid, locktype, relation::regclass::text AS rel, mode, granted FROM pg_locks WHERE locktype <> 'virtualxid'"
        )
    ]
    raise AssertionError(f"never true: {sql}; activity: {activity}; locks: {locks}")


@pytest.mark.slow
async def test_kill_9_mid_part_then_rerun_gives_the_same_tables(
    stager: LocalStager, database_url: str, reference_url: str, db: asyncpg.Connection
) -> None:
    await _history(stager)
    manifests = await stager.manifests("raw")
    ref_pool = await connect_pool(reference_url)
    try:
        ref = Loader(ref_pool, stager)
        await ref.setup()
        for kind in ("outcomes", "raw"):
            for m in await stager.manifests(kind):  # type: ignore[arg-type]
                await ref.load_manifest(m)
    finally:
        await ref_pool.close()
    # Tables exist before the child starts, so the locks below can be taken.
    pool = await connect_pool(database_url)
    try:
        first = Loader(pool, stager)
        await first.setup()
        await first.ensure_table(manifests[0])
    finally:
        await pool.close()

    # Stop the child at part 3 of run r1 (parts 1-2 and r0 committed), then let it do the part's whole
    # upsert and block on the ledger row: killed there, inside the part's transaction.
    target = manifests[1].parts[2].uri
    await db.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", target)
    child = await asyncio.to_thread(_child, database_url, stager.root)
    try:
        await _wait_for(
            db,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> pg_backend_pid()",
        )
        tx = db.transaction()
        await tx.start()
        await db.execute("LOCK TABLE trawl._loads IN EXCLUSIVE MODE")
        await db.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", target)
        pid = await _wait_for(
            db,
            "SELECT pid FROM pg_locks WHERE relation = 'trawl._loads'::regclass AND mode = 'RowExclusiveLock'"
            " AND NOT granted",
        )
        # The part's rows are written (table and lineage) but not committed when the loader dies.
        assert (
            await db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = $1 AND mode = 'RowExclusiveLock' AND granted"
                " AND relation IN ('trawl.items'::regclass, 'trawl._lineage'::regclass)",
                pid,
            )
            == 2
        )
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.to_thread(child.wait)
        await tx.rollback()
        await _wait_for(db, "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid)
    finally:
        if child.poll() is None:
            child.kill()
            await asyncio.to_thread(child.wait)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode() if child.stderr else ""
    for pipe in (child.stdout, child.stderr):  # never read: close them, or they leak (ResourceWarning)
        if pipe is not None:
            pipe.close()
    loaded = {r[0] for r in await db.fetch("SELECT staged_object FROM trawl._loads")}
    assert target not in loaded
    assert {p.uri for p in manifests[0].parts} | {manifests[1].parts[0].uri, manifests[1].parts[1].uri} <= loaded
    orphans = "SELECT count(*) FROM trawl._lineage l WHERE NOT EXISTS (SELECT 1 FROM trawl._loads d WHERE d.load_id = l.load_id)"
    assert await db.fetchval(orphans) == 0

    rerun = await asyncio.to_thread(_child, database_url, stager.root)
    out, err = await asyncio.to_thread(rerun.communicate, timeout=120)
    assert rerun.returncode == 0, err.decode()
    assert target in _parts(out)

    assert await _snapshot(database_url) == await _snapshot(reference_url)


@pytest.mark.slow
async def test_two_loader_processes_at_once_load_each_part_once(
    stager: LocalStager, database_url: str, reference_url: str
) -> None:
    await _history(stager)
    ref = await asyncio.to_thread(_child, reference_url, stager.root)
    _, err = await asyncio.to_thread(ref.communicate, timeout=120)
    assert ref.returncode == 0, err.decode()
    a, b = (
        await asyncio.to_thread(_child, database_url, stager.root),
        await asyncio.to_thread(_child, database_url, stager.root),
    )
    (out_a, err_a), (out_b, err_b) = await asyncio.gather(
        asyncio.to_thread(a.communicate, timeout=120), asyncio.to_thread(b.communicate, timeout=120)
    )
    assert (a.returncode, b.returncode) == (0, 0), (err_a + err_b).decode()

    done_a, done_b = _parts(out_a), _parts(out_b)
    every = {p.uri for kind in ("outcomes", "raw") for m in await stager.manifests(kind) for p in m.parts}  # type: ignore[arg-type]
    assert sorted(done_a + done_b) == sorted(every)  # each part by exactly one of them
    assert await _snapshot(database_url) == await _snapshot(reference_url)


# -- the load flow ----------------------------------------------------------------------------------------


async def test_the_load_flow_fails_only_the_source_over_the_reject_rate(
    monkeypatch: pytest.MonkeyPatch, prefect_api: str, database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    from flows.load import load

    stager = await asyncio.to_thread(LocalStager, tmp_path / "staging")  # resolves the path
    await stage(
        stager,
        "r1",
        [rec(str(i), {"id": i}, run_id="r1", at=T0, source="good") for i in range(5)],
        schema(),
        source="good",
    )
    bad = [rec(str(i), {"id": i if i < 3 else "x"}, run_id="r1", at=T0, source="bad") for i in range(10)]
    await stage(stager, "r1", bad, schema(), source="bad")
    monkeypatch.setenv("TRAWL_DATABASE_URL", database_url)
    monkeypatch.setenv("TRAWL_STAGING", f"file://{stager.root}")
    monkeypatch.setenv("TRAWL_MAX_REJECT_RATE", "0.5")
    monkeypatch.setenv("TRAWL_DB_POOL_SIZE", "2")

    result = await load()

    good, failed = result["sources"]["good"], result["sources"]["bad"]
    assert (good["error"], good["inserted"]) == (None, 5)
    assert failed["error"].startswith("source 'bad' run r1: 7 of 10 records rejected so far (70.0%)")
    assert failed["inserted"] == 0
    assert await db.fetchval("SELECT count(*) FROM trawl.good") == 5
    assert await db.fetchval("SELECT count(*) FROM trawl.bad") == 0
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects WHERE source = 'bad'") == 7


async def test_a_bad_part_read_ahead_fails_when_its_turn_comes(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    raw = await stage(stager, "r1", [rec(str(i), {"id": i}, run_id="r1", at=T0) for i in range(12)], schema())
    assert len(raw.parts) == 3
    path = Path(raw.parts[1].uri.removeprefix("file://"))
    await asyncio.to_thread(lambda: path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0"))

    with pytest.raises(StagingError, match="does not match the manifest"):
        await loader.load_manifest(raw)

    # Part 1 loaded while part 2 was read ahead; part 2's failure stopped the manifest before part 3.
    assert [r[0] for r in await db.fetch("SELECT staged_object FROM trawl._loads")] == [raw.parts[0].uri]
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 4

    # Per-part calls, as the load flow makes them, give the same result as load_manifest.
    await asyncio.to_thread(path.write_bytes, b"")  # still broken; load the others one by one
    fields = await loader.prepare(raw)
    done = await loader.load_part(raw, raw.parts[2], fields)
    await loader.finish(raw)
    assert (done.inserted, done.skipped) == (4, False)
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 8
