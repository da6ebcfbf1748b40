"""The PostgreSQL loader against a real server: typed tables, lineage, dedup, rejects, ledger, runs, races."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg
import orjson
import pytest

from sinks.postgres import Loader, load_validators
from sinks.stage import LocalStager
from tests.helpers.loading import part_totals, table_rows
from trawl.database import connect_pool
from trawl.errors import LoadError, StagingError
from trawl.records import Outcome, OutcomeKind, Record, content_hash
from trawl.staging import Manifest, StagedPart

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
FIELDS: dict[str, dict[str, Any]] = {
    "id": {"type": "int", "required": True},
    "name": {"type": "text", "required": True},
    "price": {"type": "float", "required": False},
    "in_stock": {"type": "bool", "required": False},
    "released": {"type": "date", "required": False},
    "updated": {"type": "timestamp", "required": False},
    "meta": {"type": "json", "required": False},
}
SCHEMA: dict[str, Any] = {"key": ["id"], "fields": FIELDS}


def item(i: int, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": i,
        "name": f"item {i}",
        "price": i + 0.5,
        "in_stock": i % 2 == 0,
        "released": f"2021-01-{i + 1:02d}",
        "updated": f"2021-02-03T04:05:{i:02d}Z",
        "meta": {"tags": ["t", str(i)]},
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def rec(key: str | None, data: dict[str, Any], *, run_id: str, at: datetime, source: str = "items") -> Record:
    return Record(
        source=source, key=key, url=f"https://shop.test/{source}/{key}", fetched_at=at, run_id=run_id, data=data
    )


async def stage(
    stager: LocalStager,
    run_id: str,
    records: Sequence[Record],
    *,
    source: str = "items",
    schema: dict[str, Any] | None = None,
    started: datetime = T0,
    status: Literal["complete", "failed"] = "complete",
    error: str | None = None,
    outcomes: Sequence[Outcome] = (),
    stats: dict[str, Any] | None = None,
) -> tuple[Manifest, Manifest]:
    """Stage one source's run the way the crawler does; returns (outcomes, raw) manifests."""
    s = stager.open_source(source, run_id, started)
    for r in records:
        await s.records.write(r.envelope())
    for o in outcomes:
        await s.outcomes.write(o.envelope())
    return await s.commit(
        status=status,
        schema=SCHEMA if schema is None else schema,
        stats=stats if stats is not None else {"records": len(records)},
        error=error,
    )


@pytest.fixture
def stager(tmp_path: Path) -> LocalStager:
    return LocalStager(tmp_path / "staging", part_max_records=3)


async def snapshot(db: asyncpg.Connection) -> list[list[tuple[Any, ...]]]:
    """Everything the loader writes, for before/after comparisons."""
    return [
        [tuple(r) for r in await db.fetch(f"SELECT * FROM trawl.{t} ORDER BY 1")]
        for t in ("items", "_loads", "_rejects", "_runs", "_outcomes")
    ]


async def test_setup_creates_schema_and_bookkeeping_tables(
    pool: asyncpg.Pool, stager: LocalStager, db: asyncpg.Connection
) -> None:
    loader = Loader(pool, stager)
    await asyncio.gather(loader.setup(), Loader(pool, stager).setup())
    await loader.setup()  # idempotent

    tables = await db.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'trawl'")
    assert sorted(r[0] for r in tables) == ["_lineage", "_loads", "_outcomes", "_rejects", "_runs", "_schemas"]


async def test_source_table_has_one_typed_column_per_declared_field(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    _, raw = await stage(stager, "r1", [rec("1", item(1), run_id="r1", at=T0)])
    await loader.load_manifest(raw)

    columns = await db.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'trawl' AND table_name = 'items' ORDER BY ordinal_position"
    )
    assert [(c[0], c[1]) for c in columns] == [
        ("_key", "text"),
        ("id", "bigint"),
        ("name", "text"),
        ("price", "double precision"),
        ("in_stock", "boolean"),
        ("released", "date"),
        ("updated", "timestamp with time zone"),
        ("meta", "jsonb"),
        ("_extra", "jsonb"),
        ("_url", "text"),
        ("_content_hash", "text"),
        ("_fetched_at", "timestamp with time zone"),
        ("_first_seen_at", "timestamp with time zone"),
        ("_changed_at", "timestamp with time zone"),
        ("_load_id", "bigint"),
    ]
    pk = await db.fetchval(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'trawl.items'::regclass AND i.indisprimary"
    )
    assert pk == "_key"


