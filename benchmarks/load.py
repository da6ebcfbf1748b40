"""trawl's full PostgreSQL load side by side with `psql \\copy` and dlt: `make bench-load` (part of `make bench`).

    python -m benchmarks.load [--rows 1000000] [--database-url postgresql://postgres@127.0.0.1:5432/postgres] [--no-dlt]

Stages three runs of one source (10 declared fields with rules: a pattern, min/max,
choices, a ``parse: number`` price; some undeclared fields for ``_extra``):

- ``r0``: ROWS distinct keys, loaded first into the empty table (trawl into an empty table);
- ``r1``: ROWS records, 10% of them duplicate keys (a later ``fetched_at``), keys
  overlapping half of ``r0``'s (half of those unchanged, half changed), a few
  records that fail validation (the benchmark load, into the ROWS-row table);
- ``r2``: ``r0``'s records fetched again, nothing changed (the re-load: it must
  write no tuple to the table, counted in ``pg_stat_user_tables``).

Measured in one run, each in a fresh subprocess (fork + exec: its peak RSS is its
own): ``psql \\copy`` of ``r1`` flattened to CSV into an empty unconstrained table
with the same columns (the physical reference), trawl's loads of ``r0``, ``r1``,
``r2`` (rows/s, the loader's CPU, its PostgreSQL backends' CPU, seconds by phase),
and dlt's ``merge`` (primary key, ``dedup_sort``, CSV/COPY files, prices pre-parsed)
of ``r1`` into a table holding ``r0`` (needs the ``bench`` extra). Prints one JSON
line per measurement and a summary against the targets. Everything happens in a
scratch database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    # r2: r0's records fetched again, nothing changed: the re-load that must write nothing to the table.
    s2 = stager.open_source(SOURCE, "r2", T0 + timedelta(days=3))
    for i in range(rows):
        at = T0 + timedelta(days=3)
        await s2.records.write(Record(SOURCE, str(i), f"https://b.test/{i}", at, "r2", _data(i, 0)).envelope())
    await s2.commit(status="complete", schema=SCHEMA, stats={"records": rows})


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


async def _child_load(dsn: str, staging: str, run_id: str, decoders: int | None) -> None:
    """In a subprocess: load one run and print its figures (its own peak RSS, its backends' CPU, phases)."""
    from sinks.postgres import Loader
    from trawl.database import connect_pool
    from trawl.logs import configure_logging

    configure_logging("json", "WARNING")
    stager = LocalStager(Path(staging))
    pool = await connect_pool(dsn, min_size=2, max_size=2)
    try:
        async with pool.acquire() as conn:
            pids = [
                r[0] for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            ]
            writes = await conn.fetchval(_WRITES, SOURCE)
        pg_cpu0 = sum(_proc_cpu(p) for p in pids)
        loader = Loader(pool, stager, max_reject_rate=0.05, **({} if decoders is None else {"decoders": decoders}))
        await loader.setup()
        [manifest] = [m for m in await stager.manifests("raw") if m.run_id == run_id]
        t0 = time.perf_counter()
        results = await loader.load_manifest(manifest)
        dt = time.perf_counter() - t0
        # The decoding processes side by side: their peaks add up, as their CPU does.
        worker_rss = sum(rss for rss, _ in loader.decoder_usage.values())
        worker_cpu = sum(cpu for _, cpu in loader.decoder_usage.values())
        await loader.close()
        pg_cpu = sum(_proc_cpu(p) for p in pids) - pg_cpu0
        async with pool.acquire() as conn:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            await asyncio.sleep(0.7)  # the cumulative statistics reach the views after a flush
            writes = (await conn.fetchval(_WRITES, SOURCE) or 0) - (writes or 0)
    finally:
        await pool.close()
    phases: dict[str, float] = {}
    for r in results:
        for k, v in r.phases.items():
            phases[k] = phases.get(k, 0.0) + v
    print(
        orjson.dumps(
            {
                "rows": sum(r.rows for r in results),
                "seconds": dt,
                "inserted": sum(r.inserted for r in results),
                "updated": sum(r.updated for r in results),
                "unchanged": sum(r.unchanged for r in results),
                "rejected": sum(r.rejected for r in results),
                "table_tuples_written": writes,
                "pg_cpu_s": round(pg_cpu, 2),
                "phases_s": {k: round(v, 2) for k, v in phases.items()},
                "self_peak_rss_mb": round(_peak_rss_mb(), 1),
                "self_ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "decoder_peak_rss_mb": round(worker_rss, 1),
                "self_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 2),
                "decoder_cpu_s": round(worker_cpu, 2),
            }
        ).decode()
    )


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: its address space's, unlike ru_maxrss, which exec does not reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Rows inserted or updated in the source table so far (cumulative statistics).
_WRITES = "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE schemaname = 'trawl' AND relname = $1"


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a local process (a PostgreSQL backend on this machine), 0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load_in_child(dsn: str, staging: Path, run_id: str, decoders: int | None = None) -> dict[str, Any]:
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
            *(() if decoders is None else ("--decoders", str(decoders))),
        ],
        stdout=subprocess.PIPE,
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"loader child failed with status {status}")
    figures: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    # Not the child's ru_maxrss: Linux carries the forking process's high-water mark across exec into it (this
    # process's, which staged the records). The child reports its own (VmHWM), and its decoding processes'
    # (forked by the forkserver, not by it), which count too.
    figures["peak_rss_mb"] = round(figures["self_peak_rss_mb"] + figures["decoder_peak_rss_mb"], 1)
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime + figures["decoder_cpu_s"], 2)
    figures["rows_per_s"] = round(figures["rows"] / figures["seconds"])
    return figures


