"""trawl's full PostgreSQL load against `psql \\copy` of the same rows: `make bench-load` (part of `make bench`).

    python -m benchmarks.load [--rows 1000000] [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Stages two runs of one source (10 declared fields with rules: a pattern, min/max,
choices, a ``parse: number`` price; some undeclared fields for ``_extra``):

- ``r0``: ROWS distinct keys, loaded first so the table already holds ROWS rows;
- ``r1``: ROWS records, 10% of them duplicate keys (a later ``fetched_at``), keys
  overlapping half of ``r0``'s (half of those unchanged, half changed), a few
  records that fail validation.

Then, each in a fresh subprocess so peak RSS is the loader's own, measures the
load of ``r1`` (read parts, orjson decode, validate, dedup, COPY into a temp
table, one upsert per part, lineage, ledger), and ``psql \\copy`` of the same
ROWS records, flattened to CSV, into an empty unconstrained table with the same
columns (the physical reference). Prints one JSON line per measurement and a
summary with rows/s of both, their ratio and the loader's peak RSS. Everything
happens in a scratch database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from sinks.stage import LocalStager
from tests.helpers.databases import scratch_database
from tests.helpers.staged import part_lines, staged_parts
from trawl.records import Record

SOURCE = "bench_items"
FIELDS: dict[str, dict[str, Any]] = {
    "id": {"type": "int", "required": True},
    "sku": {"type": "text", "required": True, "pattern": r"^SKU-\d+$", "max_length": 20},
    "name": {"type": "text"},
    "price": {"type": "float", "parse": "number", "min": 0},
    "qty": {"type": "int", "min": 0, "max": 1_000_000},
    "in_stock": {"type": "bool"},
    "category": {"type": "text", "choices": ["books", "games", "tools", "toys", "food"]},
    "rating": {"type": "float", "min": 0, "max": 5},
    "released": {"type": "date"},
    "updated": {"type": "timestamp"},
}
SCHEMA = {"key": ["id"], "fields": FIELDS}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CATEGORIES = FIELDS["category"]["choices"]


def _data(i: int, version: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": i,
        "sku": f"SKU-{i}",
        "name": f"Item number {i} of the catalogue, version {version}",
        "price": round((i % 997) * 1.37 + version, 2),
        "qty": (i * 7 + version) % 500,
        "in_stock": i % 3 != 0,
        "category": CATEGORIES[i % 5],
        "rating": (i % 50) / 10,
        "released": f"20{10 + i % 15}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        "updated": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00+00:00",
    }
    if i % 10 == 0:
        d["price"] = f"{d['price'] * 1000:,.2f}"  # "1,299.00": needs parse: number
    if i % 4 == 0:
        d["colour"] = ["red", "green", "blue"][i % 3]  # undeclared: lands in _extra
    return d


def _run1(rows: int) -> list[tuple[int, int, datetime]]:
    """(key, version, fetched_at) for run r1: 90% unique keys, 10% repeats; half the overlap with r0 changed."""
    rng = random.Random(7)
    unique = rows - rows // 10
    start = rows // 2
    keys = list(range(start, start + unique))
    out = []
    for n, k in enumerate(keys):
        version = 0 if (k < rows and k % 2 == 0) else 1  # overlapping even keys: unchanged
        out.append((k, version, T0 + timedelta(days=1, microseconds=n)))
    for n, k in enumerate(rng.sample(keys, rows // 10)):
        out.append((k, 2, T0 + timedelta(days=2, microseconds=n)))  # the duplicate: later, changed
    rng.shuffle(out)
    return out


async def _stage(stager: LocalStager, rows: int) -> None:
    s0 = stager.open_source(SOURCE, "r0", T0)
    for i in range(rows):
        await s0.records.write(Record(SOURCE, str(i), f"https://b.test/{i}", T0, "r0", _data(i, 0)).envelope())
    await s0.commit(status="complete", schema=SCHEMA, stats={"records": rows})
    s1 = stager.open_source(SOURCE, "r1", T0 + timedelta(days=1))
    for n, (k, version, at) in enumerate(_run1(rows)):
        data = _data(k, version)
        if n % 2000 == 0:
            data["qty"] = -1  # fails `min: 0`: a reject
        await s1.records.write(Record(SOURCE, str(k), f"https://b.test/{k}", at, "r1", data).envelope())
    await s1.commit(status="complete", schema=SCHEMA, stats={"records": rows})


def _csv(stager: LocalStager, path: Path) -> int:
    """r1's records flattened to the table's columns, as `\\copy` reads them."""
    n = 0
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        for part in staged_parts(stager.root, SOURCE, run_id="r1"):
            for env in part_lines(part):
                d = env["data"]
                price = d["price"]
                if isinstance(price, str):
                    price = price.replace(",", "")
                extra = {k: v for k, v in d.items() if k not in FIELDS}
                out.writerow(
                    [
                        env["key"],
                        *(price if k == "price" else d.get(k) for k in FIELDS),
                        orjson.dumps(extra).decode() if extra else "",
                        env["url"],
                        env["content_hash"],
                        env["run_id"],
                        env["fetched_at"],
                    ]
                )
                n += 1
    return n


async def _child_load(dsn: str, staging: str, run_id: str) -> None:
    """In a subprocess: load one run and print its figures (RSS measured by the parent)."""
    from sinks.postgres import Loader
    from trawl.database import connect_pool
    from trawl.logs import configure_logging

    configure_logging("json", "WARNING")
    stager = LocalStager(Path(staging))
    pool = await connect_pool(dsn, max_size=2)
    try:
        loader = Loader(pool, stager, max_reject_rate=0.05)
        await loader.setup()
        [manifest] = [m for m in await stager.manifests("raw") if m.run_id == run_id]
        t0 = time.perf_counter()
        results = await loader.load_manifest(manifest)
        dt = time.perf_counter() - t0
    finally:
        await pool.close()
    print(
        orjson.dumps(
            {
                "rows": sum(r.rows for r in results),
                "seconds": dt,
                "inserted": sum(r.inserted for r in results),
                "updated": sum(r.updated for r in results),
                "unchanged": sum(r.unchanged for r in results),
                "rejected": sum(r.rejected for r in results),
            }
        ).decode()
    )


def _load_in_child(dsn: str, staging: Path, run_id: str) -> dict[str, Any]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            "--child-load",
            run_id,
            "--database-url",
            dsn,
            "--staging",
            str(staging),
        ],
        stdout=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else b""
    if status != 0:
        raise SystemExit(f"loader child failed with status {status}")
    figures: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    figures["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    return figures


def _psql_copy(dsn: str, csv_path: Path) -> float:
    cols = ", ".join(f"{k} {t}" for k, t in _pg_columns())
    subprocess.run(["psql", dsn, "-qAtc", f"DROP TABLE IF EXISTS copy_ref; CREATE TABLE copy_ref ({cols})"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["psql", dsn, "-qc", f"\\copy copy_ref FROM '{csv_path}' WITH (FORMAT csv)"], check=True)
    return time.perf_counter() - t0


def _pg_columns() -> list[tuple[str, str]]:
    from sinks.postgres import PG_TYPES

    return [
        ("_key", "text"),
        *((k, PG_TYPES[v["type"]]) for k, v in FIELDS.items()),
        ("_extra", "jsonb"),
        ("_url", "text"),
        ("_content_hash", "text"),
        ("_run_id", "text"),
        ("_fetched_at", "timestamptz"),
    ]


def _line(**kv: Any) -> None:
    print(orjson.dumps(kv).decode(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TRAWL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a server where a scratch database may be created (default: the local test server)",
    )
    parser.add_argument("--child-load", metavar="RUN_ID", help=argparse.SUPPRESS)
    parser.add_argument("--staging", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        asyncio.run(_child_load(args.database_url, args.staging, args.child_load))
        return

    with scratch_database(args.database_url, "trawl_bench") as dsn, tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "staging"
        stager = LocalStager(staging)
        t0 = time.perf_counter()
        asyncio.run(_stage(stager, args.rows))
        _line(bench="load.stage", rows=2 * args.rows, seconds=round(time.perf_counter() - t0, 2))
        r0 = _load_in_child(dsn, staging, "r0")
        _line(bench="load.trawl_into_empty", **r0, rows_per_s=round(r0["rows"] / r0["seconds"]))
        r1 = _load_in_child(dsn, staging, "r1")
        _line(bench="load.trawl", **r1, rows_per_s=round(r1["rows"] / r1["seconds"]))
        csv_path = Path(tmp) / "r1.csv"
        n = _csv(stager, csv_path)
        copy_s = _psql_copy(dsn, csv_path)
        _line(bench="load.psql_copy", rows=n, seconds=round(copy_s, 2), rows_per_s=round(n / copy_s))
        ratio = (r1["rows"] / r1["seconds"]) / (n / copy_s)
        _line(
            bench="load.summary",
            trawl_rows_per_s=round(r1["rows"] / r1["seconds"]),
            psql_copy_rows_per_s=round(n / copy_s),
            ratio=round(ratio, 3),
            target=0.5,
            ok=ratio >= 0.5,
            trawl_peak_rss_mb=r1["peak_rss_mb"],
            table_rows_before=r0["inserted"],
        )


if __name__ == "__main__":
    main()
