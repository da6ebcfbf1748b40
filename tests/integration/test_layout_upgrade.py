"""An old-layout schema (written by the loader before layout 2) upgraded in place by the new loader: nothing lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sinks.postgres import Loader, lineage
from sinks.stage import LocalStager
from tests.helpers import legacy_loader
from tests.helpers.loading import table_rows
from trawl.records import Outcome, OutcomeKind, Record

pytestmark = pytest.mark.integration

T0 = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
SCHEMA: dict[str, Any] = {
    "key": ["id"],
    "fields": {"id": {"type": "int", "required": True}, "name": {"type": "text"}, "price": {"type": "float"}},
}
DECLARED = ("id", "name", "price", "_extra", "_url", "_content_hash", "_fetched_at", "_first_seen_at")


@pytest.fixture
def stager(tmp_path: Path) -> LocalStager:
    return LocalStager(tmp_path / "staging", part_max_records=3)


def rec(key: str, data: dict[str, Any], run_id: str, at: datetime) -> Record:
    return Record("items", key, f"https://shop.test/{key}", at, run_id, data)


async def stage(stager: LocalStager, run_id: str, at: datetime, records: list[Record], outcomes: list[Outcome]) -> list:
    s = stager.open_source("items", run_id, at)
    for r in records:
        await s.records.write(r.envelope())
    for o in outcomes:
        await s.outcomes.write(o.envelope())
    return list(await s.commit(status="complete", schema=SCHEMA, stats={"records": len(records)}))


async def test_an_old_layout_is_upgraded_in_place_and_nothing_is_lost(
    pool: asyncpg.Pool, stager: LocalStager, db: asyncpg.Connection
) -> None:
    t2, t3 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    r1 = [
        rec(str(i), {"id": i, "name": f"n{i}", "price": i + 0.5, **({"x": i} if i == 2 else {})}, "r1", T0)
        for i in range(1, 7)
    ]
    r1.append(rec("9", {"id": "nine"}, "r1", T0))  # a reject
    r2 = [
        rec("1", {"id": 1, "name": "n1", "price": 1.5}, "r2", t2),  # unchanged
        rec("2", {"id": 2, "name": "changed", "price": 2.5}, "r2", t2),
        rec("7", {"id": 7, "name": "n7"}, "r2", t2),  # new
    ]
    fetched = [Outcome("r1", "items", r.url, OutcomeKind.FETCHED, 200, 1, 10, 1, at=T0) for r in r1]
    not_modified = [Outcome("r2", "items", "https://shop.test/3", OutcomeKind.NOT_MODIFIED, 304, 1, 0, 1, at=t2)]
    manifests = await stage(stager, "r1", T0, r1, fetched) + await stage(stager, "r2", t2, r2, not_modified)
    old = legacy_loader.Loader(pool, stager)
    await old.setup()
    for m in manifests:
        await old.load_manifest(m)
    before = {r["_key"]: r for r in await db.fetch("SELECT * FROM trawl.items")}
    old_lineage = {k: [tuple(e)[:5] for e in await legacy_loader.lineage(pool, "trawl", "items", k)] for k in before}
    counts = {
        t: await db.fetchval(f"SELECT count(*) FROM trawl.{t}") for t in ("_loads", "_rejects", "_outcomes", "_runs")
    }
    assert before["3"]["_last_seen_at"] == t2 and before["1"]["_last_seen_at"] == t2

    await Loader(pool, stager).setup()
    await Loader(pool, stager).setup()  # once: the second finds the layout current

    cols = [
        r[0]
        for r in await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'trawl' AND table_name = 'items'"
            " ORDER BY ordinal_position"
        )
    ]
    assert cols == [
        "_key",
        "id",
        "name",
        "price",
        "_extra",
        "_url",
        "_content_hash",
        "_fetched_at",
        "_first_seen_at",
        "_changed_at",
        "_load_id",
    ]
    after = await table_rows(db)
    assert sorted(after) == sorted(before)
    for key, was in before.items():
        now = after[key]
        assert tuple(now[c] for c in DECLARED) == tuple(was[c] for c in DECLARED), key
        assert (now["_run_id"], now["_staged_object"], now["_last_seen_at"]) == (
            was["_run_id"],
            was["_staged_object"],
            was["_last_seen_at"],
        ), key
        entries = await lineage(pool, "trawl", "items", key)
        # The lineage log now also holds the not-modified sighting that only moved _last_seen_at before.
        records = [
            (e["run_id"], e["url"], e["fetched_at"], e["staged_object"], e["loaded_at"])
            for e in entries
            if "/outcomes/" not in e["staged_object"]
        ]
        assert [r[:4] for r in records] == [r[:4] for r in old_lineage[key]], key
    sightings = [e for e in await lineage(pool, "trawl", "items", "3") if e["change"] == "unchanged"]
    assert [(e["run_id"], e["url"], e["fetched_at"]) for e in sightings] == [("r2", "https://shop.test/3", t2)]
    assert {t: await db.fetchval(f"SELECT count(*) FROM trawl.{t}") for t in counts} == counts
    changes = await db.fetchval(
        "SELECT changes FROM trawl._schemas WHERE source = 'items' ORDER BY version DESC LIMIT 1"
    )
    assert changes[0].startswith("layout 2:")
    assert await db.fetchval("SELECT count(*) FROM trawl._schemas WHERE changes[1] LIKE 'layout 2:%'") == 1
    assert await db.fetchval("SELECT to_regclass('trawl._lineage_v1')") is None
    # The new lineage log has its block range indexes (by key, by load), not the old key btree.
    assert await db.fetchval(
        "SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes"
        " WHERE schemaname = 'trawl' AND tablename = '_lineage'"
    ) == ["_lineage_key_brin", "_lineage_load"]

    # And it loads on: a third run with one record unchanged and one changed writes one row.
    r3 = [rec("1", {"id": 1, "name": "n1", "price": 1.5}, "r3", t3), rec("4", {"id": 4, "name": "new"}, "r3", t3)]
    [_, raw3] = await stage(stager, "r3", t3, r3, [])
    loader = Loader(pool, stager)
    results = await loader.load_manifest(raw3)
    assert [(r.inserted, r.updated, r.unchanged) for r in results] == [(0, 1, 1)]
    final = await table_rows(db)
    assert (final["4"]["name"], final["4"]["_run_id"]) == ("new", "r3")
    assert (final["1"]["_run_id"], final["1"]["_last_seen_at"]) == ("r1", t3)
    missing = {r["_key"] for r in await db.fetch("SELECT _key FROM trawl_views.items_missing")}
    assert missing == set(before) - {"1", "4"}  # the latest run (r3) saw only keys 1 and 4