def _dlt_rows(stager: LocalStager, run_id: str) -> Iterator[list[dict[str, Any]]]:
    """A run's records as dlt gets them: flat, prices pre-parsed (dlt has no parse rule), in batches."""
    batch: list[dict[str, Any]] = []
    for part in staged_parts(stager.root, SOURCE, run_id=run_id):
        for env in part_lines(part):
            d = dict(env["data"])
            if isinstance(d.get("price"), str):
                d["price"] = float(d["price"].replace(",", ""))
            d.update(_key=env["key"], _url=env["url"], _content_hash=env["content_hash"], _fetched_at=env["fetched_at"])
            batch.append(d)
            if len(batch) == 10_000:
                yield batch
                batch = []
    if batch:
        yield batch


def _child_dlt(dsn: str, staging: str) -> None:
    """In a subprocess: dlt `merge` (primary key, dedup_sort, CSV/COPY files) of r0, then r1 timed."""
    import dlt

    stager = LocalStager(Path(staging))
    types = {"int": "bigint", "text": "text", "float": "double", "bool": "bool", "date": "date"}
    columns: dict[str, Any] = {k: {"data_type": types.get(v["type"], "timestamp")} for k, v in FIELDS.items()}
    columns["_fetched_at"] = {"data_type": "timestamp", "dedup_sort": "desc"}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = dlt.pipeline(
            pipeline_name="trawl_bench",
            destination=dlt.destinations.postgres(credentials=_dlt_credentials(dsn)),
            dataset_name="dlt_bench",
            pipelines_dir=tmp,
        )

        def resource(run_id: str) -> Any:
            return dlt.resource(
                _dlt_rows(stager, run_id),
                name=SOURCE,
                primary_key="_key",
                write_disposition={"disposition": "merge", "strategy": "delete-insert"},
                columns=columns,
            )

        pipeline.run(resource("r0"), loader_file_format="csv")
        t0 = time.perf_counter()
        pipeline.run(resource("r1"), loader_file_format="csv")
        dt = time.perf_counter() - t0
    print(orjson.dumps({"rows": sum(1 for _ in _flat(stager, "r1")), "seconds": dt}).decode())


def _dlt_credentials(dsn: str) -> dict[str, Any]:
    """dlt insists on a password: any will do on a trust-auth server."""
    u = urlsplit(dsn)
    return {
        "database": u.path.lstrip("/"),
        "username": u.username or "postgres",
        "password": u.password or "trust",
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 5432,
    }


def _flat(stager: LocalStager, run_id: str) -> Iterator[dict[str, Any]]:
    for batch in _dlt_rows(stager, run_id):
        yield from batch