async def test_rows_land_typed_with_lineage(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    records = [rec(str(i), item(i), run_id="r1", at=T0 + timedelta(seconds=i)) for i in range(1, 6)]
    _, raw = await stage(stager, "r1", records)
    assert [p.rows for p in raw.parts] == [3, 2]

    results = await loader.load_manifest(raw)

    assert [(r.staged_object, r.rows, r.inserted, r.skipped) for r in results] == [
        (raw.parts[0].uri, 3, 3, False),
        (raw.parts[1].uri, 2, 2, False),
    ]
    got = await table_rows(db)
    assert sorted(got) == ["1", "2", "3", "4", "5"]
    r2 = got["2"]
    assert (r2["id"], r2["name"], r2["price"], r2["in_stock"]) == (2, "item 2", 2.5, True)
    assert r2["released"] == date(2021, 1, 3)
    assert r2["updated"] == datetime(2021, 2, 3, 4, 5, 2, tzinfo=UTC)
    assert orjson.loads(r2["meta"]) == {"tags": ["t", "2"]}
    assert r2["_extra"] is None
    assert r2["_url"] == "https://shop.test/items/2"
    assert r2["_content_hash"] == content_hash(item(2)) == records[1].content_hash
    assert r2["_run_id"] == "r1"
    assert r2["_fetched_at"] == r2["_first_seen_at"] == r2["_last_seen_at"] == T0 + timedelta(seconds=2)
    for key, row in got.items():
        part = raw.parts[0] if int(key) <= 3 else raw.parts[1]
        assert row["_staged_object"] == part.uri
        assert await asyncio.to_thread(Path(row["_staged_object"].removeprefix("file://")).is_file)

    ledger = await db.fetch("SELECT * FROM trawl._loads ORDER BY staged_object")
    assert [
        (r["staged_object"], r["sha256"], r["run_id"], r["source"], r["kind"], r["rows"], r["inserted"]) for r in ledger
    ] == [(p.uri, p.sha256, "r1", "items", "raw", p.rows, p.rows) for p in raw.parts]
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 0


async def test_loading_the_same_manifest_again_changes_nothing(
    pool: asyncpg.Pool, loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    records = [rec(str(i), item(i), run_id="r1", at=T0) for i in range(7)]
    records.append(rec(None, item(99), run_id="r1", at=T0))  # one reject, which must not be duplicated
    outcomes, raw = await stage(
        stager, "r1", records, outcomes=[Outcome("r1", "items", "https://shop.test/a", OutcomeKind.FETCHED, at=T0)]
    )
    await loader.load_manifest(outcomes)
    await loader.load_manifest(raw)
    before = await snapshot(db)
    assert len(before[1]) == len(raw.parts) + 1

    again = Loader(pool, stager)
    assert await again.pending([raw, outcomes]) == set()
    results = await again.load_manifest(raw) + await again.load_manifest(outcomes)
    # Even told the parts are pending, the ledger check inside each part's transaction skips them.
    forced = await again.load_manifest(raw, todo={p.uri for p in raw.parts})

    assert all(r.skipped for r in results + forced)
    assert [r.staged_object for r in forced] == [p.uri for p in raw.parts]
    assert part_totals(results + forced) == (0, 0, 0, 0)
    assert await snapshot(db) == before


async def test_identical_second_run_only_moves_last_seen(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    _, run1 = await stage(stager, "r1", [rec(str(i), item(i), run_id="r1", at=T0) for i in range(4)])
    await loader.load_manifest(run1)
    first = await table_rows(db)
    t2 = T0 + timedelta(days=1)
    _, run2 = await stage(stager, "r2", [rec(str(i), item(i), run_id="r2", at=t2) for i in range(4)], started=t2)

    results = await loader.load_manifest(run2)

    assert part_totals(results) == (0, 0, 4, 0)
    second = await table_rows(db)
    for key, row in second.items():
        assert row["_last_seen_at"] == t2
        assert {k: v for k, v in row.items() if k != "_last_seen_at"} == {
            k: v for k, v in first[key].items() if k != "_last_seen_at"
        }
        assert (row["_run_id"], row["_fetched_at"], row["_first_seen_at"]) == ("r1", T0, T0)
        assert row["_staged_object"] in {p.uri for p in run1.parts}
    ledger = await db.fetch("SELECT inserted, updated, unchanged FROM trawl._loads WHERE run_id = 'r2'")
    assert sum(r["unchanged"] for r in ledger) == 4
    assert sum(r["inserted"] + r["updated"] for r in ledger) == 0


async def test_changed_content_rewrites_the_row(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    _, run1 = await stage(stager, "r1", [rec(str(i), item(i), run_id="r1", at=T0) for i in range(3)])
    await loader.load_manifest(run1)
    t2 = T0 + timedelta(hours=6)
    changed = item(1, price=9.99, in_stock=False, meta={"tags": []})
    records = [
        rec("0", item(0), run_id="r2", at=t2),
        rec("1", changed, run_id="r2", at=t2),
        rec("2", item(2), run_id="r2", at=t2),
        rec("3", item(3), run_id="r2", at=t2),
    ]
    _, run2 = await stage(stager, "r2", records, started=t2)

    results = await loader.load_manifest(run2)

    assert part_totals(results) == (1, 1, 2, 0)
    got = await table_rows(db)
    r1 = got["1"]
    assert (r1["price"], r1["in_stock"], orjson.loads(r1["meta"])) == (9.99, False, {"tags": []})
    assert r1["_content_hash"] == content_hash(changed)
    assert (r1["_run_id"], r1["_fetched_at"], r1["_first_seen_at"], r1["_last_seen_at"]) == ("r2", t2, T0, t2)
    assert r1["_staged_object"] == run2.parts[0].uri
    assert (got["3"]["_first_seen_at"], got["3"]["_run_id"]) == (t2, "r2")
    assert (got["0"]["_run_id"], got["0"]["_last_seen_at"]) == ("r1", t2)
    ledger = await db.fetchrow(
        "SELECT sum(inserted), sum(updated), sum(unchanged) FROM trawl._loads WHERE run_id = 'r2'"
    )
    assert tuple(ledger) == (1, 1, 2)


async def test_an_older_run_loaded_late_does_not_overwrite_newer_rows(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    t2 = T0 + timedelta(days=1)
    _, new = await stage(stager, "r2", [rec("1", item(1, name="new"), run_id="r2", at=t2)], started=t2)
    _, old = await stage(stager, "r1", [rec("1", item(1, name="old"), run_id="r1", at=T0)])
    await loader.load_manifest(new)

    results = await loader.load_manifest(old)

    assert part_totals(results) == (0, 0, 1, 0)
    row = (await table_rows(db))["1"]
    assert (row["name"], row["_run_id"], row["_last_seen_at"]) == ("new", "r2", t2)


async def test_latest_fetched_at_wins_per_key_within_a_part(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    records = [
        rec("1", item(1, name="middle"), run_id="r1", at=T0 + timedelta(minutes=2)),
        rec("1", item(1, name="latest"), run_id="r1", at=T0 + timedelta(minutes=3)),
        rec("1", item(1, name="earliest"), run_id="r1", at=T0 + timedelta(minutes=1)),
    ]
    _, raw = await stage(stager, "r1", records)
    assert len(raw.parts) == 1

    [result] = await loader.load_manifest(raw)

    assert (result.rows, result.inserted, result.updated, result.unchanged) == (3, 1, 0, 0)
    got = await table_rows(db)
    assert list(got) == ["1"]
    assert got["1"]["name"] == "latest"
    assert got["1"]["_fetched_at"] == T0 + timedelta(minutes=3)


async def test_records_that_do_not_fit_go_to_rejects(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    records = [
        rec("1", item(1), run_id="r1", at=T0),
        rec("2", item(2, id="abc"), run_id="r1", at=T0),
        rec("3", item(3, released="2021-13-45", price="cheap"), run_id="r1", at=T0),
        rec("4", item(4, name=...), run_id="r1", at=T0),
        rec(None, item(5), run_id="r1", at=T0),
        rec("6", item(6, in_stock="perhaps", updated="yesterday", name=None), run_id="r1", at=T0),
    ]
    _, raw = await stage(stager, "r1", records)

    results = await loader.load_manifest(raw)

    assert part_totals(results) == (1, 0, 0, 5)
    assert list(await table_rows(db)) == ["1"]
    rejects = await db.fetch("SELECT * FROM trawl._rejects ORDER BY id")
    assert [(r["key"], list(r["reasons"])) for r in rejects] == [
        ("2", ["id: expected int, got 'abc'"]),
        ("3", ["price: expected float, got 'cheap'", "released: expected date (YYYY-MM-DD), got '2021-13-45'"]),
        ("4", ["name: required but missing"]),
        (None, ["key: missing (id)"]),
        (
            "6",
            [
                "name: required but missing",
                "in_stock: expected bool, got 'perhaps'",
                "updated: expected ISO 8601 timestamp, got 'yesterday'",
            ],
        ),
    ]
    by_key = {r["key"]: r for r in rejects}
    assert orjson.loads(by_key["3"]["record"]) == orjson.loads(orjson.dumps(records[2].envelope()))
    assert orjson.loads(by_key[None]["record"])["data"] == item(5)
    for r in rejects:
        assert (r["run_id"], r["source"]) == ("r1", "items")
        assert r["staged_object"] in {p.uri for p in raw.parts}
        assert await asyncio.to_thread(Path(r["staged_object"].removeprefix("file://")).is_file)
    assert by_key["2"]["url"] == "https://shop.test/items/2"
    assert by_key["2"]["staged_object"] == raw.parts[0].uri
    assert by_key["6"]["staged_object"] == raw.parts[1].uri
    ledger = await db.fetch("SELECT rows, inserted, rejected FROM trawl._loads ORDER BY staged_object")
    assert [tuple(r) for r in ledger] == [(3, 1, 2), (3, 0, 3)]


async def test_undeclared_fields_land_in_extra(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    records = [
        rec("1", item(1, colour="red", dims={"w": 2, "h": [1, 2]}), run_id="r1", at=T0),
        rec("2", item(2), run_id="r1", at=T0),
    ]
    _, raw = await stage(stager, "r1", records)

    await loader.load_manifest(raw)

    got = await table_rows(db)
    assert orjson.loads(got["1"]["_extra"]) == {"colour": "red", "dims": {"w": 2, "h": [1, 2]}}
    assert got["2"]["_extra"] is None
    assert "colour" not in got["1"]


async def test_awkward_values_arrive_exactly(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    # Rows reach COPY as CSV written by the decoding process: quotes, backslashes, newlines, tabs, control
    # characters, the text "null", empty strings and non-ASCII keep their exact values, in new and changed rows.
    odd = ['say "hi"', 'back\\slash \\"', "two\nlines\r\n", "tab\there", "bell\x07", "null", "", "naïve ☃ 𝄞", ","]
    first = [rec(f"k{i}\t\\{i}", item(i, name=v, meta={"v": v}, note=v), run_id="r1", at=T0) for i, v in enumerate(odd)]
    _, raw = await stage(stager, "r1", first)
    await loader.load_manifest(raw)
    later = T0 + timedelta(hours=1)
    # Half of them changed in the next run (an UPDATE from the staged rows), the rest new keys.
    second = [
        rec(f"k{i}\t\\{i}", item(i, name=v + "!", meta={"v": v}, note=v), run_id="r2", at=later)
        for i, v in enumerate(odd)
        if i % 2
    ] + [rec(f"n{i}\n", item(i + 20, name=v, meta={"v": v}), run_id="r2", at=later) for i, v in enumerate(odd)]
    _, raw2 = await stage(stager, "r2", second)
    await loader.load_manifest(raw2)

    got = await table_rows(db)
    for i, v in enumerate(odd):
        row = got[f"k{i}\t\\{i}"]
        assert row["name"] == (v + "!" if i % 2 else v)
        assert orjson.loads(row["meta"]) == {"v": v} and orjson.loads(row["_extra"]) == {"note": v}
        assert got[f"n{i}\n"]["name"] == v and got[f"n{i}\n"]["_extra"] is None
    assert got["k6\t\\6"]["name"] == "" and got["k5\t\\5"]["price"] == 5.5


async def test_nul_characters_never_block_a_part(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    # PostgreSQL text and jsonb cannot hold U+0000: a declared text value with one is rejected with a reason,
    # an undeclared or json value keeps its place with U+FFFD, and the part still loads.
    records = [
        rec("1", item(1, name="bad\x00name"), run_id="r1", at=T0),
        rec("2", item(2, note="a\x00b", meta={"k\x00": "v\x00"}), run_id="r1", at=T0),
    ]
    _, raw = await stage(stager, "r1", records)

    assert part_totals(await loader.load_manifest(raw)) == (1, 0, 0, 1)

    got = await table_rows(db)
    assert orjson.loads(got["2"]["_extra"]) == {"note": "a\ufffdb"}
    assert orjson.loads(got["2"]["meta"]) == {"k\ufffd": "v\ufffd"}
    reject = await db.fetchrow("SELECT key, reasons, record FROM trawl._rejects")
    assert reject is not None and reject["key"] == "1"
    assert reject["reasons"] == ["name: contains a NUL character, which PostgreSQL text cannot store"]
    assert orjson.loads(reject["record"])["data"]["name"] == "bad\ufffdname"


async def test_a_field_declared_later_adds_a_column(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    _, run1 = await stage(stager, "r1", [rec("1", item(1), run_id="r1", at=T0)])
    await loader.load_manifest(run1)
    t2 = T0 + timedelta(days=1)
    wider = {
        "key": ["id"],
        "fields": {
            **FIELDS,
            "rating": {"type": "float", "required": False},
            "seller_name": {"type": "text", "required": False},
        },
    }
    records = [
        rec("1", item(1, rating=4.5), run_id="r2", at=t2),
        rec("2", item(2, rating="3", seller_name="Ann"), run_id="r2", at=t2),
    ]
    _, run2 = await stage(stager, "r2", records, schema=wider, started=t2)

    results = await loader.load_manifest(run2)

    assert part_totals(results) == (1, 1, 0, 0)
    types = dict(
        await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'trawl' AND table_name = 'items'"
        )
    )
    assert (types["rating"], types["seller_name"]) == ("double precision", "text")
    assert len(types) == 17  # 9 declared, 8 bookkeeping
    got = await table_rows(db)
    assert (got["1"]["rating"], got["1"]["seller_name"], got["1"]["_extra"]) == (4.5, None, None)
    assert (got["2"]["rating"], got["2"]["seller_name"]) == (3.0, "Ann")


async def test_a_changed_declared_type_is_a_load_error(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    _, run1 = await stage(stager, "r1", [rec("1", item(1), run_id="r1", at=T0)])
    await loader.load_manifest(run1)
    before = await snapshot(db)
    changed = {
        "key": ["id"],
        "fields": {
            **FIELDS,
            "price": {"type": "int", "required": False},
            "rating": {"type": "float", "required": False},
        },
    }
    _, run2 = await stage(stager, "r2", [rec("1", item(1, price=3), run_id="r2", at=T0)], schema=changed)

    with pytest.raises(LoadError) as info:
        await loader.load_manifest(run2)

    assert str(info.value) == (
        '"trawl"."items".price is float (double precision) but source \'items\' now declares it int, and 1 stored '
        "value(s) would not survive the cast (e.g. _key '1': 1.5); declare it back or migrate the column by hand "
        "(nothing was changed)"
    )
    assert info.value.staged_object == run2.uri
    assert await snapshot(db) == before
    columns = await db.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'items'")
    assert "rating" not in {c[0] for c in columns}  # the evolution is all or nothing


async def test_a_corrupted_part_loads_nothing(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    _, raw = await stage(stager, "r1", [rec(str(i), item(i), run_id="r1", at=T0) for i in range(2)])
    path = Path(raw.parts[0].uri.removeprefix("file://"))
    await asyncio.to_thread(lambda: path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0"))

    with pytest.raises(StagingError, match="does not match the manifest"):
        await loader.load_manifest(raw)

    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 0
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 0


async def test_a_part_with_fewer_lines_than_its_manifest_is_refused(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    _, raw = await stage(stager, "r1", [rec(str(i), item(i), run_id="r1", at=T0) for i in range(2)])
    [part] = raw.parts
    lying = dataclasses.replace(raw, parts=(StagedPart(part.uri, 5, part.bytes, part.sha256),))

    with pytest.raises(StagingError, match="has 2 lines but the manifest says 5"):
        await loader.load_manifest(lying)

    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == 0


async def test_outcomes_load_one_row_per_url(loader: Loader, stager: LocalStager, db: asyncpg.Connection) -> None:
    url = "https://shop.test/items/{}".format
    second = timedelta(seconds=1)
    outcomes = [
        # part 1: url 2 twice, the later `at` wins whatever the line order
        Outcome(
            "r1", "items", url(1), OutcomeKind.FETCHED, http_status=200, attempts=1, bytes=512, elapsed_ms=12, at=T0
        ),
        Outcome(
            "r1",
            "items",
            url(2),
            OutcomeKind.FAILED,
            http_status=503,
            attempts=3,
            elapsed_ms=900,
            error="503 Service Unavailable",
            at=T0 + second,
        ),
        Outcome("r1", "items", url(2), OutcomeKind.FAILED, http_status=500, attempts=1, error="500", at=T0),
        # part 2: an outcome older than the loaded one for url 1 does not replace it
        Outcome("r1", "items", url(3), OutcomeKind.SKIPPED_ROBOTS, at=T0),
        Outcome("r1", "items", url(4), OutcomeKind.NOT_MODIFIED, http_status=304, attempts=1, at=T0),
        Outcome("r1", "items", url(1), OutcomeKind.FAILED, error="stale", at=T0 - second),
        # part 3: a newer outcome for url 4 does
        Outcome("r1", "items", url(4), OutcomeKind.FETCHED, http_status=200, attempts=5, bytes=64, at=T0 + 2 * second),
    ]
    out, _ = await stage(stager, "r1", [], outcomes=outcomes)
    other, _ = await stage(
        stager, "r1", [], source="other", outcomes=[Outcome("r1", "other", url(1), OutcomeKind.FILTERED, at=T0)]
    )
    assert [p.rows for p in out.parts] == [3, 3, 1]

    results = await loader.load_manifest(out) + await loader.load_manifest(other)

    assert [(r.inserted, r.updated, r.unchanged) for r in results] == [(2, 0, 0), (2, 0, 1), (0, 1, 0), (1, 0, 0)]
    got = await db.fetch("SELECT * FROM trawl._outcomes ORDER BY source, url")
    assert [
        (r["source"], r["url"], r["outcome"], r["http_status"], r["attempts"], r["bytes"], r["elapsed_ms"], r["error"])
        for r in got
    ] == [
        ("items", url(1), "fetched", 200, 1, 512, 12.0, None),
        ("items", url(2), "failed", 503, 3, 0, 900.0, "503 Service Unavailable"),
        ("items", url(3), "skipped_robots", None, 0, 0, 0.0, None),
        ("items", url(4), "fetched", 200, 5, 64, 0.0, None),
        ("other", url(1), "filtered", None, 0, 0, 0.0, None),
    ]
    assert {r["run_id"] for r in got} == {"r1"}
    assert (got[0]["at"], got[0]["staged_object"]) == (T0, out.parts[0].uri)
    assert (got[1]["at"], got[1]["staged_object"]) == (T0 + second, out.parts[0].uri)
    assert (got[3]["at"], got[3]["staged_object"]) == (T0 + 2 * second, out.parts[2].uri)
    assert got[4]["staged_object"] == other.parts[0].uri
    ledger = await db.fetch("SELECT kind, rows FROM trawl._loads ORDER BY staged_object")
    assert [tuple(r) for r in ledger] == [("outcomes", 3), ("outcomes", 3), ("outcomes", 1), ("outcomes", 1)]
    assert all(r.skipped for r in await loader.load_manifest(out))
    assert await db.fetchval("SELECT count(*) FROM trawl._outcomes") == 5


async def test_runs_get_one_row_per_run_merged_across_sources(
    loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    t1 = T0 + timedelta(minutes=5)
    _, a = await stage(
        stager,
        "r1",
        [rec("1", item(1), run_id="r1", at=T0, source="a")],
        source="a",
        started=t1,
        stats={"records": 1, "pages": 2},
    )
    b_out, b = await stage(
        stager,
        "r1",
        [],
        source="b",
        started=T0,
        status="failed",
        error="b.test: circuit open",
        stats={"records": 0, "pages": 0},
    )
    _, c = await stage(stager, "r2", [], source="c", stats={"records": 0})

    for m in (a, b_out, b, c):
        await loader.load_manifest(m)

    runs = {r["run_id"]: r for r in await db.fetch("SELECT * FROM trawl._runs")}
    assert sorted(runs) == ["r1", "r2"]
    r1 = runs["r1"]
    assert r1["status"] == "failed"
    assert orjson.loads(r1["sources"]) == {
        "a": {"status": "complete", "error": None, "records": 1, "pages": 2},
        "b": {"status": "failed", "error": "b.test: circuit open", "records": 0, "pages": 0},
    }
    assert r1["started_at"] == T0
    assert r1["finished_at"] == max(datetime.fromisoformat(m.finished_at) for m in (a, b))
    assert (runs["r2"]["status"], list(orjson.loads(runs["r2"]["sources"]))) == ("complete", ["c"])

    # A later complete source does not turn a failed run back into a complete one.
    _, d = await stage(stager, "r1", [], source="d")
    await loader.load_manifest(d)
    r1 = await db.fetchrow("SELECT status, sources FROM trawl._runs WHERE run_id = 'r1'")
    assert r1["status"] == "failed"
    assert sorted(orjson.loads(r1["sources"])) == ["a", "b", "d"]


async def test_racing_loads_of_one_manifest_load_each_part_once(
    database_url: str, stager: LocalStager, db: asyncpg.Connection
) -> None:
    records = [rec(str(i), item(i % 28, name=f"n{i}"), run_id="r1", at=T0 + timedelta(seconds=i)) for i in range(60)]
    records += [rec(None, item(1), run_id="r1", at=T0) for _ in range(3)]
    outcomes, raw = await stage(
        stager,
        "r1",
        records,
        outcomes=[Outcome("r1", "items", f"https://shop.test/{i}", OutcomeKind.FETCHED, at=T0) for i in range(10)],
    )
    assert len(raw.parts) == 21
    pool_a, pool_b = await connect_pool(database_url), await connect_pool(database_url)
    try:
        a, b = Loader(pool_a, stager), Loader(pool_b, stager)
        await asyncio.gather(a.setup(), b.setup())

        res_a, res_b, out_a, out_b = await asyncio.gather(
            a.load_manifest(raw), b.load_manifest(raw), a.load_manifest(outcomes), b.load_manifest(outcomes)
        )
    finally:
        await pool_a.close()
        await pool_b.close()

    for first, second, manifest in ((res_a, res_b, raw), (out_a, out_b, outcomes)):
        assert [r.staged_object for r in first] == [r.staged_object for r in second] == [p.uri for p in manifest.parts]
        # Every part was loaded by exactly one of the two loaders.
        assert [x.skipped != y.skipped for x, y in zip(first, second, strict=True)] == [True] * len(manifest.parts)
    done = [r for r in res_a + res_b if not r.skipped]
    assert part_totals(done) == (60, 0, 0, 3)
    assert await db.fetchval("SELECT count(*) FROM trawl._loads") == len(raw.parts) + len(outcomes.parts)
    assert await db.fetchval("SELECT count(*) FROM trawl.items") == 60
    assert await db.fetchval("SELECT count(*) FROM trawl._rejects") == 3
    assert await db.fetchval("SELECT count(*) FROM trawl._outcomes") == 10
    assert await db.fetchval("SELECT count(*) FROM trawl._runs") == 1


async def test_not_modified_moves_last_seen_and_validators_carry_over(
    pool: asyncpg.Pool, loader: Loader, stager: LocalStager, db: asyncpg.Connection
) -> None:
    records = [rec(str(i), item(i), run_id="r1", at=T0) for i in (1, 2)]
    fetched = [
        Outcome("r1", "items", r.url, OutcomeKind.FETCHED, 200, 1, 100, 5, at=T0, etag=f'"v{r.key}"') for r in records
    ]
    out1, raw1 = await stage(stager, "r1", records, outcomes=fetched)
    for m in (out1, raw1):
        await loader.load_manifest(m)
    assert await load_validators(pool, "trawl", "items") == {r.url: (f'"v{r.key}"', None) for r in records}

    later = T0 + timedelta(days=1)
    not_modified = [
        Outcome("r2", "items", records[0].url, OutcomeKind.NOT_MODIFIED, 304, 1, 0, 3, at=later, etag='"v1"')
    ]
    out2, raw2 = await stage(stager, "r2", [], outcomes=not_modified, started=later)
    for m in (out2, raw2):
        await loader.load_manifest(m)

    got = await table_rows(db)
    assert got["1"]["_last_seen_at"] == later  # still current, seen in run r2
    assert got["1"]["_run_id"] == "r1" and got["1"]["_fetched_at"] == T0
    assert got["2"]["_last_seen_at"] == T0
    assert (await load_validators(pool, "trawl", "items"))[records[0].url] == ('"v1"', None)
    assert await load_validators(pool, "trawl", "nothing-here") == {}