def _dlt_in_child(dsn: str, staging: Path) -> dict[str, Any] | None:
    try:
        import dlt  # noqa: F401
    except ImportError:
        return None
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load", "--child-dlt", "--database-url", dsn, "--staging", str(staging)],
        stdout=subprocess.PIPE,
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"dlt child failed with status {status}")
    figures: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    figures["rows_per_s"] = round(figures["rows"] / figures["seconds"])
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
    parser.add_argument("--no-dlt", action="store_true", help="skip dlt's merge (also skipped when dlt is missing)")
    parser.add_argument(
        "--keep-staging",
        type=Path,
        metavar="DIR",
        help="stage into DIR and keep it; a later run with the same DIR (and --rows) loads it again",
    )
    parser.add_argument("--decoders", type=int, help="the loader's decoding processes (default: the Loader's)")
    parser.add_argument("--child-load", metavar="RUN_ID", help=argparse.SUPPRESS)
    parser.add_argument("--child-dlt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--staging", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_load:
        asyncio.run(_child_load(args.database_url, args.staging, args.child_load, args.decoders))
        return
    if args.child_dlt:
        _child_dlt(args.database_url, args.staging)
        return

    with scratch_database(args.database_url, "trawl_bench") as dsn, tempfile.TemporaryDirectory() as tmp:
        staging = args.keep_staging or Path(tmp) / "staging"
        stager = LocalStager(staging)
        if not (staging / "raw").exists():
            t0 = time.perf_counter()
            asyncio.run(_stage(stager, args.rows))
            _line(bench="load.stage", rows=3 * args.rows, seconds=round(time.perf_counter() - t0, 2))
        csv_path = Path(tmp) / "r1.csv"
        n = _csv(stager, csv_path)
        copy_s = _psql_copy(dsn, csv_path)
        copy_rps = n / copy_s
        _line(bench="load.psql_copy", rows=n, seconds=round(copy_s, 2), rows_per_s=round(copy_rps))
        r0 = _load_in_child(dsn, staging, "r0", args.decoders)
        _line(bench="load.trawl_into_empty", **r0, vs_copy=round(r0["rows_per_s"] / copy_rps, 3))
        r2 = _load_in_child(dsn, staging, "r2", args.decoders)  # before r1: the table holds exactly r0's content
        _line(bench="load.trawl_reload_unchanged", **r2, vs_copy=round(r2["rows_per_s"] / copy_rps, 3))
        r1 = _load_in_child(dsn, staging, "r1", args.decoders)
        _line(bench="load.trawl", **r1, vs_copy=round(r1["rows_per_s"] / copy_rps, 3))
        dlt = None if args.no_dlt else _dlt_in_child(dsn, staging)
        if dlt is not None:
            _line(bench="load.dlt_merge", **dlt, vs_copy=round(dlt["rows_per_s"] / copy_rps, 3))
        _line(
            bench="load.summary",
            psql_copy_rows_per_s=round(copy_rps),
            into_empty_vs_copy=round(r0["rows_per_s"] / copy_rps, 3),
            benchmark_vs_copy=round(r1["rows_per_s"] / copy_rps, 3),
            reload_vs_copy=round(r2["rows_per_s"] / copy_rps, 3),
            benchmark_vs_dlt=round(r1["rows_per_s"] / dlt["rows_per_s"], 1) if dlt else None,
            reload_tuples_written=r2["table_tuples_written"],
            peak_rss_mb=max(r["peak_rss_mb"] for r in (r0, r1, r2)),
            ok={
                "into_empty>=0.5": r0["rows_per_s"] >= 0.5 * copy_rps,
                "benchmark>=0.35": r1["rows_per_s"] >= 0.35 * copy_rps,
                "reload>=0.5": r2["rows_per_s"] >= 0.5 * copy_rps,
                "reload_writes_nothing": r2["table_tuples_written"] == 0,
                ">=5x_dlt": bool(dlt) and r1["rows_per_s"] >= 5 * dlt["rows_per_s"],
                "rss<=250MB": max(r["peak_rss_mb"] for r in (r0, r1, r2)) <= 250,
            },
        )


if __name__ == "__main__":
    main()
